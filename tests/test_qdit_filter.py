"""qdit_filter: the Data-Juicer adapter of QDIT (selection, stats, bad input, Ray, recipe)."""

from __future__ import annotations

import gzip
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from daar_ops.algorithms.qdit import qdit_select
from daar_ops.text import TemplateFieldError

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "baselines" / "qdit.yaml"


def _fake_encoder(texts, model="all-minilm-l6-v2", batch_size=64, device="cpu", normalize=True,
                  progress=True, encoder=None):
    """Deterministic 16-d vectors from the text (same text -> same vector), no model load."""
    out = np.zeros((len(texts), 16), dtype=np.float32)
    for i, t in enumerate(texts):
        seed = sum(ord(ch) * (j + 1) for j, ch in enumerate(str(t))) % (2**32)
        out[i] = np.random.default_rng(seed).normal(size=16)
    return out


@pytest.fixture()
def fake_encoder(monkeypatch):
    import daar_ops.encoders
    import daar_ops.model_keys

    calls = []

    def encoder(texts, **kw):
        calls.append(list(texts))
        return _fake_encoder(texts, **kw)

    monkeypatch.setattr(daar_ops.encoders, "encode_sentences", encoder)
    # the op holds its encoder through get_model: no real model is loaded either
    monkeypatch.setitem(daar_ops.model_keys.LOADERS, "sentence_encoder",
                        lambda model="", device="cpu": object())
    return calls


def _records(n=40):
    return [{"instruction": f"task number {i} about topic {i % 7}", "input": "",
             "output": f"answer {i}", "score": float(i % 10)} for i in range(n)]


def _op(**kw):
    from daar_ops.ops.qdit_selector import QditFilter

    kw.setdefault("text_key", "instruction")
    return QditFilter(**kw)


def _run(op, records):
    from data_juicer.core.data import NestedDataset

    return NestedDataset.from_list(records).process(op).to_list()


def test_registered_and_selects_budget_in_original_order(fake_encoder):
    from data_juicer.ops import OPERATORS

    import daar_ops.ops  # noqa: F401

    assert "qdit_filter" in OPERATORS.modules
    records = _records(40)
    out = _run(_op(select_ratio=0.25, text_template="{instruction} {input}"), records)
    assert len(out) == 10
    # exactly what the algorithm picks on the same embeddings, kept in dataset order
    texts = [f"{r['instruction']} {r['input']}".strip() for r in records]
    expected = qdit_select(_fake_encoder(texts), select_num=10, progress=False)
    kept = [int(r["instruction"].split()[2]) for r in out]
    assert kept == sorted(expected.indices.tolist())
    ranks = {int(r["instruction"].split()[2]): r["__dj__stats__"]["qdit_rank"] for r in out}
    assert [ranks[i] for i in expected.indices.tolist()] == list(range(10))
    for r in out:
        assert isinstance(r["__dj__stats__"]["qdit_rank"], int)
        assert isinstance(r["__dj__stats__"]["qdit_gain"], float)
        assert r["__dj__stats__"]["qdit_gain"] > 0
    assert fake_encoder[0] == texts


def test_quality_from_nested_stats_with_bad_values(fake_encoder):
    records = _records(30)
    for i, r in enumerate(records):
        r["__dj__stats__"] = {"llm_quality_score": float(i)}
    records[3]["__dj__stats__"]["llm_quality_score"] = float("nan")
    records[4]["__dj__stats__"] = {"other": 1.0}  # missing key
    records[29]["__dj__stats__"]["llm_quality_score"] = float("inf")
    out = _run(_op(select_num=5, alpha=0.9, quality_key="__dj__stats__.llm_quality_score"),
               records)
    kept = sorted(int(r["instruction"].split()[2]) for r in out)
    assert len(kept) == 5
    assert {3, 4, 29}.isdisjoint(kept)  # invalid quality counts as the worst
    assert min(kept) >= 20  # quality dominates at alpha 0.9
    assert all(r["__dj__stats__"].get("other") is None or r["__dj__stats__"]["other"] == 1.0
               for r in out)


def test_bad_and_missing_text_fields_do_not_raise(fake_encoder):
    records = _records(12)
    records[0]["instruction"] = ""
    records[1]["instruction"] = "   "
    records[2]["instruction"] = "x" * 200_000
    out = _run(_op(select_num=6, text_template="{instruction}"), records)
    assert len(out) == 6
    with pytest.raises(TemplateFieldError, match="nonexistent"):  # a typo is an error
        _run(_op(select_num=6, text_template="{instruction} {nonexistent}"), records)


def test_small_and_empty_datasets(fake_encoder):
    records = _records(4)
    out = _run(_op(select_num=10), records)
    assert len(out) == 4
    assert sorted(r["__dj__stats__"]["qdit_rank"] for r in out) == [0, 1, 2, 3]
    from data_juicer.core.data import NestedDataset

    empty = NestedDataset.from_list(_records(1)).select([])
    assert len(empty.process(_op(select_ratio=0.5))) == 0


def test_deterministic_stochastic_mode(fake_encoder):
    a = _run(_op(select_num=8, method="stochastic", epsilon=0.2, seed=3), _records(50))
    b = _run(_op(select_num=8, method="stochastic", epsilon=0.2, seed=3), _records(50))
    assert [r["instruction"] for r in a] == [r["instruction"] for r in b]


@pytest.mark.parametrize("bad", [
    dict(), dict(select_ratio=0.2, select_num=3), dict(select_ratio=2.0), dict(select_num=-1),
    dict(select_ratio=0.2, alpha=0.5), dict(select_ratio=0.2, alpha=1.5, quality_key="q"),
    dict(select_ratio=0.2, method="naive"), dict(select_ratio=0.2, similarity="faiss"),
    dict(select_ratio=0.2, epsilon=0.0), dict(select_ratio=0.2, diversity_scale="sum"),
    dict(select_ratio=0.2, diversity_scale=0), dict(select_ratio=0.2, quality_fill="mode"),
    dict(select_ratio=0.2, compute_dtype="int8"), dict(select_ratio=0.2, partition_size=0), dict(select_ratio=0.2, embedder="clip"),
    dict(select_ratio=0.2, embedder="daar_features", layer=0),
    dict(select_ratio=0.2, similarity="dense"), dict(select_ratio=0.2, diversity_scale="mean"),
])
def test_invalid_parameters_fail_at_construction(bad):
    with pytest.raises(ValueError):
        _op(**bad)


def test_is_a_selector_accepted_by_ray_preflight_as_a_pipeline():
    from types import SimpleNamespace

    from data_juicer.core.preflight import post_instantiation_check
    from data_juicer.ops.base_op import Filter, Pipeline, Selector

    op = _op(select_ratio=0.2)
    assert isinstance(op, Selector) and isinstance(op, Pipeline) and not isinstance(op, Filter)
    post_instantiation_check([op], None, SimpleNamespace(executor_type="ray"))
    with pytest.raises(Exception, match="does not support executor mode 'ray_partitioned'"):
        post_instantiation_check([op], None, SimpleNamespace(executor_type="ray_partitioned"))


def test_op_is_picklable(fake_encoder):
    import dill  # what HF datasets / Data-Juicer use to ship ops to workers

    op = _op(select_ratio=0.3, quality_key="score", alpha=0.5)
    clone = dill.loads(dill.dumps(op))
    assert clone.config == op.config


def test_daar_layer_features_option(tiny_llama):
    out = _run(_op(select_num=4, embedder="daar_features", model=str(tiny_llama),
                   feature="layer", layer=2, text_template="{instruction} {output}"),
               _records(10))
    assert len(out) == 4
    out = _run(_op(select_num=3, embedder="daar_features", model=str(tiny_llama),
                   feature="embedding"), _records(10))
    assert len(out) == 3


def test_recipe_shape():
    recipe = yaml.safe_load(RECIPE.read_text())
    body = "\n".join(line.split("#", 1)[0] for line in RECIPE.read_text().splitlines())
    assert "domain" not in body and "source" not in body
    (op, params), = [next(iter(p.items())) for p in recipe["process"]][-1:]
    assert op == "qdit_filter" and params["select_ratio"] == 0.2
    assert recipe["dataset"]["configs"][0]["path"] == "../shared/data/daar_pool/daar_pool.jsonl.gz"


@pytest.mark.integration
def test_dj_process_recipe_on_a_small_slice(tmp_path, shared_pool, minilm_path):
    src = tmp_path / "slice.jsonl"
    with gzip.open(shared_pool, "rt", encoding="utf-8") as fh, src.open("w") as out:
        for _, line in zip(range(50), fh):
            out.write(line)
    recipe = yaml.safe_load(RECIPE.read_text())
    recipe.pop("dataset", None)
    recipe.update(dataset_path=str(src), export_path=str(tmp_path / "out" / "sel.jsonl"),
                  work_dir=str(tmp_path / "work"))
    cfg = tmp_path / "qdit.yaml"
    cfg.write_text(yaml.safe_dump(recipe))
    dj = Path(sys.executable).with_name("dj-process")
    proc = subprocess.run([str(dj), "--config", str(cfg)], cwd=REPO, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "out" / "sel.jsonl").open()]
    assert len(rows) == 10
    ranks = sorted(r["__dj__stats__"]["qdit_rank"] for r in rows)
    assert ranks == list(range(10))
    assert all(math.isfinite(r["__dj__stats__"]["qdit_gain"]) for r in rows)


def test_lower_is_better_quality_is_negated(fake_encoder):
    rows = _records(30)
    for i, r in enumerate(rows):
        r["score"] = float(i)
    high = _run(_op(select_num=5, quality_key="score", alpha=1.0), rows)
    low = _run(_op(select_num=5, quality_key="score", alpha=1.0,
                   quality_higher_is_better=False), rows)
    assert sorted(r["score"] for r in high) == [25.0, 26.0, 27.0, 28.0, 29.0]
    assert sorted(r["score"] for r in low) == [0.0, 1.0, 2.0, 3.0, 4.0]


def test_ray_plan_is_exact_while_the_embeddings_fit_the_driver():
    """Under Ray: exact on the driver unless partition_size is set below N (partitions of that
    size) or the embeddings exceed driver_memory_mb (partitions = Ray's blocks)."""
    from daar_ops.ops._qdit_ray import ray_plan

    assert ray_plan(1000, 1.5, None, 2.0) == (False, None)
    assert ray_plan(1000, 2.5, None, 2.0) == (True, None)
    assert ray_plan(1000, 2.5, 300, 2.0) == (True, 300)
    assert ray_plan(200, 99.0, 300, 2.0) == (False, 300)
    assert _op(select_ratio=0.2).driver_memory_mb is None
    with pytest.raises(ValueError, match="driver_memory_mb"):
        _op(select_ratio=0.2, driver_memory_mb=-1.0)
