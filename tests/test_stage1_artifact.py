"""daar_ops.stage1_artifact: a fitted stage 1 round-trips and a hostile file is refused."""

from __future__ import annotations

import json

import numpy as np
import pytest

from daar_ops.algorithms.pseudo_labels import Stage1Config, fit_stage1, label_stage1
from daar_ops.artifacts import ArtifactError, manifest_digest
from daar_ops.stage1_artifact import load_stage1, save_stage1
from test_stage1_pseudo_labels import _overlapping_world


@pytest.fixture(scope="module")
def fitted():
    pool, other, truth, anchors, labels, is_desc = _overlapping_world(5, n=40)
    model, _ = fit_stage1(pool, anchors, labels, 4, is_desc,
                          Stage1Config(consensus_clusters_per_domain=(2, 3)),
                          cluster_features=other)
    return model, pool, other


def _rewrite(directory, **changes):
    """Edit a manifest as an attacker would: its checksum recomputed (it detects corruption,
    not tampering)."""
    path = directory / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest.update(changes)
    manifest["manifest_sha256"] = manifest_digest(manifest)
    path.write_text(json.dumps(manifest))


def test_round_trip_labels_the_same(fitted, tmp_path):
    model, pool, other = fitted
    save_stage1(tmp_path / "s", model, list("abcd"), {"config": Stage1Config().to_dict()})
    loaded, manifest = load_stage1(tmp_path / "s")
    assert manifest["domains"] == list("abcd") and loaded.method == "cluster"
    a = label_stage1(model, pool, other)
    b = label_stage1(loaded, pool, other)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])


@pytest.mark.parametrize("changes, match", [
    (dict(n_clusterings=5), "tensors"),
    (dict(domains=["a", "b"]), "prototypes"),
    (dict(method="magic"), "not a valid"),
    ("huge", "announces"),
])
def test_a_hostile_manifest_is_refused_before_reading_tensors(fitted, tmp_path, changes, match):
    model = fitted[0]
    save_stage1(tmp_path / "s", model, list("abcd"), {"config": Stage1Config().to_dict()})
    if changes == "huge":  # a tensor announced at 8 TB
        shapes = json.loads((tmp_path / "s" / "manifest.json").read_text())["tensors"]
        changes = dict(tensors={**shapes, "centres_0": [10 ** 9, 10 ** 3]})
    _rewrite(tmp_path / "s", **changes)
    with pytest.raises(ArtifactError, match=match):
        load_stage1(tmp_path / "s")


def test_a_symlinked_tensor_file_is_refused(fitted, tmp_path):
    save_stage1(tmp_path / "s", fitted[0], list("abcd"), {"config": Stage1Config().to_dict()})
    real = tmp_path / "s" / "tensors.safetensors"
    real.rename(tmp_path / "elsewhere")
    real.symlink_to(tmp_path / "elsewhere")
    with pytest.raises(ArtifactError, match="symlink"):
        load_stage1(tmp_path / "s")
