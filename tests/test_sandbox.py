"""The Data-Juicer sandbox experiment on a tiny model: prepare -> select -> train -> evaluate.

Runs when the vendored sandbox imports (docs/sandbox.md: its folder on PYTHONPATH, or
../shared/vendor/data-juicer-sandbox beside the repository, plus its extra packages); skipped,
saying why, otherwise.
"""

from __future__ import annotations

import json

import pytest
import yaml

from test_evaluation import write_tiny_pool  # tests/ is on sys.path (no __init__.py)


@pytest.fixture(scope="module")
def sandbox():
    import os

    os.environ.setdefault("WANDB_MODE", "disabled")
    from daar_ops.commands.sandbox import import_sandbox

    try:
        return import_sandbox()
    except ImportError as err:
        pytest.skip(f"Data-Juicer sandbox not importable: {err}")


def test_sandbox_experiment_runs_hooks_end_to_end(sandbox, tiny_llama, tmp_path, monkeypatch):
    from daar_ops import evaluation as ev
    from daar_ops.commands.sandbox import build_sandbox_config, run_sandbox

    monkeypatch.setenv("WANDB_MODE", "disabled")
    pool = write_tiny_pool(tmp_path / "pool.jsonl", per_domain=30)
    work = tmp_path / "sandbox"
    cfg = build_sandbox_config(work, methods=["random", "instruction_length"],
                               model=str(tiny_llama), seeds=(0, 1), pool=str(pool), n=40,
                               eval_per_domain=2, held_out_fraction=0.1,
                               settings={"max_length": 48, "batch_size": 4},
                               write_recipes=True)
    config = tmp_path / "sandbox.yaml"
    config.write_text(yaml.safe_dump(cfg, sort_keys=False))
    outputs = run_sandbox(config)

    assert set(outputs) == {"prepare", "random", "instruction_length", "summary"}
    assert outputs["summary"]["summary"]["best_method"] in ("random", "instruction_length")
    assert len(outputs["random"]["train"]["adapters"]) == 2
    results = json.loads((work / "summary" / "results.json").read_text())
    rows = {r["method"]: r for r in results["summary"]["rows"]}
    assert rows["random"]["avg_loss"] == pytest.approx(outputs["random"]["evaluate"]["avg_loss"])
    methods = {r["method"] for r in results["runs"]}
    assert methods == {"random", "instruction_length"}
    assert len(results["runs"]) == 4  # 2 methods x 2 seeds
    for run in results["runs"]:
        assert run["n_selected"] == 8  # 20% of the 40-record slice
        assert all(v["n_tokens"] > 0 and v["loss"] > 0 for v in run["losses"].values())
    # the instruction-length selection really is the longest 20% of the slice
    slice_recs = ev.read_records(work / "select" / "slice_input.jsonl")
    chosen = ev.read_records(next((work / "selections" / "instruction_length").rglob("selected.jsonl")))
    words = sorted((len(f"{r['instruction']} {r['input']}".split()) for r in slice_recs),
                   reverse=True)
    assert min(len(f"{r['instruction']} {r['input']}".split()) for r in chosen) >= words[7]
    # no evaluation record is trained on, and selection never saw `domain`
    eval_hashes = {ev.text_hash(r) for recs in ev.read_eval_sets(work / "eval_sets").values()
                   for r in recs}
    assert not eval_hashes & {ev.text_hash(r) for r in slice_recs}
    assert all("domain" not in r for r in slice_recs)
    assert (work / "summary" / "losses.png").stat().st_size > 0


def test_small_run_from_the_command_line_builds_its_config(tmp_path, monkeypatch):
    """`daar-ops sandbox --methods ... --seeds ... --n ...` without a YAML: the experiment is
    built (recipes written under --work-dir) and handed to the sandbox."""
    from daar_ops import cli
    from daar_ops.commands import sandbox as cmd

    seen = {}

    def fake_run(config, overrides=None, sandbox_path=None):
        seen["config"] = yaml.safe_load(open(config).read())
        seen["overrides"] = overrides
        return {"summary": {"summary": {"best_method": "random"}}}

    monkeypatch.setattr(cmd, "run_sandbox", fake_run)
    monkeypatch.setattr("torch.set_num_threads", lambda n: None)
    work = tmp_path / "sb"
    assert cli.main(["sandbox", "--methods", "random,instruction_length", "--seeds", "0",
                     "--n", "40", "--eval-per-domain", "2", "--work-dir", str(work)]) == 0
    cfg = seen["config"]
    assert cfg["work_dir"] == str(work)
    names = [next(iter(p)) for p in cfg["pipelines"]]
    assert names == ["prepare", "random", "instruction_length", "summary"]
    prepare = cfg["pipelines"][0]["prepare"]["probe_job_configs"][0]["extra_configs"]
    assert prepare["n"] == 40 and prepare["eval_per_domain"] == 2 and not prepare["daar_probe"]
    train = cfg["pipelines"][1]["random"]["execution_job_configs"][1]["extra_configs"]
    assert train["seeds"] == [0]
    recipe = cfg["pipelines"][2]["instruction_length"]["execution_job_configs"][0]["dj_configs"]
    assert recipe.startswith(str(work)) and yaml.safe_load(open(recipe).read())[
        "export_path"].startswith(str(work))
    assert cli.main(["sandbox", "--methods", "random,nope", "--work-dir", str(work)]) == 2


def test_small_run_end_to_end_from_the_command_line(sandbox, tiny_llama, tmp_path, monkeypatch,
                                                    capsys):
    from daar_ops import cli

    monkeypatch.setenv("WANDB_MODE", "disabled")
    pool = write_tiny_pool(tmp_path / "pool.jsonl", per_domain=30)
    work = tmp_path / "sb"
    assert cli.main(["sandbox", "--methods", "random", "--seeds", "0", "--n", "40",
                     "--eval-per-domain", "2", "--model", str(tiny_llama), "--pool", str(pool),
                     "--work-dir", str(work)]) == 0
    assert "summary.summary: " in capsys.readouterr().out
    assert (work / "summary" / "results.json").exists()
