import math

import numpy as np
import pytest

from daar_ops.algorithms.coverage import (entropy_from_counts, facility_location_coverage,
                                          label_distribution, label_entropy,
                                          mean_nearest_selected_cosine, mean_pairwise_similarity,
                                          nearest_selected_cosine)


def _unit(rng, n, d=8):
    x = rng.normal(size=(n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_facility_location_matches_brute_force_and_is_block_independent():
    rng = np.random.default_rng(0)
    pool, sel = _unit(rng, 57), _unit(rng, 9)
    expected = np.clip((pool @ sel.T).max(axis=1), 0, None).mean()
    assert facility_location_coverage(pool, sel) == pytest.approx(expected, abs=1e-6)
    assert facility_location_coverage(pool, sel, block_size=5) == pytest.approx(expected, abs=1e-6)


def test_selecting_the_whole_pool_covers_it_fully_and_unnormalised_rows_are_handled():
    rng = np.random.default_rng(1)
    pool = _unit(rng, 20) * 7.0
    assert facility_location_coverage(pool, pool) == pytest.approx(1.0, abs=1e-6)


def test_negative_similarity_is_clipped_for_coverage_but_not_for_nearest_cosine():
    pool = np.array([[1.0, 0.0], [-1.0, 0.0]], dtype=np.float32)
    sel = np.array([[1.0, 0.0]], dtype=np.float32)
    assert facility_location_coverage(pool, sel) == pytest.approx(0.5)
    assert nearest_selected_cosine(pool, sel).tolist() == pytest.approx([1.0, -1.0])
    # the selected row itself is excluded: only the opposite row remains
    assert mean_nearest_selected_cosine(pool, sel, exclude=np.array([True, False])) == \
        pytest.approx(-1.0)


def test_more_selected_rows_never_lower_coverage():
    rng = np.random.default_rng(2)
    pool = _unit(rng, 40)
    small = facility_location_coverage(pool, pool[:3])
    assert facility_location_coverage(pool, pool[:10]) >= small


def test_bad_inputs_are_clear_errors_or_nan():
    pool = np.ones((3, 4), dtype=np.float32)
    with pytest.raises(ValueError, match="empty"):
        facility_location_coverage(pool, np.zeros((0, 4), dtype=np.float32))
    with pytest.raises(ValueError, match="equal width"):
        facility_location_coverage(pool, np.ones((2, 5), dtype=np.float32))
    assert math.isnan(mean_nearest_selected_cosine(pool, pool, exclude=np.ones(3, bool)))
    with pytest.raises(ValueError, match="exclude"):
        mean_nearest_selected_cosine(pool, pool, exclude=np.ones(2, bool))


def test_mean_pairwise_similarity_equals_brute_force():
    rng = np.random.default_rng(3)
    x = _unit(rng, 15) * rng.uniform(0.5, 3, size=(15, 1))
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    sims = xn @ xn.T
    expected = (sims.sum() - np.trace(sims)) / (15 * 14)
    assert mean_pairwise_similarity(x) == pytest.approx(expected, abs=1e-6)
    assert mean_pairwise_similarity(np.ones((4, 3))) == pytest.approx(1.0)
    assert math.isnan(mean_pairwise_similarity(np.ones((1, 3))))


def test_label_entropy_and_distribution():
    assert label_entropy(["a", "b", "c", "d"] * 5) == pytest.approx(math.log(4))
    assert label_entropy(["a"] * 7) == 0.0
    dist = label_distribution(["b", "a", None, "", float("nan"), "b"])
    assert dist == {"<none>": 3, "b": 2, "a": 1}
    assert math.isnan(entropy_from_counts([0, 0]))
    assert entropy_from_counts({"x": 1, "y": 1}) == pytest.approx(math.log(2))
