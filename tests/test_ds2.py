"""DS2 algorithms: score compression, HOC, detection, long-tail, selection, rating parsing."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from daar_research.ds2 import make_synthetic_ds2, off_diagonal_transition

from daar_ops.algorithms.ds2 import (DS2Config, consensus_vectors, curate_scores,
                                     detect_corrupted, ds2_select, fit_transition_matrix,
                                     lexicographic_select, long_tail_scores, noise_rates,
                                     scores_to_classes)
from daar_ops.algorithms.knn import knn_cosine
from daar_ops.algorithms.rating import RatingConfig, build_prompt, parse_rating
from daar_ops.ds2_report import write_ds2_report
from daar_ops.raters import ScoreTokenRater

torch.set_num_threads(1)


# -- compression -----------------------------------------------------------------------------------

def test_ds2_compression_of_1_to_10_ratings():
    classes, invalid = scores_to_classes(list(range(1, 11)))
    assert classes.tolist() == [0, 0, 0, 0, 1, 2, 3, 4, 5, 5]
    assert not invalid.any()


def test_bad_scores_get_the_missing_value_and_are_flagged():
    classes, invalid = scores_to_classes([None, float("nan"), "junk", float("inf"), True, "7", 9])
    assert invalid.tolist() == [True, True, True, True, True, False, False]
    assert classes.tolist() == [0, 0, 0, 0, 0, 3, 5]
    classes, _ = scores_to_classes([None, 0.9], low=0.0, high=1.0, num_classes=6, missing=0.5)
    assert classes.tolist() == [3, 5]  # 0.5 -> 2.5 rounds half up


def test_compression_validates_its_range():
    with pytest.raises(ValueError):
        scores_to_classes([1.0], low=5, high=5)
    with pytest.raises(ValueError):
        scores_to_classes([1.0], num_classes=1)


# -- HOC -------------------------------------------------------------------------------------------

def _exact_consensus(t: np.ndarray, p: np.ndarray):
    c1 = p @ t
    c2 = t.T @ (p[:, None] * t)
    c3 = np.einsum("i,ij,il,im->jlm", p, t, t, t)
    return c1, c2, c3


def test_hoc_fit_recovers_t_and_p_from_exact_consensus():
    t = off_diagonal_transition(4, off_mass=0.35)
    p = np.array([0.1, 0.2, 0.3, 0.4])
    est_t, est_p, loss = fit_transition_matrix(*_exact_consensus(t, p))
    assert np.abs(est_t - t).max() < 0.02
    assert np.abs(est_p - p).max() < 0.02
    assert np.allclose(est_t.sum(axis=1), 1.0) and math.isclose(est_p.sum(), 1.0)
    assert loss < 0.01


def test_consensus_vectors_are_symmetric_distributions():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, size=50)
    nb = np.stack([(np.arange(50) + 1) % 50, (np.arange(50) + 2) % 50], axis=1)
    c1, c2, c3 = consensus_vectors(y, nb, 3)
    assert math.isclose(c1.sum(), 1) and math.isclose(c2.sum(), 1) and math.isclose(c3.sum(), 1)
    assert np.allclose(c2, c2.T)
    assert np.allclose(c3, c3.transpose(1, 0, 2)) and np.allclose(c3, c3.transpose(2, 1, 0))
    # clean labels with label-sharing neighbours: all mass on the diagonal
    y_clean = np.repeat([0, 1], 25)
    nb_clean = np.stack([np.where(np.arange(50) < 25, (np.arange(50) + 1) % 25,
                                  25 + (np.arange(50) + 1) % 25)] * 2, axis=1)
    _, c2, c3 = consensus_vectors(y_clean, nb_clean, 2)
    assert np.allclose(c2, np.diag([0.5, 0.5]))
    assert math.isclose(c3[0, 0, 0] + c3[1, 1, 1], 1.0)


def test_hoc_first_order_counts_the_samples_own_position():
    # a hub: row 0 (class 2) is the nearest neighbour of every other row. HOC's c1 is the
    # observed distribution, however often a row is someone's neighbour.
    n = 60
    y = np.array([2] + [0] * 30 + [1] * 29)
    nb = np.stack([np.where(np.arange(n) == 0, 1, 0), (np.arange(n) + 1) % n], axis=1)
    c1_own, _, _ = consensus_vectors(y, nb, 3)
    assert np.allclose(c1_own, np.bincount(y, minlength=3) / n)
    # rows= restricts the centres
    c1_sub, _, _ = consensus_vectors(y, nb, 3, rows=np.arange(1, 31))
    assert np.allclose(c1_sub, [1.0, 0.0, 0.0])
    with pytest.raises(ValueError, match="2 neighbours"):
        consensus_vectors(y, nb[:, :1], 3)


def test_noise_rates_formula_and_clipping():
    t = np.array([[0.8, 0.2], [0.0, 1.0]])
    p = np.array([0.5, 0.5])
    observed = p @ t  # [0.4, 0.6]
    eta = noise_rates(t, p, observed)
    assert eta[0] == pytest.approx(0.0)  # 1 - 0.8*0.5/0.4 = 0: a clean class, nothing flagged
    assert eta[1] == pytest.approx(1 - 0.5 / 0.6)
    assert noise_rates(t, p, np.array([0.0, 1.0]))[0] == pytest.approx(0.0)  # never observed
    # only impossible values are repaired by default; in-range rates are used as estimated
    t_bad = np.array([[0.95, 0.05], [0.0, 1.0]])
    assert noise_rates(t_bad, p, observed)[0] == pytest.approx(0.0)  # 1 - 0.475/0.4 < 0
    assert noise_rates(t * 0.0, p, observed).tolist() == [1.0, 1.0]
    assert noise_rates(np.array([[0.97, 0.03], [0.0, 1.0]]), p, np.array([0.5, 0.5]))[0] \
        == pytest.approx(0.03)


def test_cosine_detection_score_is_more_suspicious_of_a_concentrated_alternative():
    # rows 0 and 1 have class 0 and the same own-vote share (4 of 10 neighbours); row 0's other
    # votes agree on class 1, row 1's scatter over classes 1..3. SimiFeat's cosine score flags
    # row 0 first (the vote share cannot tell them apart: tests/test_research_ds2.py).
    y = np.array([0, 0] + [0] * 4 + [1] * 6 + [0] * 4 + [1, 1, 2, 2, 3, 3])
    nb = np.zeros((len(y), 10), dtype=np.int64)
    nb[0] = np.arange(2, 12)
    nb[1] = np.arange(12, 22)
    nb[2:] = np.arange(2, 12)  # the other rows are not ranked (informative=False below)
    sims = np.ones(nb.shape, dtype=np.float32)
    eta = np.array([0.5, 0.0, 0.0, 0.0])  # flag one of the two rankable class-0 rows
    informative = np.r_[True, True, np.zeros(len(y) - 2, bool)]
    for seed in range(8):  # whatever the tie-break key
        det = detect_corrupted(y, nb, sims, eta, 4, k=10, rounds=1, subset_fraction=1.0,
                               seed=seed, informative=informative)
        assert det.flagged[0] == 1 and det.flagged[1] == 0


def test_suggestion_comes_from_flagged_rounds_with_add_one_smoothing():
    rng = np.random.default_rng(0)
    centres = np.eye(3, 8)
    emb = np.concatenate([centres[c] + 0.05 * rng.standard_normal((40, 8)) for c in range(3)])
    y = np.repeat([0, 1, 2], 40)
    y[5] = 2
    res = curate_scores(emb, y, DS2Config(num_classes=3, hoc_steps=300, detection_rounds=8))
    # curate_scores keeps the result; recompute the detection to inspect its counts
    nb, sims = knn_cosine(emb, 30)
    det = detect_corrupted(y, nb, sims, res.eta, 3, rounds=8, seed=0)
    never = det.flagged == 0
    assert (det.suggested[never] == y[never]).all() and (det.confidence[never] == 0).all()
    f = det.flagged[5]
    assert f >= 1 and det.suggested[5] == 0
    # share = (count + 1) / (F + K): at most (F + 1) / (F + 3) here
    assert det.suggestion_share[5] == pytest.approx((f + 1) / (f + 3))
    assert det.confidence[5] == pytest.approx(det.suggestion_share[5] * (f + 1)
                                              / (det.drawn[5] + 2))
    assert res.curated[5] == det.suggested[5] == 0


# -- end to end on synthetic truth -----------------------------------------------------------------

@pytest.fixture(scope="module")
def synthetic():
    return make_synthetic_ds2(n=3000, num_classes=6, off_mass=0.3, dim=24, seed=3)


@pytest.fixture(scope="module")
def curated(synthetic):
    return curate_scores(synthetic["embeddings"], synthetic["observed"], DS2Config(hoc_steps=800))


def test_curation_recovers_t_and_beats_raw_scores(synthetic, curated):
    assert np.abs(curated.transition - synthetic["transition"]).max() < 0.08
    raw_acc = (synthetic["observed"] == synthetic["true"]).mean()
    cur_acc = (curated.curated == synthetic["true"]).mean()
    assert cur_acc >= raw_acc + 0.15
    # what is replaced is mostly really wrong, and replaced exactly where flagged
    wrong = synthetic["observed"] != synthetic["true"]
    assert (curated.corrupted & wrong).sum() / curated.corrupted.sum() > 0.9
    assert np.array_equal(curated.corrupted, curated.curated != curated.raw)
    assert ((curated.confidence >= 0) & (curated.confidence <= 1)).all()


def test_curation_is_deterministic_for_a_seed(synthetic, curated):
    again = curate_scores(synthetic["embeddings"], synthetic["observed"], DS2Config(hoc_steps=800))
    assert np.array_equal(again.curated, curated.curated)
    assert np.array_equal(again.confidence, curated.confidence)
    assert np.array_equal(again.transition, curated.transition)


def test_confidence_threshold_controls_replacement(synthetic):
    never = curate_scores(synthetic["embeddings"][:600], synthetic["observed"][:600],
                          DS2Config(hoc_steps=200, detection_rounds=4, confidence_threshold=1.0))
    assert not never.corrupted.any() and np.array_equal(never.curated, never.raw)


def test_ds2_select_orders_by_curated_then_long_tail(synthetic):
    result = ds2_select(synthetic["embeddings"][:800], synthetic["observed"][:800],
                        DS2Config(select_ratio=0.25, hoc_steps=200, detection_rounds=4))
    sel = result.selected
    assert len(sel) == 200 and len(set(sel.tolist())) == 200
    keys = list(zip(-result.curated[sel], -result.long_tail[sel]))
    assert keys == sorted(keys)
    # nothing left out beats the worst selected sample
    worst = result.curated[sel].min()
    rest = np.setdiff1d(np.arange(800), sel)
    assert result.curated[rest].max() <= worst


def test_planted_flip_in_clean_cluster_is_detected():
    rng = np.random.default_rng(0)
    centres = np.eye(3, 8)
    emb = np.concatenate([centres[c] + 0.05 * rng.standard_normal((40, 8)) for c in range(3)])
    y = np.repeat([0, 1, 2], 40)
    y[5] = 2  # a sample of the class-0 cluster rated 2
    result = curate_scores(emb, y, DS2Config(num_classes=3, hoc_steps=300, detection_rounds=8))
    assert result.corrupted[5] and result.curated[5] == 0
    assert result.corrupted.sum() <= 3


def test_duplicates_and_unused_classes_are_handled():
    rng = np.random.default_rng(1)
    base = rng.standard_normal((30, 6)).astype(np.float32)
    emb = np.concatenate([base, base])  # every row has an exact duplicate
    y = np.tile(rng.integers(0, 3, size=30), 2)  # classes 3..5 never observed
    result = curate_scores(emb, y, DS2Config(hoc_steps=200, detection_rounds=3))
    assert result.curated.min() >= 0 and result.curated.max() <= 5
    assert np.isfinite(result.transition).all() and np.isfinite(result.long_tail).all()
    # a row is never its own neighbour, but its duplicate is its nearest one: the duplicate pulls
    # the long-tail score down compared with the same rows without duplicates
    single = curate_scores(base, y[:30], DS2Config(hoc_steps=50, detection_rounds=2))
    assert (result.long_tail[:30] < single.long_tail).all()


def test_identical_embeddings_are_not_curated_and_logged(warnings_log):
    # 300 identical embeddings: every neighbourhood is an arbitrary tie-broken subset, so the
    # votes say nothing about any one sample; curating would replace ~80% of the scores and
    # drop the accuracy from 0.70 to ~0.2 (measured before the guard).
    rng = np.random.default_rng(0)
    t = off_diagonal_transition(6, off_mass=0.3)
    true = rng.integers(0, 6, size=300)
    observed = np.array([rng.choice(6, p=t[c]) for c in true])
    result = curate_scores(np.ones((300, 16), np.float32), observed,
                           DS2Config(hoc_steps=100, detection_rounds=4))
    assert not result.corrupted.any() and np.array_equal(result.curated, observed)
    assert result.info["n_uninformative"] == 300 and "curation_skipped" in result.info
    assert any("uninformative" in m for m in warnings_log)
    assert np.isfinite(result.transition).all() and np.isfinite(result.long_tail).all()


def test_duplicate_blocks_are_not_curated_but_the_rest_is():
    rng = np.random.default_rng(2)
    centres = np.eye(3, 8)
    emb = np.concatenate([centres[c] + 0.05 * rng.standard_normal((60, 8)) for c in range(3)])
    y = np.repeat([0, 1, 2], 60)
    y[5] = 2  # a planted flip in a normal neighbourhood
    emb[100:115] = emb[100]  # 15 exact copies of one sample (more than k = 10)
    y[100:115] = [1] * 10 + [0] * 5
    result = curate_scores(emb, y, DS2Config(num_classes=3, hoc_steps=300, detection_rounds=8))
    assert result.info["n_uninformative"] == 15
    assert not result.corrupted[100:115].any()
    assert result.corrupted[5] and result.curated[5] == 0


def test_curate_rejects_unusable_input():
    with pytest.raises(ValueError, match="at least 3"):
        curate_scores(np.zeros((2, 4)), np.array([0, 1]))
    with pytest.raises(ValueError, match="labels"):
        curate_scores(np.eye(4), np.array([0, 1, 2, 9]))
    with pytest.raises(ValueError, match="4 embeddings for 3 labels"):
        curate_scores(np.eye(4), np.array([0, 1, 2]))


@pytest.mark.parametrize("field, value", [
    ("num_classes", 1), ("k", 1), ("k_pool", 5), ("hoc_steps", 0), ("hoc_lr", 0.0),
    ("detection_rounds", 0), ("subset_fraction", 0.0), ("subset_fraction", 1.5),
    ("confidence_threshold", 1.1), ("missing_score", float("nan")), ("knn_index", "annoy"),
    ("knn_params", [8]), ("knn_params", {"nprobes": 8}), ("seed", -1), ("k", 2.5),
])
def test_config_refuses_a_bad_field_by_name(field, value):
    with pytest.raises(ValueError, match=f"DS2Config.{field}"):
        DS2Config(**{field: value})


def test_config_checks_the_score_range_and_the_budget_once():
    with pytest.raises(ValueError, match="score_low / score_high"):
        DS2Config(score_low=5.0, score_high=1.0)
    for budget_fields in (dict(select_ratio=1.5), dict(select_num=-1),
                          dict(select_ratio=0.2, select_num=3)):
        with pytest.raises(ValueError, match="select_ratio / select_num"):
            DS2Config(**budget_fields)
    assert DS2Config().keep(7) == 7  # no budget: every sample
    assert DS2Config(select_ratio=0.7).keep(90) == 63  # core.budget's floor, not 62
    assert DS2Config(select_num=100).keep(30) == 30
    # an integral float from a recipe is an integer
    assert DS2Config(k=12.0).k == 12 and isinstance(DS2Config(k=12.0).k, int)
    # the knn options are copied: the caller's dict cannot change a built config
    params = {"nprobe": 4}
    config = DS2Config(knn_index="ivf", knn_params=params)
    params["nprobe"] = 64
    assert config.knn_params == {"nprobe": 4}


def test_ds2_select_keeps_tiny_inputs_on_their_raw_scores(warnings_log):
    result = ds2_select(None, np.array([1, 4]), DS2Config(select_num=1))
    assert result.selected.tolist() == [1] and not result.corrupted.any()
    assert result.info["curation_skipped"] == "too few samples" and result.info["budget"] == 1
    assert any("too few to curate" in m for m in warnings_log)


def test_rating_config_refuses_a_bad_field_by_name():
    for fields, name in ((dict(mode="vote"), "mode"), (dict(backend="openai"), "backend"),
                         (dict(backend="api"), "backend"), (dict(try_num=0), "try_num"),
                         (dict(min_score=4, max_score=1), "min_score"), (dict(top_p=0.0), "top_p"),
                         (dict(temperature=-1.0), "temperature")):
        with pytest.raises(ValueError, match=f"RatingConfig.{name}"):
            RatingConfig(**fields)
    assert RatingConfig().compression == (0.0, 5.0)
    assert RatingConfig(mode="generate").compression == (4.0, 9.0)  # DS2: clip(s, 4, 9) - 4


def test_non_finite_embeddings_do_not_crash():
    emb = np.random.default_rng(0).standard_normal((20, 4)).astype(np.float32)
    emb[3] = np.nan
    result = curate_scores(emb, np.arange(20) % 3,
                           DS2Config(num_classes=3, hoc_steps=50, detection_rounds=2))
    assert np.isfinite(result.long_tail).all()


# -- long tail and selection -----------------------------------------------------------------------

def test_long_tail_is_tanh_of_half_mean_distance():
    sims = np.array([[1.0, 0.8, 0.6], [0.0, -0.2, -1.0]])
    lt = long_tail_scores(sims, k=2)
    assert lt[0] == pytest.approx(math.tanh((0.0 + 0.2) / 2 / 2))
    assert lt[1] == pytest.approx(math.tanh((1.0 + 1.2) / 2 / 2))


def test_isolated_sample_has_the_highest_long_tail(synthetic):
    emb = synthetic["embeddings"][:300].copy()
    emb[7] = -emb[:300].mean(axis=0) * 50  # far from everything
    result = curate_scores(emb, synthetic["observed"][:300],
                           DS2Config(hoc_steps=50, detection_rounds=2))
    assert int(np.argmax(result.long_tail)) == 7


def test_lexicographic_select_breaks_ties_by_long_tail_then_index():
    curated = np.array([3, 5, 5, 1, 5])
    tail = np.array([0.9, 0.1, 0.5, 0.9, 0.5])
    assert lexicographic_select(curated, tail, 4).tolist() == [2, 4, 1, 0]
    assert lexicographic_select(curated, tail, 0).tolist() == []


def test_report_files(tmp_path, curated):
    paths = write_ds2_report(tmp_path / "rep", curated, extra=dict(note="x"))
    data = json.loads((tmp_path / "rep" / "transition.json").read_text())
    assert np.allclose(np.array(data["transition"]), curated.transition)
    assert sum(data["counts_raw"]) == sum(data["counts_curated"]) == len(curated.raw)
    assert data["note"] == "x"
    for key in ("heatmap", "distribution"):
        with open(paths[key], "rb") as handle:
            assert handle.read(8) == b"\x89PNG\r\n\x1a\n"


# -- rating parsing --------------------------------------------------------------------------------

@pytest.mark.parametrize("answer, expected", [
    ('{"Rarity": 3, "Complexity": 4, "Informativeness": 5, "Overall rating": 7}', 7.0),
    ('first {"Overall rating": 2} then {"Overall rating": 8}', 8.0),  # last object wins
    ("```json\n{'Rarity': 3, 'Overall rating': 6,}\n```", 6.0),  # single quotes, trailing comma
    ('{Rarity: 2, Overall rating: 9}', 9.0),  # bare keys
    ('{"overall_rating": "8/10"}', 8.0),
    ('{"scores": {"Overall Rating": 4.5}}', 4.5),
    ('{"note": "a } inside a string", "Overall rating": 5}', 5.0),
    ("I think the overall rating: 7 because ...", 7.0),  # regex fallback
    ('{"Overall rating": 11}', None),  # out of range
    ('{"Overall rating": "great"}', None),
    ("\n\n\n", None), ("", None), (None, None), (42, None), ("{{{{", None),
])
def test_parse_rating_is_tolerant_and_never_raises(answer, expected):
    assert parse_rating(answer) == expected


def test_build_prompt_cuts_long_samples():
    prompt = build_prompt("x" * 10000, max_chars=100)
    assert "x" * 100 + " [...]" in prompt and "x" * 101 not in prompt
    assert "Overall rating" in prompt


# -- probability mode ------------------------------------------------------------------------------

def test_score_token_rater_is_deterministic_and_padding_invariant(tiny_llama):
    texts = ["Solve 12 * 7. The answer is 84.", "", "What is the capital of France? Paris. " * 5]
    batched = ScoreTokenRater(str(tiny_llama), batch_size=3)
    single = ScoreTokenRater(str(tiny_llama), batch_size=1)
    exp_b, mass_b = batched.rate(texts)
    exp_s, mass_s = single.rate(texts)
    assert ((exp_b >= 0) & (exp_b <= 5)).all()
    assert ((mass_b > 0) & (mass_b <= 1)).all()
    np.testing.assert_allclose(exp_b, exp_s, atol=1e-4)
    np.testing.assert_allclose(mass_b, mass_s, rtol=1e-3)
    np.testing.assert_array_equal(batched.rate(texts)[0], exp_b)


def test_score_token_rater_refuses_multi_token_scores(tiny_llama):
    with pytest.raises(ValueError, match="single-token"):
        ScoreTokenRater(str(tiny_llama), scores=range(1, 11))
