"""DaaR stage-1 centroids: means, assignment, the centroid file."""

from __future__ import annotations

import numpy as np
import pytest

from daar_ops.algorithms.centroids import assign_nearest, compute_centroids, similarities
from daar_ops.algorithms.synthesis import DomainSpec
from daar_ops.artifacts import ArtifactError
from daar_ops.centroid_file import load_centroids, save_centroids

DOMS = [DomainSpec("math", "numbers"), DomainSpec("code", "programs")]


# ----------------------------------------------------------------- centroids and assignment

def test_compute_centroids_means_in_name_order_and_missing_domain_errors():
    feats = np.array([[1, 0], [3, 0], [0, 2]], dtype=np.float32)
    cents, counts = compute_centroids(feats, ["a", "a", "b"], ["b", "a"])
    np.testing.assert_allclose(cents, [[0, 2], [2, 0]])
    assert counts.tolist() == [1, 2]
    with pytest.raises(ValueError, match="no sample for domain 'c'"):
        compute_centroids(feats, ["a", "a", "b"], ["a", "c"])


def test_assign_nearest_cosine_vs_euclidean():
    cents = np.array([[1.0, 0.0], [10.0, 10.0]])
    x = np.array([[2.0, 0.1], [1.0, 1.2], [9.0, 3.0]])
    lab_cos, sims_cos = assign_nearest(x, cents, "cosine")
    lab_euc, sims_euc = assign_nearest(x, cents, "euclidean")
    assert lab_cos.tolist() == [0, 1, 0]
    assert lab_euc.tolist() == [0, 0, 1]  # [9, 3] is nearer [10, 10], but points along [1, 0]
    assert sims_cos.dtype == np.float32 and sims_cos.shape == (3, 2)
    np.testing.assert_allclose(sims_euc[0, 0], -np.hypot(1.0, 0.1), rtol=1e-6)
    with pytest.raises(ValueError, match="metric"):
        assign_nearest(x, cents, "manhattan")
    with pytest.raises(ValueError, match="does not match"):
        assign_nearest(np.zeros((2, 3)), cents)


def test_non_finite_features_get_defined_labels():
    x = np.array([[np.nan, 1.0], [0.0, 1.0]])
    labels, sims = assign_nearest(x, np.eye(2))
    assert labels.tolist() == [0, 1] and np.isneginf(sims[0]).all()


def test_similarities_cosine_matches_definition():
    rng = np.random.default_rng(1)
    x, c = rng.normal(size=(5, 4)), rng.normal(size=(3, 4))
    expected = (x @ c.T) / np.outer(np.linalg.norm(x, axis=1), np.linalg.norm(c, axis=1))
    np.testing.assert_allclose(similarities(x, c), expected, rtol=1e-10)


def test_centroid_file_roundtrip_and_corruption(tmp_path):
    cents = np.arange(8, dtype=np.float32).reshape(2, 4)
    desc = {"model": "m", "model_fingerprint": "f", "layer": 0, "feature_dim": 4}
    save_centroids(tmp_path / "c", cents, DOMS, desc, "embedding", "{instruction}", [3, 5])
    got, manifest = load_centroids(tmp_path / "c")
    np.testing.assert_array_equal(got, cents)
    assert manifest["domains"] == ["math", "code"] and manifest["counts"] == [3, 5]
    assert manifest["feature"] == "embedding" and manifest["template"] == "{instruction}"
    assert manifest["kind"] == "daar_centroids" and manifest["model_fingerprint"] == "f"
    with pytest.raises(ValueError, match="2 centroids for 3 domains"):
        save_centroids(tmp_path / "d", cents, DOMS + [DomainSpec("x")], desc, "embedding",
                       "{instruction}", [1, 1, 1])
    (tmp_path / "c" / "tensors.safetensors").write_bytes(b"garbage")
    with pytest.raises(ArtifactError, match="checksum"):
        load_centroids(tmp_path / "c")
