"""DS2's earlier variants (tools/daar_research/ds2.py): they reproduce the product with the
product's rules, and each differs where it is said to; the synthetic data's known truth."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from daar_research.ds2 import (DS2Variant, consensus_vectors_variant, curate_scores_variant,
                               detect_corrupted_variant, make_synthetic_ds2)

from daar_ops.algorithms.ds2 import DS2Config, consensus_vectors, curate_scores

torch.set_num_threads(1)
FAST = DS2Config(hoc_steps=200, detection_rounds=10)


@pytest.fixture(scope="module")
def synthetic():
    return make_synthetic_ds2(n=1500, dim=16, seed=4)


def test_synthetic_generator_realises_the_known_transition(synthetic):
    t = synthetic["transition"]
    assert np.allclose(np.diag(t), 0.7) and np.allclose(t.sum(axis=1), 1.0)
    raw_acc = (synthetic["observed"] == synthetic["true"]).mean()
    assert 0.66 < raw_acc < 0.74


def test_the_products_rules_give_the_products_result(synthetic):
    product = curate_scores(synthetic["embeddings"], synthetic["observed"], FAST)
    variant = curate_scores_variant(synthetic["embeddings"], synthetic["observed"], FAST,
                                    DS2Variant())
    for name in ("curated", "confidence", "suggested", "noisy_rate", "transition", "prior", "eta"):
        np.testing.assert_array_equal(getattr(variant, name), getattr(product, name), name)
    assert variant.info["suggestion"] == "flagged" and "suggestion" not in product.info


def test_former_rules_curate_differently_and_are_recorded(synthetic):
    product = curate_scores(synthetic["embeddings"], synthetic["observed"], FAST)
    former = curate_scores_variant(synthetic["embeddings"], synthetic["observed"], FAST,
                                   DS2Variant.former())
    assert former.info["consensus_positions"] == "all"
    assert former.info["noise_rate_clip"] == (0.05, 0.95)
    assert (former.eta >= 0.05).all() and (former.eta <= 0.95).all()
    assert not np.array_equal(former.curated, product.curated)
    # both still curate towards the truth on clusterable data
    raw_acc = (synthetic["observed"] == synthetic["true"]).mean()
    assert (former.curated == synthetic["true"]).mean() > raw_acc + 0.1


def test_all_position_consensus_is_symmetric_and_overweights_a_hub():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, size=50)
    nb = np.stack([(np.arange(50) + 1) % 50, (np.arange(50) + 2) % 50], axis=1)
    c1, c2, c3 = consensus_vectors_variant(y, nb, 3, positions="all")
    assert math.isclose(c1.sum(), 1) and math.isclose(c3.sum(), 1) and np.allclose(c2, c2.T)
    assert np.allclose(c3, c3.transpose(1, 0, 2)) and np.allclose(c3, c3.transpose(2, 1, 0))
    # a hub: row 0 (class 2) is the nearest neighbour of every other row
    n = 60
    y = np.array([2] + [0] * 30 + [1] * 29)
    nb = np.stack([np.where(np.arange(n) == 0, 1, 0), (np.arange(n) + 1) % n], axis=1)
    c1_all, _, _ = consensus_vectors_variant(y, nb, 3, positions="all")
    c1_own, _, _ = consensus_vectors(y, nb, 3)
    assert c1_all[2] > 0.3 > c1_own[2]
    with pytest.raises(ValueError):
        consensus_vectors_variant(y, nb, 3, positions="every")


def test_the_vote_share_cannot_tell_a_concentrated_alternative_from_a_scattered_one():
    # rows 0 and 1: class 0, 4 of 10 votes for it; row 0's others agree on class 1, row 1's
    # scatter. The cosine score (product) always flags row 0; the share ties them.
    y = np.array([0, 0] + [0] * 4 + [1] * 6 + [0] * 4 + [1, 1, 2, 2, 3, 3])
    nb = np.zeros((len(y), 10), dtype=np.int64)
    nb[0], nb[1], nb[2:] = np.arange(2, 12), np.arange(12, 22), np.arange(2, 12)
    sims = np.ones(nb.shape, dtype=np.float32)
    informative = np.r_[True, True, np.zeros(len(y) - 2, bool)]
    flagged = {tuple(detect_corrupted_variant(
        y, nb, sims, np.array([0.5, 0.0, 0.0, 0.0]), 4, k=10, rounds=1, subset_fraction=1.0,
        seed=s, informative=informative,
        variant=DS2Variant(detection_score="share")).flagged[:2]) for s in range(8)}
    assert flagged == {(1, 0), (0, 1)}  # a tie, broken by the seeded key


@pytest.mark.parametrize("fields", [dict(consensus_positions="every"),
                                    dict(detection_score="rank"), dict(suggestion="some"),
                                    dict(self_weight=-1.0), dict(noise_rate_clip=(0.5, 0.2))])
def test_variant_fields_are_checked(fields):
    with pytest.raises(ValueError):
        DS2Variant(**fields)
