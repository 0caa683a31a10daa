import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
BASELINES = REPO / "recipes" / "baselines"
OURS = ("random", "instruction_length", "ifd", "alpagasus")


def _compare_module():
    import daar_ops.compare_methods  # the runner ships in the package (tools/ only wraps it)

    return daar_ops.compare_methods


def _recipe(name):
    return yaml.safe_load((BASELINES / f"{name}.yaml").read_text())


def _params(recipe):
    return [(op, params or {}) for entry in recipe["process"] for op, params in entry.items()]


@pytest.mark.parametrize("name", OURS)
def test_recipe_selects_the_comparison_ratio_with_registered_ops_and_local_models(name):
    from data_juicer.ops import OPERATORS

    import daar_ops.ops  # noqa: F401
    from daar_ops.models import KNOWN_MODELS

    recipe = _recipe(name)
    assert recipe["dataset_path"] == "../shared/data/daar_pool/daar_pool.jsonl.gz"
    assert recipe["text_keys"] == "instruction"
    ops = _params(recipe)
    assert all(op in OPERATORS.modules for op, _ in ops)
    last_op, last = ops[-1]
    assert last_op.endswith("_selector")
    ratios = [last[k] for k in _compare_module().RATIO_KEYS if k in last]
    if "topk" not in last:  # a count is checked against the pool below
        assert ratios == [_compare_module().DEFAULT_RATIO]
    for _, params in ops:
        for key in ("hf_model", "api_or_hf_model"):
            if key in params:  # a prepared local model, never a hub id
                assert params[key] in KNOWN_MODELS


@pytest.mark.integration
def test_a_count_budget_is_the_ratio_of_the_recipes_own_pool(shared_pool):
    """A baseline that keeps a count (IFD's ``topk``: its filter drops samples before the
    selector) keeps the comparison ratio of the pool its recipe reads, by the one budget rule."""
    from daar_ops.core import budget, read_jsonl

    cm = _compare_module()
    counted = [name for name in OURS if "topk" in _params(_recipe(name))[-1][1]]
    assert counted  # the case this test is about exists
    for name in counted:
        recipe = _recipe(name)
        assert (REPO / recipe["dataset_path"]).resolve() == shared_pool.resolve()
        n = len(read_jsonl(shared_pool)[0])
        assert _params(recipe)[-1][1]["topk"] == budget(n, ratio=cm.DEFAULT_RATIO), name


@pytest.mark.parametrize("name", OURS)
def test_recipe_never_reads_the_domain_field(name):
    body = "\n".join(line.split("#", 1)[0] for line in
                     (BASELINES / f"{name}.yaml").read_text().splitlines())
    assert not re.search(r"\bdomain\b|\bsource\b", body)


def test_recipes_pass_data_juicer_config_validation(tmp_path):
    from data_juicer.config import init_configs

    for name in OURS:
        cfg = init_configs(["--config", str(BASELINES / f"{name}.yaml"),
                            "--export_path", str(tmp_path / name / "s.jsonl")])
        assert [next(iter(p)) for p in cfg.process] == [op for op, _ in _params(_recipe(name))]


def test_derive_recipe_points_at_slice_and_fixes_budget_and_models(tmp_path):
    cm = _compare_module()
    from daar_ops.models import prepared_path

    derived = cm.derive_recipe(_recipe("ifd"), tmp_path / "in.jsonl", tmp_path / "out.jsonl",
                               0.2, 1000)
    assert derived["dataset_path"] == str(tmp_path / "in.jsonl")
    assert derived["use_cache"] is False
    ops = dict(_params(derived))
    assert ops["topk_specified_field_selector"]["topk"] == 200
    assert ops["instruction_following_difficulty_filter"]["hf_model"] == \
        str(prepared_path("smollm2-135m-instruct"))
    derived = cm.derive_recipe(_recipe("random"), tmp_path / "a", tmp_path / "b", 0.1, 50)
    assert dict(_params(derived))["random_selector"]["select_ratio"] == 0.1


def test_method_discovery_and_result_line():
    cm = _compare_module()
    found = cm.discover_methods({"extra": "/x.yaml"})
    assert {"random", "instruction_length", "ifd", "alpagasus", "extra"} <= set(found)
    rows = [{"method": "random", "status": "ok", "fl_coverage": 0.5, "domain_entropy": 1.3},
            {"method": "daar", "status": "ok", "fl_coverage": 0.6, "domain_entropy": 1.35},
            {"method": "ifd", "status": "failed (rc=1)"}]
    assert cm.result_line(rows) == ("RESULT methods=2 best_coverage=daar "
                                    "daar_domain_entropy=1.3500 random_domain_entropy=1.3000")
    assert cm.result_line(rows[:1]).endswith("daar_domain_entropy=nan random_domain_entropy=1.3000")


@pytest.mark.integration
def test_slice_hides_evaluation_fields(tmp_path, shared_pool):
    cm = _compare_module()
    inp, ev, n = cm.write_slice(shared_pool, 30, 0, tmp_path)
    assert n == 30
    ins = [json.loads(l) for l in inp.read_text().splitlines()]
    evs = [json.loads(l) for l in ev.read_text().splitlines()]
    assert all("domain" not in r and "source" not in r for r in ins)
    assert all("domain" in r for r in evs)
    assert [r["instruction"] for r in ins] == [r["instruction"] for r in evs]
    (tmp_path / "again").mkdir()
    again, _, _ = cm.write_slice(shared_pool, 30, 0, tmp_path / "again")
    assert again.read_text() == inp.read_text()  # same seed, same slice


@pytest.mark.integration
def test_compare_tool_on_a_tiny_slice(tmp_path, minilm_path):
    """random + instruction length through dj-process, the report, the table and RESULT line."""
    out = tmp_path / "cmp"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "compare_methods.py"), "--n", "20",
                           "--methods", "random,instruction_length", "--out", str(out),
                           "--max-points", "20"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    last = proc.stdout.strip().splitlines()[-1]
    m = re.fullmatch(r"RESULT methods=2 best_coverage=(random|instruction_length) "
                     r"daar_domain_entropy=nan random_domain_entropy=([0-9.]+)", last)
    assert m, last
    assert 0 <= float(m.group(2)) <= math.log(4) + 1e-9
    rows = (out / "comparison.csv").read_text().splitlines()
    assert rows[0].startswith("method,status,n_selected")
    assert len(rows) == 3 and all(",ok,4," in r for r in rows[1:])
    # instruction length really keeps the 8 longest instruction+input by words
    sliced = [json.loads(l) for l in (out / "slice_input.jsonl").read_text().splitlines()]
    words = sorted((len(f"{r.get('instruction') or ''} {r.get('input') or ''}".split())
                    for r in sliced), reverse=True)
    picked = [json.loads(l) for l in
              (out / "methods" / "instruction_length" / "selected.jsonl").read_text().splitlines()]
    assert sorted((int(r["__dj__stats__"]["instruction_input_words"]) for r in picked),
                  reverse=True) == words[:4]
    assert all("domain" not in r for r in picked)
    assert (out / "report" / "report.md").exists() and (out / "comparison.md").exists()


@pytest.mark.integration
def test_ifd_recipe_runs_on_a_handful_of_records(tmp_path, smollm2_path, shared_pool):
    cm = _compare_module()
    inp, _, n = cm.write_slice(shared_pool, 3, 1, tmp_path)
    res = cm.run_method("ifd", BASELINES / "ifd.yaml", inp, tmp_path, 0.34, n, timeout=500)
    assert res["status"] == "ok", res
    picked = [json.loads(l) for l in Path(res["export"]).read_text().splitlines()]
    assert len(picked) == 1  # topk = budget(3, ratio=0.34) = 1; these records have IFD <= 1
    scores = [r["__dj__stats__"]["ifd_score"] for r in picked]
    assert all(0 <= s <= 1 for s in scores)


def test_reuse_takes_a_recorded_run_only_for_the_same_slice(tmp_path, monkeypatch):
    cm = _compare_module()
    slice_file = tmp_path / "slice_input.jsonl"
    slice_file.write_text('{"instruction": "a"}\n')
    method_dir = tmp_path / "methods" / "random"
    method_dir.mkdir(parents=True)
    export = method_dir / "selected.jsonl"
    export.write_text('{"instruction": "a"}\n')
    recorded = {"method": "random", "status": "ok", "runtime_s": 3.0, "export": str(export),
                "slice_sha256": cm._sha256(slice_file)}
    (method_dir / "run.json").write_text(json.dumps(recorded))
    calls = []
    monkeypatch.setattr(cm, "_run_method", lambda *a: calls.append(a) or {"status": "failed"})
    assert cm.run_method("random", BASELINES / "random.yaml", slice_file, tmp_path, 0.2, 1,
                         None, reuse=True) == recorded
    assert calls == []
    slice_file.write_text('{"instruction": "b"}\n')  # another slice: run again
    cm.run_method("random", BASELINES / "random.yaml", slice_file, tmp_path, 0.2, 1, None,
                  reuse=True)
    assert len(calls) == 1
