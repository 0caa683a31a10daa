"""daar_ops.evaluation and `daar-ops evaluate` on a tiny random model (tests/conftest.py)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from daar_ops import evaluation as ev
from daar_ops.causal_lm import load_causal_lm
from daar_ops.core import read_jsonl, write_jsonl
from daar_ops.evaluation import finetune, runs

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
    write_jsonl(path, tiny_records(per_domain))
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
    base, tok = load_causal_lm(str(tiny_llama))
    before = ev.held_out_loss(base, tok, {"train": recs}, 64)["train"]["loss"]
    settings = ev.TrainSettings(max_length=64, epochs=5, batch_size=8, lr=2e-2, warmup_fraction=0,
                                finetune="lora")
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

    monkeypatch.setattr(runs, "fine_tune", no_training)
    second = ev.evaluate_selections(selections, eval_sets, tmp_path, model=str(tiny_llama),
                                    seeds=(0,), settings=settings, include_base=False,
                                    progress=False)
    assert [r["avg_loss"] for r in second] == [r["avg_loss"] for r in first]
    with pytest.raises(AssertionError, match="trained again"):
        ev.evaluate_selections(selections, eval_sets, tmp_path, model=str(tiny_llama),
                               seeds=(0,), settings=ev.TrainSettings(max_length=48, lr=1e-3),
                               include_base=False, progress=False)


@pytest.mark.parametrize("field, value", [
    ("lr", 0), ("batch_size", 0), ("max_length", 12.5), ("epochs", -1.0), ("finetune", "half"),
    ("bf16", "maybe"), ("scheduler", "zigzag"), ("warmup_fraction", 1.5), ("lora_dropout", 1.0),
    ("group_by_length", "yes"), ("eval_max_length", -1)])
def test_train_settings_check_every_field_once_naming_it(field, value):
    with pytest.raises(ValueError, match=f"TrainSettings.{field} must be"):
        ev.TrainSettings(**{field: value})


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
    write_jsonl(given, tiny_records(3))
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
    pool_records = read_jsonl(out / "selection_pool.jsonl", strict=True)[0]
    assert pool_records and all("domain" not in r for r in pool_records)
    held = {ev.text_hash(r) for recs in ev.read_eval_sets(out / "eval_sets").values()
            for r in recs}
    assert set(ev.read_eval_sets(out / "eval_sets")) == set(DOMAINS)
    assert not held & {ev.text_hash(r) for r in pool_records}
    given_run = next(r for r in payload["runs"] if r["method"] == "given")
    assert given_run["n_selected"] == 12 - sum(ev.text_hash(r) in held for r in tiny_records(3))


def test_lm_eval_wiring():
    assert ev.parse_tasks("paper", allow_code_execution=True) == list(ev.PAPER_BENCHMARKS)
    assert ev.parse_tasks("gsm8k, mbpp", allow_code_execution=True) == ["gsm8k", "mbpp"]
    assert ev.lm_eval_model_args("/m", "/a", "bfloat16") == "pretrained=/m,dtype=bfloat16,peft=/a"
    from daar_ops.evaluation.summary import _main_metric

    assert _main_metric({"acc,none": 0.5, "acc_stderr,none": 0.1}) == 0.5


def test_final_answer_span_rules():
    boxed = "so $x = \\boxed{\\frac{1}{2}}$ done"
    (a, b), rule = ev.final_answer_span(boxed)
    assert rule == "boxed" and boxed[a:b] == "\\frac{1}{2}"
    text = "Step 1.\nThe answer is 84.\nBye"
    (a, b), rule = ev.final_answer_span(text)
    assert rule == "answer_is" and text[a:b] == "84."
    (a, b), rule = ev.final_answer_span("Thinking. So, the final answer is no.")
    assert rule == "answer_is" and "Thinking. So, the final answer is no."[a:b] == "no."
    code = "Here:\n```python\ndef f():\n    return 1\n```\nDone."
    (a, b), rule = ev.final_answer_span(code)
    assert rule == "code" and code[a:b] == "def f():\n    return 1\n"
    assert ev.final_answer_span("Paris.") == ((0, 6), "whole")


def test_long_answers_lose_their_middle_not_their_end(tiny_llama):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    rec = {"instruction": "Add.", "input": "", "output": "step " * 300 + "The answer is 42."}
    ex = ev.encode_example(tok, rec, 64, final=True)
    assert len(ex["input_ids"]) == 64 and ex["final_rule"] == "answer_is"
    answer = [t for t, lab in zip(ex["input_ids"], ex["labels"]) if lab != -100]
    assert "42" in tok.decode(answer) and tok.decode(answer).startswith("step")
    final = tok.decode([t for t, f in zip(ex["input_ids"], ex["final"]) if f])
    assert final.strip().startswith("42")


def test_controls_are_fixed_and_have_their_mixes():
    recs = tiny_records(60)  # 60 per domain
    truth = {ev.text_hash(r): r["domain"] for r in recs}
    slice_records = [{k: v for k, v in r.items() if k not in ("domain", "source")} for r in recs]
    sel = ev.control_selections(slice_records, truth, 40, seed=0)
    again = ev.control_selections(slice_records[::-1], truth, 40, seed=0)
    dom = lambda rs: [truth[ev.text_hash(r)] for r in rs]  # noqa: E731
    assert len(sel[ev.CONTROL_RANDOM]) == 40 and len(sel[ev.CONTROL_DOUBLE]) == 80
    assert {ev.text_hash(r) for r in sel[ev.CONTROL_RANDOM]} <= {
        ev.text_hash(r) for r in sel[ev.CONTROL_DOUBLE]}
    assert set(dom(sel[ev.CONTROL_SINGLE])) == {"mathematics"}
    skew = dom(sel[ev.CONTROL_SKEW])
    assert len(skew) == 40 and skew.count("common_sense") == 28
    assert all(skew.count(d) == 4 for d in ("coding", "mathematics", "reasoning"))
    assert len(again[ev.CONTROL_SKEW]) == 40
    with pytest.raises(ValueError, match="needs"):
        ev.control_selections(slice_records[:50], truth, 40)


def test_full_fine_tune_is_the_cpu_default_and_resolved_settings_split_runs(tiny_llama, tmp_path,
                                                                           monkeypatch):
    recs = tiny_records(4)
    settings = ev.TrainSettings(max_length=48, eval_max_length=64, epochs=4, batch_size=4,
                                lr=3e-3, warmup_fraction=0, bf16="no")
    assert ev.resolve_finetune(settings, str(tiny_llama), "cpu") == "full"
    out = ev.evaluate_selections({"a": recs}, {"x": recs[:6], "y": recs[6:10]}, tmp_path / "w",
                                 model=str(tiny_llama), seeds=(0,), settings=settings,
                                 progress=False, results_dir=tmp_path / "r")
    base, tuned = out
    assert tuned["finetune"] == "full" and tuned["resolved"]["bf16"] is False
    assert tuned["avg_loss"] < base["avg_loss"] - 0.05, (base["avg_loss"], tuned["avg_loss"])
    rec = tuned["losses"]["x"]["records"]
    assert len(rec["nll"]) == 6 and sum(rec["tokens"]) == tuned["losses"]["x"]["n_tokens"]
    assert sum(rec["nll"]) / sum(rec["tokens"]) == pytest.approx(tuned["losses"]["x"]["loss"],
                                                                  rel=1e-4)
    assert (tmp_path / "r" / "runs" / "a" / "seed-0" / "result.json").exists()
    assert not (tmp_path / "w" / "runs" / "a" / "seed-0" / "result.json").exists()
    # another resolved precision is another run: never paired with the fp32 one
    monkeypatch.setattr(finetune, "native_bf16", lambda device: True)
    auto = ev.TrainSettings(**{**settings.to_dict(), "bf16": "auto"})
    assert ev.resolved_settings(auto, str(tiny_llama), "cpu")["bf16"] is True

    def no_training(*args, **kwargs):
        raise AssertionError("trained")

    monkeypatch.setattr(runs, "fine_tune", no_training)
    with pytest.raises(AssertionError, match="trained"):
        ev.evaluate_selections({"a": recs}, {"x": recs[:6], "y": recs[6:10]}, tmp_path / "w",
                               model=str(tiny_llama), seeds=(0,), settings=auto, progress=False,
                               include_base=False, results_dir=tmp_path / "r")


def _fake_run(method, seed, shift, rng, key="k"):
    losses = {}
    for g, d in enumerate(DOMAINS):
        tokens = [10] * 30
        nll = list(10 * (1.0 + g * 0.1 + shift.get(d, 0.0) + rng.normal(0, 0.002, 30)))
        losses[d] = {"loss": sum(nll) / 300, "final_loss": sum(nll) / 300,
                     "records": {"nll": nll, "tokens": tokens, "final_nll": nll,
                                 "final_tokens": tokens}}
    return {"method": method, "seed": seed, "n_selected": 10, "config_key": key,
            "losses": losses, "avg_loss": float(np.mean([v["loss"] for v in losses.values()])),
            "avg_final_loss": 0.0}


def test_report_and_result_line_from_run_files(tmp_path):
    from daar_ops import evaluation_report as er

    rng = np.random.default_rng(0)
    runs = [_fake_run("base", None, {d: 0.3 for d in DOMAINS}, rng)]
    for s in range(3):
        runs += [_fake_run("ctl_random", s, {}, rng),
                 _fake_run("ctl_random_2x", s, {d: -0.05 for d in DOMAINS}, rng),
                 _fake_run("ctl_mathematics", s, {"mathematics": -0.1, "coding": 0.05,
                                                  "common_sense": 0.05, "reasoning": 0.05}, rng),
                 _fake_run("ctl_skew", s, {"reasoning": 0.0005}, rng),  # too small to see
                 _fake_run("random", s, {}, rng),
                 _fake_run("daar", s, {"reasoning": 0.2}, rng)]
    runs.append(_fake_run("qdit", 0, {}, rng, key="other settings"))
    for r in runs:
        path = tmp_path / "runs" / r["method"] / ("base" if r["seed"] is None
                                                  else f"seed-{r['seed']}") / "result.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(r))
    report = er.write_report(tmp_path, n_boot=200)
    c = report["controls"]
    assert [c[p]["status"] for p in ("P0", "P1", "P2", "P3")] == ["passed", "passed", "passed",
                                                                   "failed"]
    assert c["P0"]["delta"] == pytest.approx(-0.3, abs=0.01)
    assert report["ignored_runs"] == 1
    line = report["result_line"]
    assert line.startswith("RESULT controls_passed=3/4 ")
    fields = dict(kv.split("=", 1) for kv in line.split()[1:])
    assert fields["methods"] == "2" and fields["seeds"] == "3"
    assert float(fields["daar_delta"]) == pytest.approx(0.05, abs=0.003)  # reasoning +0.2 / 4
    assert "daar_per_domain_delta=nan" in line and "best_method=random" in line
    for name in ("summary.md", "table.md", "report.json", "deltas.png"):
        assert (tmp_path / name).stat().st_size > 0
    assert "not detectable" in (tmp_path / "table.md").read_text()


def test_report_only_on_no_runs_prints_pending(tmp_path, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "eval_downstream", Path(__file__).resolve().parents[1] / "tools" / "eval_downstream.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    assert tool.main(["--report-only", "--results-dir", str(tmp_path)]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("RESULT controls_passed=0/4 mde=nan movement=nan")
    assert "best_method=pending" in last


# Identities of the committed downstream runs (docs/results/downstream): a run is reused only when
# its fingerprint matches, so a change to any of these values silently retrains every finished
# run. The literals were computed by the code that produced the committed runs; change them only
# together with a deliberate rerun of the measurement.
PINNED_FINGERPRINTS = {
    "base/None": "ce243977d54dc5f8312a17ae6facc741aade5336a7605688790c8fca0a810cfb",
    "a/0": "6c6be3675d0ef66dfe07bdab09850355e61b5c412fc313c09ba3bc876fb2e1b9",
    "a/1": "39d8c170f9191cdb22f752f8156082ff060896255352919cd199f3a7104fb47a",
    "random/0": "7d4fd9f11fdf14f07a08443c065e45755e29f5a2b1480c2928370d59c2210e61",
    "random/1": "48415d49a8e5d4bdc4bd1558144a7d0f7362164c355177a3cbdae9bb5a8434a7",
}
PINNED_CONFIG_KEY = "a59d03afbf2d4667"
PINNED_EVAL_DIGEST = "29825dee4542441bab79b0aed1a3a2bb40bfe89953b7ddc5cf9daafd0b309d2b"


def test_run_fingerprints_of_a_fixed_config_are_pinned(tmp_path, monkeypatch):
    """The resume identity (model id, settings and what "auto" resolved to, seed, selection and
    evaluation digests) of a fixed small comparison equals what the code that wrote the committed
    runs computed: a finished run is still found after any refactor."""
    import daar_ops.models

    # what "auto" resolves to is part of the identity: its keys and values are pinned too
    assert ev.resolved_settings(ev.TrainSettings(finetune="full", bf16="no"), "m", "cpu") == {
        "bf16": False, "finetune": "full", "device_type": "cpu"}
    monkeypatch.setattr(daar_ops.models, "model_fingerprint", lambda path: "model-x")
    monkeypatch.setattr(daar_ops.models, "resolve_model_path", lambda name: str(name))
    monkeypatch.setattr(runs, "resolved_settings", lambda settings, model, device: {
        "bf16": False, "finetune": "full", "device_type": "cpu"})
    monkeypatch.setattr(runs, "_run_one", lambda name, seed, *args, **kwargs: {
        "method": name, "seed": seed, "n_selected": 0, "losses": {}, "avg_loss": 0.0})
    recs = tiny_records(6)
    out = ev.evaluate_selections(
        {"a": recs[8:16], "random": {0: recs[16:24], 1: recs[0:8]}},
        {"coding": recs[:4], "mathematics": recs[4:8]}, tmp_path, model="m", seeds=(0, 1),
        settings=ev.TrainSettings(), device="cpu", progress=False,
        held_hashes={ev.text_hash(recs[8])})
    assert {f"{r['method']}/{r['seed']}": r["fingerprint"] for r in out} == PINNED_FINGERPRINTS
    assert {r["config_key"] for r in out} == {PINNED_CONFIG_KEY}
    assert {r["eval_digest"] for r in out} == {PINNED_EVAL_DIGEST}


def test_comparison_inputs_of_a_fixed_pool_are_pinned(tmp_path):
    """Held-out split, slice, random's draws and the controls of a fixed tiny pool select the
    records they selected when the committed runs were made (their digests feed the
    fingerprints)."""
    pool = write_tiny_pool(tmp_path / "pool.jsonl", per_domain=40)
    c = ev.prepare_comparison(tmp_path / "c", pool=pool, n=100, ratio=0.2, methods=["random"],
                              seeds=(0, 1), held_out_fraction=0.1, eval_per_domain=3,
                              controls=True, progress=False)
    digests = {f"{name}/{seed}": ev.records_digest(ev.selection_for_seed(sel, seed))[:16]
               for name, sel in c.selections.items()
               for seed in ((0, 1) if isinstance(sel, dict) else (0,))}
    assert digests == {"ctl_mathematics/0": "ed3eb27233c2de1d", "ctl_random/0": "b4245820c7dfb762",
                       "ctl_random_2x/0": "af70b129b9d3dc91", "ctl_skew/0": "fd62f611e61c184d",
                       "random/0": "34f9c437813955e7", "random/1": "2f60c95e4b72d790"}
    assert {d: ev.records_digest(r)[:16] for d, r in c.eval_sets.items()} == {
        "coding": "ab1d8de89e11d63c", "common_sense": "db32a30c4bfc20bd",
        "mathematics": "919c211994cd6a28", "reasoning": "5aacf0c9b29436c7"}
    assert len(c.held_hashes) == 21


def test_selection_mix_is_recorded_merged_and_reported(tmp_path):
    """prepare_comparison records each selection's ground-truth domain counts beside the cached
    selections (merged over calls, per seed for random); the report shows them per row."""
    from daar_ops import evaluation_report as er

    pool = write_tiny_pool(tmp_path / "pool.jsonl", per_domain=40)
    results = tmp_path / "results"
    common = dict(pool=pool, n=100, ratio=0.2, held_out_fraction=0.1, eval_per_domain=3,
                  progress=False, results_dir=results)
    ev.prepare_comparison(tmp_path / "c", methods=["random"], seeds=(0,), controls=True, **common)
    c = ev.prepare_comparison(tmp_path / "c", methods=["random"], seeds=(1,), **common)
    mix = json.loads((results / "selections" / ev.MIX_FILE).read_text())["mix"]
    assert set(mix["random"]) == {"0", "1"}  # the second call added seed 1, kept seed 0
    assert mix["ctl_mathematics"] == {ev.ALL_SEEDS: {"mathematics": 20}}
    assert sum(mix["ctl_skew"][ev.ALL_SEEDS].values()) == 20
    assert mix["random"]["1"] == c.context["selection_domains"]["random"]
    assert sum(mix["random"]["1"].values()) == 20
    loaded = er.load_mix(results)
    avg = er.selected_mix(loaded, "random", [0, 1])
    assert sum(avg.values()) == pytest.approx(20)
    assert er.selected_mix(loaded, "random", [5]) is None
    assert er.selected_mix(None, "x", [0]) is None
    assert er.format_mix({"b": 3.0, "a": 1.5}) == "1.5/3" and er.format_mix(None) == "-"
    rng = np.random.default_rng(0)
    for s in (0, 1):
        for method in ("random", "ctl_mathematics"):
            path = results / "runs" / method / f"seed-{s}" / "result.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(_fake_run(method, s, {}, rng)))
    er.write_report(results, n_boot=50)
    table = (results / "table.md").read_text()
    assert "| random | 10 | " + er.format_mix(avg) + " | 2 |" in table
    assert "| 0/0/20/0 |" in table  # P2's mathematics-only selection in the controls table


def test_pairwise_compares_fixed_selections_directly():
    from daar_ops import evaluation_report as er

    rng = np.random.default_rng(1)
    runs_by = {m: {s: _fake_run(m, s, shift, rng) for s in range(3)}
               for m, shift in (("qdit", {}), ("daar", {"reasoning": 0.2}), ("ds2", {}))}
    pairs = {(c["method"], c["reference"]): c for c in er.pairwise(runs_by, ["qdit", "daar",
                                                                          "ds2"], n_boot=200)}
    assert set(pairs) == {("daar", "qdit"), ("ds2", "qdit"), ("ds2", "daar")}
    assert pairs[("daar", "qdit")]["delta"] == pytest.approx(0.05, abs=0.003)
    assert pairs[("daar", "qdit")]["verdict"] == "higher"
    assert pairs[("ds2", "daar")]["verdict"] == "lower"
    assert pairs[("ds2", "qdit")]["verdict"] == "not detectable"
    table = er.format_pairs({"pairs": list(pairs.values())})
    assert "| daar | qdit | 3 | +0.05" in table and er.format_pairs({}).startswith("(no two")
