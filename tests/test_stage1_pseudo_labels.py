"""Robust stage 1 (daar_ops.algorithms.pseudo_labels): prototypes, purity, methods, health."""

from __future__ import annotations

import numpy as np
import pytest

from daar_ops.algorithms.pseudo_labels import (HEALTH_THRESHOLD, Stage1Config, anchor_weights,
                                               health, pseudo_label, prototypes, purity_filter)


def _blobs(rng, centers, n_per, noise):
    x = np.concatenate([c + noise * rng.standard_normal((n, len(c)))
                        for c, n in zip(centers, n_per)])
    y = np.concatenate([[k] * n for k, n in enumerate(n_per)])
    return x, y


def _world(seed=0, d=16, k=4, offset_scale=0.0):
    """K well separated domains in d dims; anchors are noisy and share an offset (as synthetic
    samples that sit beside the pool's manifold), descriptions are closer to the truth."""
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((k, d)) * 3
    pool, truth = _blobs(rng, centers, [300, 200, 120, 60], 1.0)
    offset = offset_scale * rng.standard_normal(d)
    syn, syn_y = _blobs(rng, centers + offset, [6] * k, 1.5)
    desc = centers + 0.5 * rng.standard_normal((k, d))
    anchors = np.concatenate([syn, desc])
    labels = np.concatenate([syn_y, np.arange(k)])
    is_desc = np.array([False] * len(syn) + [True] * k)
    return pool, truth, anchors, labels, is_desc


@pytest.mark.parametrize("method", ["fixed", "kmeans", "cluster"])
def test_methods_recover_separated_domains(method):
    pool, truth, anchors, labels, is_desc = _world()
    pred, margins, info = pseudo_label(pool, anchors, labels, 4, is_desc, Stage1Config(method=method))
    assert pred.shape == truth.shape and margins.shape == truth.shape
    assert (margins >= 0).all()
    assert (pred == truth).mean() > 0.95
    assert sum(info["label_counts"]) == len(pool)


def test_deterministic_for_a_seed():
    pool, _, anchors, labels, is_desc = _world(1)
    a = pseudo_label(pool, anchors, labels, 4, is_desc, Stage1Config(seed=5))
    b = pseudo_label(pool, anchors, labels, 4, is_desc, Stage1Config(seed=5))
    assert np.array_equal(a[0], b[0]) and np.allclose(a[1], b[1])


def test_purity_filter_drops_mislabelled_anchor_and_keeps_descriptions():
    a = np.array([[1, 0], [1, 0.1], [0, 1], [0.1, 1], [1, 0.05], [0, 1.0]])
    y = np.array([0, 0, 1, 1, 1, 0])  # rows 4 and 5 carry the wrong domain
    prot = np.array([False, False, False, False, False, True])
    keep = purity_filter(a, y, 2, protected=prot)
    assert keep.tolist() == [True, True, True, True, False, True]


def test_purity_filter_keeps_one_anchor_per_domain():
    a = np.array([[1.0, 0.0], [1.0, 0.01]])
    keep = purity_filter(a, np.array([0, 1]), 2)
    assert keep.all()


def test_anchor_weights_split_shares():
    y = np.array([0, 0, 0, 1, 1])
    desc = np.array([False, False, True, False, False])
    w = anchor_weights(y, desc, 0.25)
    assert np.isclose(w[y == 0].sum(), 1) and np.isclose(w[2], 0.25)
    assert np.isclose(w[y == 1].sum(), 1)  # no description: the samples get everything


def test_prototypes_need_every_domain():
    with pytest.raises(ValueError, match="domain 2"):
        prototypes(np.eye(3), np.array([0, 1, 1]), 3)


def test_descriptions_ignored_when_disabled():
    pool, truth, anchors, labels, is_desc = _world(2)
    _, _, info = pseudo_label(pool, anchors, labels, 4, is_desc,
                              Stage1Config(use_descriptions=False, purity=False, method="fixed"))
    assert info["anchors_kept"] == [6, 6, 6, 6]


def test_bad_inputs_are_refused():
    pool, _, anchors, labels, is_desc = _world()
    with pytest.raises(ValueError):
        pseudo_label(pool[:, :3], anchors, labels, 4, is_desc)
    with pytest.raises(ValueError):
        pseudo_label(pool, anchors, labels + 10, 4, is_desc)
    with pytest.raises(ValueError, match="method must be one of"):
        Stage1Config(method="nope")


def test_paper_preset():
    cfg = Stage1Config.paper()
    assert (cfg.method, cfg.space, cfg.use_descriptions, cfg.purity) == \
        ("fixed", "embedding", False, False)


def test_health_tracks_disagreement():
    a = np.array([0, 1, 2, 3] * 25)
    good = health([a, a.copy(), a.copy()], 4)
    assert good.cross_seed_agreement == 1.0 and good.reliable
    noisy = np.random.default_rng(0).integers(0, 4, size=100)
    bad = health([a, noisy], 4)
    assert bad.cross_seed_agreement < HEALTH_THRESHOLD and not bad.reliable
    single = health([a], 4)
    assert np.isnan(single.cross_seed_agreement) and not single.reliable


def test_domain_anchor_texts_paraphrase_default_domains_only():
    from daar_ops.algorithms.synthesis import DEFAULT_DOMAINS, DomainSpec
    from daar_ops.algorithms.pseudo_labels import DEFAULT_ANCHOR_TEXTS, domain_anchor_texts

    texts, labels = domain_anchor_texts(list(DEFAULT_DOMAINS) + [DomainSpec("law", "statutes")])
    n_default = sum(1 + len(DEFAULT_ANCHOR_TEXTS[d.name]) for d in DEFAULT_DOMAINS)
    assert len(texts) == n_default + 1 and texts[-1] == "law: statutes" and labels[-1] == 4
    assert texts[0].startswith("common sense: ")
    plain, plain_labels = domain_anchor_texts(DEFAULT_DOMAINS, extra=False)
    assert plain_labels == [0, 1, 2, 3]


def test_half_split_health_separates_good_and_broken_anchors():
    from daar_ops.algorithms.pseudo_labels import half_split_health

    pool, _, anchors, labels, is_desc = _world(6)
    good = half_split_health(pool, anchors, labels, 4, is_desc, Stage1Config(method="fixed"))
    assert good.reliable and good.cross_seed_agreement > 0.95
    rng = np.random.default_rng(0)
    junk = rng.standard_normal(anchors.shape)  # anchors unrelated to the pool
    bad = half_split_health(pool, junk, labels, 4, None, Stage1Config(method="fixed"))
    assert bad.cross_seed_agreement < good.cross_seed_agreement


def test_consensus_runs_every_size_and_seed():
    pool, truth, anchors, labels, is_desc = _world(8)
    pred, margins, info = pseudo_label(pool, anchors, labels, 4, is_desc,
                                       Stage1Config(seed=2, cluster_space="label"))
    assert [r["n_clusters"] for r in info["consensus"]] == [16] * 3 + [32] * 3 + [64] * 3
    assert [r["seed"] for r in info["consensus"][:3]] == [2, 2001, 2002]
    assert (pred == truth).mean() > 0.95 and ((margins >= 0) & (margins <= 1)).all()


def _overlapping_world(seed=0, n=150):
    """Domains 0 and 1 overlap in the labelling space (their prototypes are still on the right
    sides); a second space separates all four domains, under a large common offset and one
    high-variance nuisance direction (the LM-feature case: whitening is what exposes them)."""
    rng = np.random.default_rng(seed)
    k, d = 4, 12
    centers = rng.standard_normal((k, d)) * 3
    centers[1] = centers[0] + 0.6 * rng.standard_normal(d)
    truth = np.repeat(np.arange(k), n)
    pool = centers[truth] + 1.0 * rng.standard_normal((len(truth), d))
    other_centers = rng.standard_normal((k, 24)) * 2
    other = other_centers[truth] + 0.5 * rng.standard_normal((len(truth), 24)) + 50.0
    other[:, 0] += 20.0 * rng.standard_normal(len(truth))
    anchors = centers + 0.2 * rng.standard_normal((k, d))
    return pool, other, truth, anchors, np.arange(k), np.ones(k, bool)


def test_joint_space_clusters_what_the_labelling_space_merges():
    pool, other, truth, anchors, labels, is_desc = _overlapping_world()
    cfg = Stage1Config(consensus_clusters_per_domain=(2,), consensus_seeds=1)
    alone, _, info_alone = pseudo_label(pool, anchors, labels, 4, is_desc, cfg)
    joint, _, info = pseudo_label(pool, anchors, labels, 4, is_desc, cfg, cluster_features=other)
    assert info_alone["cluster_space"] == "label" and info["cluster_space"] == "joint"
    acc_alone, acc_joint = (alone == truth).mean(), (joint == truth).mean()
    assert acc_joint > 0.95 and acc_joint > acc_alone + 0.1


def test_joint_space_rows_and_weights():
    from daar_ops.algorithms.pseudo_labels import JointTransform

    pool, other, *_ = _overlapping_world(1, n=20)
    x = JointTransform.fit(other, 0.7, 8).apply(pool, other)
    assert x.shape == (len(pool), pool.shape[1] + 8)
    assert np.allclose(np.linalg.norm(x[:, :pool.shape[1]], axis=1) ** 2, 0.3)
    assert np.allclose(np.linalg.norm(x[:, pool.shape[1]:], axis=1) ** 2, 0.7)
    with pytest.raises(ValueError, match="one row per record"):
        JointTransform.fit(other, 0.7, 8).apply(pool, other[:-1])


@pytest.mark.parametrize("bad", [dict(cluster_space="lm"), dict(joint_weight=1.5),
                                 dict(joint_whiten_dim=0), dict(consensus_seeds=0),
                                 dict(consensus_clusters_per_domain=(8, 0)),
                                 dict(consensus_clusters_per_domain=()), dict(refine_iters=-1)])
def test_bad_consensus_and_joint_settings_are_refused(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        Stage1Config(**bad)


# ------------------------------------------------------------- fitting apart from labelling

@pytest.mark.parametrize("cfg", [Stage1Config(method="fixed"), Stage1Config(method="kmeans"),
                                 Stage1Config(seed=4),
                                 Stage1Config(seed=1, consensus_clusters_per_domain=(2, 4))])
def test_a_fitted_stage1_labels_each_record_on_its_own(cfg):
    """The whole-dataset run equals fitting once and labelling record by record, in any order and
    any batch: what lets the labelling run per sample (under Ray, on unseen records)."""
    from daar_ops.algorithms.pseudo_labels import fit_stage1, label_stage1

    pool, other, truth, anchors, labels, is_desc = _overlapping_world(2, n=80)
    whole, _, _ = pseudo_label(pool, anchors, labels, 4, is_desc, cfg, cluster_features=other)
    model, _ = fit_stage1(pool, anchors, labels, 4, is_desc, cfg, cluster_features=other)
    joint = other if model.needs_cluster_features else None
    assert model.needs_cluster_features == (cfg.method == "cluster")
    order = np.random.default_rng(0).permutation(len(pool))
    one_by_one = np.empty(len(pool), np.int64)
    for i in order:
        rows = slice(i, i + 1)
        one_by_one[i] = label_stage1(model, pool[rows], None if joint is None
                                     else joint[rows])[0][0]
    assert np.array_equal(one_by_one, whole)


def test_cluster_labels_follow_the_kmeans_assignment_of_the_fit_pool():
    """Each clustering's nearest centre of a fit-pool record is k-means' own assignment."""
    from sklearn.cluster import KMeans

    from daar_ops.algorithms.pseudo_labels import _nearest_centre, fit_stage1

    pool, other, truth, anchors, labels, is_desc = _overlapping_world(3, n=60)
    cfg = Stage1Config(seed=7, consensus_clusters_per_domain=(3,), consensus_seeds=2)
    model, info = fit_stage1(pool, anchors, labels, 4, is_desc, cfg, cluster_features=other)
    x = model.joint.apply(pool, other)
    for centres, run in zip(model.centres, info["consensus"]):
        km = KMeans(n_clusters=run["n_clusters"], n_init=cfg.cluster_restarts,
                    random_state=run["seed"], max_iter=100).fit(x)
        assert np.array_equal(_nearest_centre(x, centres), km.labels_)


def test_a_joint_stage1_needs_the_records_lm_features():
    from daar_ops.algorithms.pseudo_labels import fit_stage1, label_stage1

    pool, other, truth, anchors, labels, is_desc = _overlapping_world(4, n=30)
    model, _ = fit_stage1(pool, anchors, labels, 4, is_desc, Stage1Config(),
                          cluster_features=other)
    with pytest.raises(ValueError, match="cluster_features"):
        label_stage1(model, pool)
    with pytest.raises(ValueError, match="do not match"):
        label_stage1(model, pool[:, :3], other)
