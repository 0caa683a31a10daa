"""daar_ops.evaluation and `daar-ops evaluate` on a tiny random model (tests/conftest.py)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from daar_ops import evaluation as ev

DOMAINS = ("coding", "common_sense", "mathematics", "reasoning")
_TOPIC = {"coding": "Write a function that sorts a list of {k} numbers.",
          "common_sense": "What is the capital of country number {k}?",
          "mathematics": "Solve {k} * 7 and explain.",
          "reasoning": "If all cats are animals and Tom is cat {k}, is Tom an animal?"}


def tiny_records(per_domain: int) -> list[dict]:
    out = []
    for i in range(per_domain):
        for d in DOMAINS:
            out.append({"instruction": _TOPIC[d].format(k=i) + " detail" * (i % 5),
                        "input": "" if i % 3 else f"context {i}",
                        "output": f"The answer for {d} {i} is {i * 7}.", "domain": d,
                        "source": "test"})
    return out


def write_tiny_pool(path: Path, per_domain: int = 20) -> Path:
    with open(path, "w") as handle:
        for rec in tiny_records(per_domain):
            handle.write(json.dumps(rec) + "\n")
    return path


def test_held_out_split_depends_on_text_only():
    recs = tiny_records(50)
    keep, held = ev.split_held_out(recs, 0.2)
    assert sorted(keep + held) == list(range(len(recs)))
    assert 0.1 < len(held) / len(recs) < 0.3
    reversed_recs = recs[::-1]
    _, held_rev = ev.split_held_out(reversed_recs, 0.2)
    assert {ev.text_hash(recs[i]) for i in held} == {ev.text_hash(reversed_recs[i])
                                                      for i in held_rev}
    # the ground-truth label is not part of the identity
    assert ev.text_hash({**recs[0], "domain": "other"}) == ev.text_hash(recs[0])
    held_hashes = {ev.text_hash(recs[i]) for i in held}
    kept, dropped = ev.drop_held_out(recs, held_hashes)
    assert dropped == len(held) and len(kept) == len(keep)
    with pytest.raises(ValueError):
        ev.split_held_out(recs, 1.0)


def test_examples_carry_loss_on_the_answer_only(tiny_llama):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    rec = {"instruction": "Solve 12 * 7.", "input": "", "output": "The answer is 84."}
    ex = ev.encode_example(tok, rec, 512)
    answer = [t for t, lab in zip(ex["input_ids"], ex["labels"]) if lab != -100]
    prompt = [t for t, lab in zip(ex["input_ids"], ex["labels"]) if lab == -100]
    assert tok.decode(answer).startswith("The answer is 84.")
    assert "<|im_start|>assistant" in tok.decode(prompt) and "Solve 12" in tok.decode(prompt)
    assert ex["labels"][:len(prompt)] == [-100] * len(prompt)  # prompt first, then the answer
    long = {"instruction": "word " * 200, "input": "", "output": "answer " * 200}
    cut = ev.encode_example(tok, long, 64)
    assert len(cut["input_ids"]) == 64
    n_prompt = sum(lab == -100 for lab in cut["labels"])
    assert n_prompt == 32  # the prompt keeps half the budget when the answer is long
    assert tok.decode(cut["input_ids"][:n_prompt]).endswith("assistant\n")


def test_fine_tuning_lowers_the_loss_on_its_data(tiny_llama, tmp_path):
    recs = tiny_records(4)
    _, tok = ev.load_base_model(str(tiny_llama))
    base, _ = ev.load_base_model(str(tiny_llama))
    before = ev.held_out_loss(base, tok, {"train": recs}, 64)["train"]["loss"]
    settings = ev.TrainSettings(max_length=64, epochs=5, batch_size=8, lr=2e-2, warmup_fraction=0)
    tuned = ev.fine_tune(str(tiny_llama), recs, settings, 0, tmp_path, progress=False,
                         adapter_dir=tmp_path / "adapter")
    after = ev.held_out_loss(tuned.model, tok, {"train": recs}, 64)["train"]["loss"]
    assert after < before - 0.05, (before, after)
    assert tuned.steps == 5 * 2 and tuned.train_tokens > 0
    reloaded, _ = ev.load_tuned(str(tiny_llama), tmp_path / "adapter")
    again = ev.held_out_loss(reloaded, tok, {"train": recs}, 64)["train"]["loss"]
    assert again == pytest.approx(after, rel=1e-4)


def test_runs_resume_and_refit_when_settings_change(tiny_llama, tmp_path, monkeypatch):
    recs = tiny_records(6)
    eval_sets = {"coding": recs[:4], "mathematics": recs[4:8]}
    selections = {"a": recs[8:16], "random": {0: recs[16:24]}}
    settings = ev.TrainSettings(max_length=48, batch_size=4)
    first = ev.evaluate_selections(selections, eval_sets, tmp_path, model=str(tiny_llama),
                                   seeds=(0,), settings=settings, include_base=False,
                                   progress=False)
    assert [r["method"] for r in first] == ["a", "random"]

    def no_training(*args, **kwargs):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(ev, "fine_tune", no_training)
    second = ev.evaluate_selections(selections, eval_sets, tmp_path, model=str(tiny_llama),
                                    seeds=(0,), settings=settings, include_base=False,
                                    progress=False)
    assert [r["avg_loss"] for r in second] == [r["avg_loss"] for r in first]
    with pytest.raises(AssertionError, match="trained again"):
        ev.evaluate_selections(selections, eval_sets, tmp_path, model=str(tiny_llama),
                               seeds=(0,), settings=ev.TrainSettings(max_length=48, lr=1e-3),
                               include_base=False, progress=False)


def test_summary_pairs_seeds_and_gives_a_t_interval():
    def run(method, seed, loss):
        return {"method": method, "seed": seed, "n_selected": 10, "avg_loss": loss,
                "losses": {"x": {"loss": loss, "n_records": 1, "n_tokens": 1}}}

    results = [run("random", s, v) for s, v in enumerate([2.0, 2.2, 2.1])]
    results += [run("m", s, v) for s, v in enumerate([1.9, 2.0, 2.05])]
    summary = ev.summarize(results)
    m = next(r for r in summary["rows"] if r["method"] == "m")
    diffs = np.array([-0.1, -0.2, -0.05])
    half = 4.302652729911275 * diffs.std(ddof=1) / math.sqrt(3)  # t(0.975, 2 dof)
    assert m["delta_vs_random"] == pytest.approx(diffs.mean())
    assert m["delta_ci95"] == pytest.approx(half)
    assert m["outside_spread"] == bool(abs(diffs.mean()) > half)
    assert summary["best_method"] == "m"
    assert "delta vs random" in ev.format_table(summary)


def test_cli_evaluate_writes_table_json_png(tiny_llama, tmp_path):
    from daar_ops.cli import main

    pool = write_tiny_pool(tmp_path / "pool.jsonl", per_domain=20)
    given = tmp_path / "given.jsonl"
    given.write_text("".join(json.dumps(r) + "\n" for r in tiny_records(3)))
    out = tmp_path / "out"
    code = main(["evaluate", "--pool", str(pool), "--methods", "random", "--selection",
                 f"given={given}", "--n", "40", "--seeds", "0,1", "--model", str(tiny_llama),
                 "--eval-per-domain", "2", "--held-out-fraction", "0.1", "--max-length", "48",
                 "--batch-size", "4", "--device", "cpu", "--out", str(out), "--no-progress"])
    assert code == 0
    for name in ("results.json", "table.md", "table.csv", "losses.png", "summary.md"):
        assert (out / name).stat().st_size > 0, name
    payload = json.loads((out / "results.json").read_text())
    rows = {r["method"]: r for r in payload["summary"]["rows"]}
    assert set(rows) == {"base", "random", "given"}
    assert rows["random"]["n_selected"] == 8 and "delta_vs_random" in rows["given"]
    # selection input never carries the ground truth; held-out texts are never trained on
    pool_lines = (out / "selection_pool.jsonl").read_text().splitlines()
    assert pool_lines and all("domain" not in json.loads(line) for line in pool_lines)
    held = {ev.text_hash(r) for recs in ev.read_eval_sets(out / "eval_sets").values()
            for r in recs}
    assert set(ev.read_eval_sets(out / "eval_sets")) == set(DOMAINS)
    assert not held & {ev.text_hash(json.loads(line)) for line in pool_lines}
    given_run = next(r for r in payload["runs"] if r["method"] == "given")
    assert given_run["n_selected"] == 12 - sum(ev.text_hash(r) in held for r in tiny_records(3))


def test_lm_eval_wiring():
    assert ev.parse_tasks("paper", allow_code_execution=True) == list(ev.PAPER_BENCHMARKS)
    assert ev.parse_tasks("gsm8k, mbpp", allow_code_execution=True) == ["gsm8k", "mbpp"]
    assert ev.lm_eval_model_args("/m", "/a", "bfloat16") == "pretrained=/m,dtype=bfloat16,peft=/a"
    assert ev._main_metric({"acc,none": 0.5, "acc_stderr,none": 0.1}) == 0.5
