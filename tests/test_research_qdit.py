"""QDIT research variants (tools/daar_research/qdit.py): the scalings under which alpha trades
nothing, resolved to numbers for the product's greedy, and the facility-location value."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from daar_ops.algorithms.qdit import normalize_quality
from daar_research.qdit import facility_location_value, qdit_select, research_scale
from qdit_reference import clipped_sim, clustered, minmax, naive_greedy, unstructured

torch.set_num_threads(1)


@pytest.mark.parametrize("alpha,scale", [(0.3, "mean"), (0.7, "mean"), (0.5, "max_singleton"),
                                         (0.6, "none")])
def test_research_scalings_match_the_naive_greedy(alpha, scale):
    x = unstructured(250, d=16, seed=1)
    raw_q = np.random.default_rng(2).normal(5, 2, size=len(x))
    sim = clipped_sim(x)
    divisor = {"mean": len(x), "max_singleton": sim.sum(1).max(), "none": 1.0}[scale]
    assert research_scale(x, scale, "float64") == pytest.approx(divisor, rel=1e-12)
    expected = naive_greedy(sim, 30, minmax(raw_q), alpha, divisor)
    ours = qdit_select(x, select_num=30, quality=raw_q, alpha=alpha, diversity_scale=scale,
                       compute_dtype="float64", progress=False)
    assert ours.indices.tolist() == expected


def test_mean_scaling_collapses_onto_the_top_k_by_quality():
    """The reason it left the product: at alpha 0.7 the selection is the top K by quality."""
    x = clustered(600, d=16, centers=12, seed=8)
    q = np.random.default_rng(0).random(len(x))
    qn, _ = normalize_quality(q)
    mean = qdit_select(x, select_num=40, quality=q, alpha=0.7, diversity_scale="mean",
                       progress=False)
    assert set(mean.indices.tolist()) == set(np.argsort(-qn, kind="stable")[:40].tolist())


@pytest.mark.parametrize("method", ["lazy", "stochastic"])
def test_max_singleton_on_the_held_matrix_matches_the_general_loop(method):
    x = unstructured(600, d=24, seed=11)
    q = np.random.default_rng(12).random(600)
    kw = dict(select_num=60, quality=q, alpha=0.3, diversity_scale="max_singleton",
              method=method, seed=3, epsilon=0.05, progress=False)
    held, loop = qdit_select(x, **kw), qdit_select(x, max_memory_mb=0.5, **kw)
    assert held.meta["held_matrix"] and not loop.meta["held_matrix"]
    assert held.indices.tolist() == loop.indices.tolist()


def test_facility_location_value_is_the_covered_similarity():
    x = clustered(120, d=8, seed=4)
    idx = [3, 50, 77]
    expected = clipped_sim(x)[:, idx].max(1).sum()
    assert facility_location_value(x, idx, block_size=32) == pytest.approx(expected, rel=1e-5)
    assert facility_location_value(x, []) == 0.0
    assert qdit_select(x, select_num=3, progress=False).objective == pytest.approx(
        facility_location_value(x, qdit_select(x, select_num=3, progress=False).indices),
        rel=1e-5)
