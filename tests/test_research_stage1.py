"""tools/daar_research/stage1.py: the stage-1 research variants (never imported by daar_ops)."""

from __future__ import annotations

import numpy as np
import pytest

from daar_ops.algorithms.pseudo_labels import Stage1Config, pseudo_label
from daar_research.stage1 import ResearchConfig, research_pseudo_label
from test_stage1_pseudo_labels import _world


def test_kmeans_fully_anchored_equals_fixed_prototypes():
    pool, _, anchors, labels, is_desc = _world(4, offset_scale=1.0)
    fixed, _, _ = pseudo_label(pool, anchors, labels, 4, is_desc, Stage1Config(method="fixed"))
    tied, _, _ = research_pseudo_label(pool, anchors, labels, 4, is_desc, ResearchConfig(
        method="kmeans", refine_iters=5, anchor_strength=1.0))
    assert np.array_equal(fixed, tied)


@pytest.mark.parametrize("overrides", [dict(method="spread"), dict(self_train_rounds=1)])
def test_other_options_label_every_record(overrides):
    pool, truth, anchors, labels, is_desc = _world(5)
    pred, margins, info = research_pseudo_label(pool, anchors, labels, 4, is_desc,
                                                ResearchConfig(**overrides))
    assert pred.shape == truth.shape and np.isfinite(margins).all()
    assert (pred == truth).mean() > 0.8


def test_single_cluster_preset_is_one_clustering():
    pool, _, anchors, labels, is_desc = _world(7)
    old = ResearchConfig.single_cluster(seed=3)
    assert (old.consensus_clusters_per_domain, old.consensus_seeds, old.cluster_space) == \
        ((8,), 1, "label")
    pred, _, info = research_pseudo_label(pool, anchors, labels, 4, is_desc, old)
    assert info["consensus"] == [{"n_clusters": 32, "seed": 3}] and len(pred) == len(pool)


def test_product_configs_go_to_the_product_function():
    pool, _, anchors, labels, is_desc = _world(8)
    cfg = Stage1Config(seed=1, cluster_space="label")
    a = pseudo_label(pool, anchors, labels, 4, is_desc, cfg)[0]
    b = research_pseudo_label(pool, anchors, labels, 4, is_desc, ResearchConfig(
        seed=1, cluster_space="label"))[0]
    assert np.array_equal(a, b)


def test_research_switches_are_validated():
    with pytest.raises(ValueError):
        ResearchConfig(anchor_strength=2.0)
    with pytest.raises(ValueError):
        ResearchConfig(method="nope")
