"""diversity_reward_filter and the global selection rules it uses."""

from __future__ import annotations

import json
import math
import random
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from daar_ops.algorithms.probes import TrainConfig
from daar_ops.core import budget
from daar_ops.algorithms.selection import (SelectionRule, quota_mask, range_mask, rank_order,
                                           top_mask)
from daar_ops.probe_checkpoint import train_probe_checkpoint
from daar_ops.text import TemplateFieldError

DOMAINS = ["coding", "math", "qa"]
REWARD, PROBS, DOMAIN = "daar_diversity_reward", "daar_domain_probs", "daar_probe_domain"
WORDS = {"coding": "def return list sort function code loop", "math": "12 7 84 sum solve x",
         "qa": "capital France Paris what who where"}


def records(n: int, seed: int = 0, label: bool = True) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        dom = DOMAINS[i % 3]
        # some samples mix two vocabularies: they get higher entropies
        w = WORDS[dom].split() + (WORDS[DOMAINS[(i + 1) % 3]].split() if i % 4 == 0 else [])
        rec = {"instruction": " ".join(rng.choice(w) for _ in range(6)), "input": "",
               "output": " ".join(rng.choice(w) for _ in range(4)), "id": i}
        if label:
            rec["__dj__meta__"] = {"daar_pseudo_domain": dom}
        out.append(rec)
    return out


# -- selection (pure functions) --------------------------------------------------------------------

def test_top_mask_ties_break_by_index_and_non_finite_rank_last():
    scores = [0.5, 0.9, 0.5, float("nan"), 0.9, float("inf"), -0.1]
    assert list(rank_order(scores)) == [1, 4, 0, 2, 6, 3, 5]
    assert list(np.flatnonzero(top_mask(scores, select_num=3))) == [0, 1, 4]
    assert top_mask(scores, select_num=100).all()  # fewer samples than asked: keep all
    assert not top_mask([], select_ratio=0.2).any()


def test_select_ratio_keeps_the_budget_of_the_one_rule():
    rng = np.random.default_rng(0)
    for n in (1, 4, 5, 99, 40000):  # 99: floor(19.8) = 19 where round() would keep 20
        mask = top_mask(rng.random(n), select_ratio=0.2)
        assert mask.sum() == budget(n, ratio=0.2)
    s = rng.random(50)
    kept = top_mask(s, select_ratio=0.2)
    assert s[kept].min() > s[~kept].max()
    with pytest.raises(ValueError):
        top_mask(s, select_ratio=0.2, select_num=3)
    with pytest.raises(ValueError):
        top_mask(s, select_ratio=1.5)


def test_quota_mask_is_per_group():
    scores = np.arange(20, dtype=float)
    groups = ["a"] * 10 + ["b"] * 10
    mask = quota_mask(scores, groups, {"a": 0.5}, default_ratio=0.1)
    assert list(np.flatnonzero(mask)) == [5, 6, 7, 8, 9, 19]
    with pytest.raises(ValueError, match="no ratio"):
        quota_mask(scores, groups, {"a": 0.5})


def test_range_mask_rejects_non_finite():
    s = [0.1, 0.5, float("nan"), 0.9]
    assert list(range_mask(s, 0.2, None)) == [False, True, False, True]
    assert list(range_mask(s, None, 0.5)) == [True, True, False, False]
    assert range_mask(s).all()  # no threshold: nothing dropped


def test_selection_rule_combines_the_budget_with_thresholds_and_checks_quota_groups():
    scores = np.array([0.1, 0.9, 0.5, np.nan, 0.7])
    rule = SelectionRule(select_ratio=0.4, min_score=0.8)
    assert rule.mode == "ratio"  # the best 2 (rows 1 and 4), of which only row 1 is >= 0.8
    assert rule.mask(scores, [""] * 5).tolist() == [False, True, False, False, False]
    assert SelectionRule(select_num=2).mask(scores, [""] * 5).tolist() == \
        [False, True, False, False, True]
    assert SelectionRule(min_score=0.2).mode is None  # thresholds only: no global choice
    quota = SelectionRule(domain_ratios={"a": 1.0, "z": 0.5}, select_ratio=0.0)
    assert quota.mode == "quota" and quota.unknown_groups(["a", "b"]) == ["z"]
    assert quota.uncovered_groups(["a", "b"]) == []  # select_ratio covers "b"
    assert quota.mask(scores, ["a", "b", "a", "b", "b"]).tolist() == [True, False, True, False,
                                                                      False]
    assert SelectionRule(domain_ratios={"a": 0.5}).uncovered_groups(["a", "b"]) == ["b"]


def test_per_domain_keeps_the_ratio_inside_every_group_whatever_its_name():
    scores = np.array([0.1, 0.9, 0.5, 0.3, 0.7, 0.2, 0.8, 0.6])
    groups = ["x", "x", "y", "y", "x", "y", "z", "z"]
    rule = SelectionRule(select_ratio=0.5, per_domain=True)
    assert rule.mode == "quota" and rule.uncovered_groups(groups) == []
    # x: best 1 of 3 (0.9); y: best 1 of 3 (0.5); z: best 1 of 2 (0.8)
    assert rule.mask(scores, groups).tolist() == [False, True, True, False, False, False, True,
                                                  False]
    assert SelectionRule(select_ratio=0.5).mask(scores, groups).sum() == 4  # global: best 4
    listed = SelectionRule(select_ratio=0.5, per_domain=True, domain_ratios={"x": 1.0})
    assert listed.mask(scores, groups)[[0, 1, 4]].all()  # x keeps its own ratio
    with pytest.raises(ValueError, match="per_domain needs select_ratio"):
        SelectionRule(per_domain=True)
    with pytest.raises(ValueError, match="true or false"):
        SelectionRule(select_ratio=0.5, per_domain="yes")


# -- the operator ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def checkpoint(tiny_llama, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("probe") / "ck"
    cfg = TrainConfig(epochs=3, batch_size=16, lr=3e-3, val_fraction=0.2, hidden=[32, 16])
    train_probe_checkpoint(records(90), out, model=str(tiny_llama), layer=2, max_length=64,
                           config=cfg, use_cache=False, progress=False)
    return out


def make_op(checkpoint, **kw):
    from daar_ops.ops.diversity_reward_filter import DiversityRewardFilter

    kw.setdefault("num_proc", 1)
    return DiversityRewardFilter(checkpoint=str(checkpoint), **kw)


def dataset(rows):
    from data_juicer.core.data import NestedDataset

    return NestedDataset.from_list(rows)


def stats_of(ds):
    return list(ds["__dj__stats__"])


def test_op_is_registered_and_documents_its_stats():
    from data_juicer.ops import OPERATORS

    cls = OPERATORS.modules["diversity_reward_filter"]
    for key in (REWARD, PROBS, DOMAIN):
        assert key in cls.__doc__


def test_stats_have_fixed_types_and_threshold_mode_drops_only_below(checkpoint):
    op = make_op(checkpoint)
    ds = dataset([{k: v for k, v in r.items() if k != "__dj__meta__"} for r in records(30, 1)])
    with_stats = op.run(ds)  # no rule: every sample kept, stats added
    assert len(with_stats) == 30
    stats = stats_of(with_stats)
    assert all(type(s[REWARD]) is float for s in stats)
    assert all(len(s[PROBS]) == 3 and sum(s[PROBS]) == pytest.approx(1, abs=1e-5) for s in stats)
    assert all(s[DOMAIN] in DOMAINS for s in stats)
    scores = np.array([s[REWARD] for s in stats])
    threshold = float(np.median(scores))
    kept = make_op(checkpoint, min_score=threshold).run(ds)
    assert list(kept["id"]) == [i for i, s in zip(ds["id"], scores) if s >= threshold]


def test_select_ratio_is_global_and_keeps_order(checkpoint):
    ds = dataset(records(40, 2, label=False))
    all_scores = np.array([s[REWARD] for s in stats_of(make_op(checkpoint).run(ds))])
    kept = make_op(checkpoint, select_ratio=0.2).run(ds)
    expected = np.flatnonzero(top_mask(all_scores, select_ratio=0.2))
    assert list(kept["id"]) == list(expected) and len(expected) == 8
    again = make_op(checkpoint, select_ratio=0.2).run(ds)
    assert list(again["id"]) == list(kept["id"])  # deterministic
    assert len(make_op(checkpoint, select_num=500).run(ds)) == 40  # select_num > N keeps all


def test_quota_mode_keeps_a_fraction_per_predicted_domain(checkpoint):
    ds = dataset(records(45, 3, label=False))
    stats = stats_of(make_op(checkpoint).run(ds))
    doms = [s[DOMAIN] for s in stats]
    kept = make_op(checkpoint, domain_ratios={"coding": 1.0}, select_ratio=0.0).run(ds)
    assert list(kept["id"]) == [i for i, d in enumerate(doms) if d == "coding"]


def test_bad_samples_get_defined_stats_and_nothing_is_lost(checkpoint):
    rows = [{"instruction": "", "input": "", "output": ""},
            {"instruction": None, "input": None, "output": "only output"},
            {"instruction": "x" * 60000, "input": "", "output": "long"},
            {"instruction": "12 7", "input": "", "output": "84"}]
    ds = dataset(rows)
    out = make_op(checkpoint, batch_size=2, num_proc=2).run(ds)  # also: works in 2 workers
    assert len(out) == 4
    for s in stats_of(out):
        assert isinstance(s[REWARD], float) and math.isfinite(s[REWARD])
    empty = make_op(checkpoint, select_ratio=0.2).run(dataset(rows).select([]))
    assert len(empty) == 0


def test_non_finite_probe_outputs_get_the_documented_value(checkpoint, monkeypatch):
    from daar_ops.probe_checkpoint import DaarScorer

    real = DaarScorer.score_texts

    def with_a_nan(self, texts, progress=False):
        reward, probs, feats = real(self, texts, progress)
        reward[0] = np.nan
        return reward, probs, feats

    monkeypatch.setattr(DaarScorer, "score_texts", with_a_nan)
    ds = dataset(records(5, 5, label=False))
    stats = stats_of(make_op(checkpoint).run(ds))
    assert stats[0][REWARD] == -1.0 and stats[0][DOMAIN] == ""
    assert all(s[REWARD] > -1.0 for s in stats[1:])
    kept = make_op(checkpoint, select_num=4).run(ds)
    assert list(kept["id"]) == [1, 2, 3, 4]  # the invalid sample ranks last
    assert 0 not in make_op(checkpoint, min_score=-10.0).run(ds)["id"]  # and passes no threshold


def test_template_fields_the_dataset_lacks_are_an_error_naming_them(checkpoint):
    ds = dataset([{"text": "no alpaca fields at all"}, {"text": "another"}])
    with pytest.raises(TemplateFieldError, match=r"instruction, input, output.*columns: text"):
        make_op(checkpoint).run(ds)
    # a column that is null or missing in some samples renders as "" for them
    ds = dataset([{"instruction": "a", "input": None, "output": "b"},
                  {"instruction": None, "input": None, "output": None}])
    out = make_op(checkpoint).run(ds)
    assert len(out) == 2 and all(isinstance(s[REWARD], float) for s in stats_of(out))


def test_stats_of_this_checkpoint_are_kept_and_stale_ones_recomputed(checkpoint):
    from daar_ops.core import CHECKPOINT_SHA_KEY

    op = make_op(checkpoint)
    mine = {REWARD: 7.0, PROBS: [1.0, 0.0, 0.0], DOMAIN: "coding",
            CHECKPOINT_SHA_KEY: op.checkpoint_sha}
    stale = {REWARD: 8.0, PROBS: [1.0, 0.0, 0.0], DOMAIN: "coding", CHECKPOINT_SHA_KEY: "other"}
    unrecorded = {REWARD: 9.0, PROBS: [1.0, 0.0, 0.0], DOMAIN: "coding"}
    batch = {"instruction": ["a", "b", "c", "d", "e"], "input": [""] * 5,
             "output": ["c", "d", "e", "f", "g"],
             "__dj__stats__": [mine, {}, stale, unrecorded, None]}
    out = op.compute_stats_batched(batch, 0)  # rank passed positionally, as HF datasets does
    stats = out["__dj__stats__"]
    assert stats[0][REWARD] == 7.0  # produced by this checkpoint: kept
    for s in stats[1:]:  # missing, another checkpoint's, no digest, null: (re)computed
        assert isinstance(s[REWARD], float) and s[REWARD] not in (8.0, 9.0)
        assert s[CHECKPOINT_SHA_KEY] == op.checkpoint_sha
    assert list(op.process_batched(out, rank=0)) == [True] * 5


def test_op_is_picklable(checkpoint):
    import pickle

    import dill

    op = make_op(checkpoint, min_score=0.1)
    clone = dill.loads(dill.dumps(op))
    assert clone.model_key == op.model_key  # value-equal: one scorer per worker process
    assert pickle.loads(pickle.dumps(op.model_key)) == op.model_key


@pytest.mark.parametrize("kwargs, match", [
    (dict(checkpoint=""), "required"),
    (dict(min_score=2.0, max_score=1.0), "min_score"),
    (dict(select_ratio=1.5), "select_ratio"),
    (dict(top_ratio=1.5), "select_ratio"),  # the alias is checked as its name
    (dict(select_num=-1), "select_num"),
    (dict(top_k=2.5), "select_num"),
    (dict(select_num=3, select_ratio=0.2), "cannot be combined"),
    (dict(select_ratio=0.2, top_ratio=0.2), "alias top_ratio, not both"),
    (dict(select_num=3, top_k=3), "alias top_k, not both"),
    (dict(domain_ratios={"poetry": 0.5}, select_ratio=0.1), "poetry"),
    (dict(domain_ratios={"coding": 0.5}), "lacks"),
    (dict(domain_ratios={"coding": 2.0}, select_ratio=0.1), r"\[0, 1\]"),
    (dict(per_domain=True), "per_domain needs select_ratio"),
    (dict(per_domain=True, select_num=3), "per_domain needs select_ratio"),
    (dict(min_score=float("nan")), "finite"),
    (dict(model_batch_size=0), "model_batch_size"),
    (dict(select_ratio=0.2, max_batch_tokens=0), "max_batch_tokens"),
])
def test_invalid_parameters_are_refused_at_init(checkpoint, kwargs, match):
    from daar_ops.ops.diversity_reward_filter import DiversityRewardFilter

    kwargs = dict(dict(checkpoint=str(checkpoint)), **kwargs)
    with pytest.raises(ValueError, match=match):
        DiversityRewardFilter(**kwargs)


def test_checkpoint_of_another_model_is_refused(checkpoint, tiny_qwen2, tmp_path):
    with pytest.raises(ValueError, match="model_fingerprint"):
        make_op(checkpoint, model=str(tiny_qwen2))
    broken = tmp_path / "broken"
    shutil.copytree(checkpoint, broken)
    (broken / "probes.safetensors").write_bytes(b"not a tensor file")
    with pytest.raises(ValueError, match="checksum"):
        make_op(broken)


def test_global_rules_build_a_selector_and_ranges_stay_a_filter(checkpoint):
    from data_juicer.ops.base_op import Filter, Selector

    from daar_ops.ops.diversity_reward_filter import DiversityRewardSelector

    for kw in (dict(select_ratio=0.2), dict(select_num=3), dict(top_ratio=0.2), dict(top_k=3),
               dict(domain_ratios={"coding": 0.5}, select_ratio=0.1),
               dict(select_ratio=0.2, per_domain=True)):
        op = make_op(checkpoint, **kw)
        assert isinstance(op, DiversityRewardSelector) and not isinstance(op, Filter)
        assert op._name == "diversity_reward_filter"  # traced/logged under the recipe's name
    # the design card's top_ratio / top_k are aliases: the same rule as select_ratio / select_num
    assert make_op(checkpoint, top_ratio=0.2).rule == make_op(checkpoint, select_ratio=0.2).rule
    assert make_op(checkpoint, top_k=3).rule == make_op(checkpoint, select_num=3).rule
    ranged = make_op(checkpoint, min_score=0.3)
    assert isinstance(ranged, Filter) and not isinstance(ranged, Selector)
    assert isinstance(make_op(checkpoint, min_score=0.3, per_domain=False), Filter)
    assert "ray" in ranged._supported_exec_modes  # thresholds work under Ray
    with pytest.raises(ValueError, match="reversed_range"):
        make_op(checkpoint, select_ratio=0.2, reversed_range=True)


@pytest.mark.integration
def test_dj_process_recipe_keeps_the_top_20_percent_of_each_domain(checkpoint, tmp_path):
    rows = records(50, 4, label=False)
    data = tmp_path / "pool.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = Path(__file__).resolve().parents[1] / "recipes" / "daar" / "03_diversity_reward.yaml"
    dj = Path(sys.executable).with_name("dj-process")
    export = tmp_path / "out" / "selected.jsonl"
    result = subprocess.run(
        [str(dj), "--config", str(recipe), "--dataset_path", str(data), "--export_path",
         str(export), "--diversity_reward_filter.checkpoint", str(checkpoint),
         "--work_dir", str(tmp_path / "work")],
        capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    kept = [json.loads(line) for line in export.read_text().splitlines() if line.strip()]
    ids = [r["id"] for r in kept]
    assert ids == sorted(ids)
    scores = [r["__dj__stats__"][REWARD] for r in kept]
    op_stats = stats_of(make_op(checkpoint).run(dataset(rows)))
    op_scores = np.array([s[REWARD] for s in op_stats])
    # the recipe's per_domain: true: floor(0.2 * n) of each predicted domain
    expected = np.flatnonzero(quota_mask(op_scores, [s[DOMAIN] for s in op_stats], {},
                                         default_ratio=0.2))
    assert 0 < len(kept) <= 10
    assert ids == list(expected)
    assert scores == pytest.approx(list(op_scores[expected]), abs=1e-5)


def test_stats_are_read_as_arrow_columns_with_the_same_values_as_cells():
    from data_juicer.core.data import NestedDataset

    from daar_ops.core import REWARD_KEY
    from daar_ops.ops._selector import stats_values
    from daar_ops.ops.diversity_reward_filter import DOMAIN_KEY, reward_scores, reward_values

    cells = [{REWARD_KEY: 0.5, DOMAIN_KEY: "coding"}, None, {REWARD_KEY: 0.7, DOMAIN_KEY: ""},
             {REWARD_KEY: None, DOMAIN_KEY: "mathematics"}, {REWARD_KEY: 1.2, DOMAIN_KEY: None},
             {REWARD_KEY: 0.1, DOMAIN_KEY: "reasoning"}]
    ds = NestedDataset.from_dict({"text": list("abcdef"), "__dj__stats__": cells})
    ds = ds.select([5, 4, 3, 2, 1, 0])  # an indices mapping, as after a filter
    values = stats_values(ds, (REWARD_KEY, DOMAIN_KEY, "absent_key"))
    by_cell = [c or {} for c in cells[::-1]]
    assert values[REWARD_KEY] == [c.get(REWARD_KEY) for c in by_cell]
    assert values[DOMAIN_KEY] == [c.get(DOMAIN_KEY) for c in by_cell]
    assert values["absent_key"] == [None] * 6
    arrow = reward_values(values[REWARD_KEY], values[DOMAIN_KEY])
    np.testing.assert_array_equal(arrow, reward_scores(cells[::-1]))
    assert np.isnan(arrow).tolist() == [False, True, True, True, True, False]
    # a dataset without a struct stats column falls back to the cells
    plain = NestedDataset.from_dict({"text": ["a"], "__dj__stats__": ["not a dict"]})
    assert stats_values(plain, (REWARD_KEY,)) == {REWARD_KEY: [None]}
