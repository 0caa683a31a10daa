"""DS2 operators: ds2_rating_filter and ds2_filter inside Data-Juicer."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from itertools import islice
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from daar_research.ds2 import make_synthetic_ds2
from data_juicer.core.data import NestedDataset
from data_juicer.utils.constant import Fields

from daar_ops.ops import ds2_rating_filter as rating_module
from daar_ops.ops.ds2_selector import STATS_KEYS, DS2Filter
from daar_ops.ops.ds2_rating_filter import DS2RatingFilter

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parents[1]
# 10 rounds: with fewer, the smoothed flagged-round suggestion share (c+1)/(F+K) never reaches
# the 0.5 confidence needed to replace a score
FAST = dict(hoc_steps=200, detection_rounds=10)


def _synthetic_rows(n=400, seed=1):
    data = make_synthetic_ds2(n=n, dim=16, seed=seed)
    rows = [dict(text=f"sample {i}", vec=data["embeddings"][i].tolist(),
                 quality=float(data["observed"][i])) for i in range(n)]
    return rows, data


def _stats(dataset):
    return [row[Fields.stats] for row in dataset]


# -- ds2_filter ------------------------------------------------------------------------------------

def test_ds2_filter_selects_best_curated_and_writes_report(tmp_path):
    rows, data = _synthetic_rows()
    op = DS2Filter(score_key="quality", embedding_key="vec", select_ratio=0.2,
                   report_dir=str(tmp_path / "report"), **FAST)
    out = op.run(NestedDataset.from_list(rows))
    assert len(out) == 80
    stats = _stats(out)
    for s in stats:
        assert set(STATS_KEYS) <= set(s) and all(isinstance(s[k], float) for k in STATS_KEYS)
        assert s["ds2_selected"] == 1.0
    # curation helped on this clusterable data, and the kept samples are the best curated ones
    analysed = DS2Filter(score_key="quality", embedding_key="vec", **FAST).run(
        NestedDataset.from_list(rows))
    assert len(analysed) == 400  # no budget: keeps everything, only writes stats
    curated = np.array([s["ds2_curated_score"] for s in _stats(analysed)])
    assert (curated == data["true"]).mean() > (data["observed"] == data["true"]).mean() + 0.1
    assert min(s["ds2_curated_score"] for s in stats) >= np.sort(curated)[-80]
    assert {"transition.json", "transition.png", "score_distribution.png"} <= \
        {p.name for p in (tmp_path / "report").iterdir()}
    # determinism: same input + seed -> same selection
    again = op.run(NestedDataset.from_list(rows))
    assert [r["text"] for r in again] == [r["text"] for r in out]


def test_ds2_filter_through_an_ivf_index_probing_every_cell_selects_as_exact():
    rows, _ = _synthetic_rows(n=200)
    exact = DS2Filter(score_key="quality", embedding_key="vec", select_ratio=0.2, **FAST).run(
        NestedDataset.from_list(rows))
    ivf = DS2Filter(score_key="quality", embedding_key="vec", select_ratio=0.2,
                    knn_index="ivf", knn_params={"nlist": 4, "nprobe": 4}, **FAST).run(
        NestedDataset.from_list(rows))
    assert [r["text"] for r in ivf] == [r["text"] for r in exact]


def test_ds2_filter_reads_stats_fields_and_survives_bad_scores():
    rows, _ = _synthetic_rows(n=120)
    for i, row in enumerate(rows):
        row[Fields.stats] = {"llm_quality_score": row.pop("quality") / 5.0}
    rows[0][Fields.stats]["llm_quality_score"] = None
    rows[1][Fields.stats]["llm_quality_score"] = float("nan")
    rows[2][Fields.stats] = {}
    op = DS2Filter(score_key="llm_quality_score", score_low=0.0, score_high=1.0,
                   embedding_key="vec", **FAST)
    out = op.run(NestedDataset.from_list(rows))
    assert len(out) == 120
    stats = _stats(out)
    assert [stats[i]["ds2_raw_score"] for i in range(3)] == [0.0, 0.0, 0.0]
    assert stats[5]["ds2_raw_score"] == round(rows[5][Fields.stats]["llm_quality_score"] * 5)


def test_ds2_filter_refuses_a_score_key_no_sample_has():
    rows, _ = _synthetic_rows(n=20)
    with pytest.raises(ValueError, match="no sample has a numeric 'qualty'"):
        DS2Filter(score_key="qualty", embedding_key="vec").run(NestedDataset.from_list(rows))


def test_ds2_filter_small_and_empty_datasets():
    empty = DS2Filter(score_key="quality", embedding_key="vec", select_num=5)
    assert len(empty.run(NestedDataset.from_list([]))) == 0
    two = [dict(text="a", vec=[1.0, 0.0], quality=3.0), dict(text="b", vec=[0.0, 1.0], quality=5.0)]
    out = DS2Filter(score_key="quality", embedding_key="vec", select_num=1).run(
        NestedDataset.from_list(two))
    assert [r["text"] for r in out] == ["b"]
    rows, _ = _synthetic_rows(n=30)
    rows[4]["vec"] = None  # malformed vector: zero vector, not a crash
    out = DS2Filter(score_key="quality", embedding_key="vec", select_num=100, **FAST).run(
        NestedDataset.from_list(rows))
    assert len(out) == 30  # a budget larger than the data keeps everything


@pytest.mark.parametrize("kwargs", [
    dict(select_ratio=1.5), dict(select_ratio=0.2, select_num=3), dict(select_num=-1),
    dict(k=1), dict(confidence_threshold=2.0), dict(score_low=5.0, score_high=1.0),
    dict(subset_fraction=0.0), dict(k=10, k_pool=5), dict(num_classes=1),
    dict(knn_index="annoy"), dict(knn_params=[8]),
])
def test_ds2_filter_validates_parameters(kwargs):
    with pytest.raises(ValueError):
        DS2Filter(**kwargs)


def test_ds2_filter_is_a_selector_under_its_design_card_name():
    from data_juicer.ops.base_op import OPERATORS, Filter, Selector

    op = OPERATORS.modules["ds2_filter"](select_ratio=0.2)
    assert isinstance(op, Selector) and not isinstance(op, Filter)
    assert op._name == "ds2_filter"
    # a Pipeline under Ray (tests/test_ray.py checks the rows), not the partitioned executor
    assert op._supported_exec_modes == ("default", "ray")


def test_ds2_filter_passes_ray_preflight_and_refuses_partitioned():
    from types import SimpleNamespace

    from data_juicer.core.preflight import post_instantiation_check

    op = DS2Filter(select_ratio=0.2)
    post_instantiation_check([op], None, SimpleNamespace(executor_type="default"))
    post_instantiation_check([op], None, SimpleNamespace(executor_type="ray"))
    with pytest.raises(Exception, match="does not support executor mode 'ray_partitioned'"):
        post_instantiation_check([op], None, SimpleNamespace(executor_type="ray_partitioned"))


# -- ds2_rating_filter -----------------------------------------------------------------------------

def _rating_rows():
    # Arrow needs one type per column: the non-string field is a number column (``num``).
    return [
        dict(instruction="Solve 12 * 7.", input="", output="The answer is 84.", num=1),
        dict(instruction="", input=None, output="", num=None),  # empty text
        dict(instruction="Add.", input=None, output="3", num=12345),  # non-string value
        dict(instruction="Explain photosynthesis. " * 400, input="", output="Plants make sugar.",
             num=2),  # long
    ]


def test_rating_probability_mode_with_tiny_model(tiny_llama):
    template = "{instruction} {input} {output} {num}"
    op = DS2RatingFilter(model=str(tiny_llama), text_template=template, max_sample_chars=500,
                         num_proc=1)
    ds = NestedDataset.from_list(_rating_rows())
    out = op.run(ds)
    assert len(out) == 4  # rates only, drops nothing
    stats = _stats(out)
    for s in stats:
        assert all(isinstance(s[k], float) for k in
                   ("ds2_rating", "ds2_score", "ds2_rating_failures", "ds2_rating_mass"))
        assert 0.0 <= s["ds2_rating"] <= 5.0 and s["ds2_score"] == round(s["ds2_rating"])
        assert s["ds2_rating_failures"] == 0.0
    again = _stats(DS2RatingFilter(model=str(tiny_llama), text_template=template,
                                   max_sample_chars=500, num_proc=1).run(ds))
    assert [s["ds2_rating"] for s in again] == [s["ds2_rating"] for s in stats]


def test_rating_generate_mode_survives_junk_generations(tiny_llama):
    op = DS2RatingFilter(mode="generate", model=str(tiny_llama), try_num=2, max_new_tokens=4,
                         text_template="{instruction} {output}", min_score=0.0,
                         num_proc=1)
    out = op.run(NestedDataset.from_list(_rating_rows()[:2]))
    assert len(out) == 2
    for s in _stats(out):  # a random model writes no JSON: every attempt fails, rating 0 (DS2)
        assert s["ds2_rating_failures"] == 2.0
        assert s["ds2_rating"] == 0.0 and s["ds2_score"] == 0.0


class _ScriptedGenerator:
    """Answers junk first, then a rating that depends on the sample."""

    def __init__(self):
        self.calls = 0

    def generate(self, conversations, **kwargs):
        self.calls += 1
        if self.calls == 1:
            return ["no json here"] * len(conversations)
        return ['{"Overall rating": 9}' if "good" in c[0]["content"] else "{'Overall rating': 5}"
                for c in conversations]


def test_rating_generate_mode_retries_compresses_and_filters(monkeypatch):
    scripted = _ScriptedGenerator()
    monkeypatch.setattr(DS2RatingFilter, "_generator", lambda self, rank=None: scripted)
    op = DS2RatingFilter(mode="generate", backend="api", model="some-api-model", try_num=3,
                         min_score=3.0, num_proc=1)
    rows = [dict(text="a good sample"), dict(text="a plain sample")]
    out = op.run(NestedDataset.from_list(rows))
    assert [r["text"] for r in out] == ["a good sample"]  # class 5 kept, class 1 dropped
    s = out[0][Fields.stats]
    assert s["ds2_rating"] == 9.0 and s["ds2_score"] == 5.0 and s["ds2_rating_failures"] == 1.0


@pytest.mark.parametrize("kwargs", [
    dict(mode="vote"), dict(backend="openai"), dict(mode="probability", backend="api"),
    dict(try_num=0), dict(min_score=4, max_score=1), dict(top_p=0.0),
])
def test_rating_validates_parameters(kwargs):
    with pytest.raises(ValueError):
        DS2RatingFilter(**kwargs)


def test_ops_are_registered():
    from data_juicer.ops import OPERATORS

    assert OPERATORS.get("ds2_filter") is DS2Filter
    assert OPERATORS.get("ds2_rating_filter") is DS2RatingFilter
    assert rating_module.SCORE_KEY == "ds2_score"


# -- the recipe with the real models ---------------------------------------------------------------

@pytest.mark.integration
def test_recipe_runs_with_dj_process(tmp_path, shared_pool, smollm2_path, minilm_path):
    with gzip.open(shared_pool, "rt") as handle:
        records = [json.loads(line) for line in islice(handle, 10)]
    data = tmp_path / "slice.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    recipe = yaml.safe_load((REPO / "recipes" / "baselines" / "ds2.yaml").read_text())
    recipe.pop("dataset")
    recipe.update(dataset_path=str(data), export_path=str(tmp_path / "out" / "selected.jsonl"))
    recipe["process"][0]["ds2_rating_filter"]["max_sample_chars"] = 200
    recipe["process"][1]["ds2_filter"].update(select_ratio=None, select_num=3,
                                              report_dir=str(tmp_path / "report"))
    config = tmp_path / "ds2.yaml"
    config.write_text(yaml.safe_dump(recipe))
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1")
    dj = Path(sys.executable).with_name("dj-process")
    done = subprocess.run([str(dj), "--config", str(config)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    out = [json.loads(line) for line in (tmp_path / "out" / "selected.jsonl").open()]
    assert len(out) == 3
    for row in out:
        stats = row[Fields.stats]
        assert 0.0 <= stats["ds2_score"] <= 5.0 and stats["ds2_selected"] == 1.0
        assert set(STATS_KEYS) <= set(stats)
    assert (tmp_path / "report" / "transition.png").exists()
