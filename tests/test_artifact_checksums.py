"""Issue 13 item 4: probe and centroid manifests are covered by a checksum.

Editing ``layer`` or the order of ``domains`` in a manifest.json used to change rewards or relabel
every record silently; now every load refuses an edited manifest with a clear message.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from daar_ops.algorithms.synthesis import DomainSpec
from daar_ops.centroid_file import load_centroids, save_centroids
from daar_ops.algorithms.probes import TrainConfig, train_daar_probes
from daar_ops.artifacts import ArtifactError, load_artifact, manifest_digest, save_artifact
from daar_ops.probe_checkpoint import load_probe_checkpoint, save_probe_checkpoint

DESCRIBE = {"model": "m", "model_path": "/nowhere/m", "model_fingerprint": "abc", "layer": 3,
            "feature_dim": 8, "max_length": 64, "pooling": "masked_mean"}


def edit_manifest(directory, change) -> None:
    path = directory / "manifest.json"
    manifest = json.loads(path.read_text())
    change(manifest)
    path.write_text(json.dumps(manifest, indent=2, sort_keys=True))


@pytest.fixture
def probe_dir(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 8)).astype(np.float32)
    y = np.arange(60) % 3
    result = train_daar_probes(x, y, ["a", "b", "c"], TrainConfig(
        epochs=1, batch_size=16, lr=3e-3, val_fraction=0.2, hidden=[8]), progress=False)
    return save_probe_checkpoint(tmp_path / "probe", result, DESCRIBE, "{text}", plot=False)


@pytest.fixture
def centroid_dir(tmp_path):
    cents = np.arange(24, dtype=np.float32).reshape(3, 8)
    return save_centroids(tmp_path / "cents", cents, [DomainSpec(n) for n in ("a", "b", "c")],
                          DESCRIBE, "layer", "{text}", [1, 2, 3])


@pytest.mark.parametrize("change", [
    lambda m: m.update(layer=4),
    lambda m: m.update(domains=m["domains"][::-1]),
    lambda m: m.update(template="{other}"),
    lambda m: m.pop("manifest_sha256"),
], ids=["layer", "domain order", "template", "checksum removed"])
def test_an_edited_probe_manifest_is_refused(probe_dir, change):
    load_probe_checkpoint(probe_dir)
    edit_manifest(probe_dir, change)
    with pytest.raises(ArtifactError, match="manifest checksum mismatch.*edited"):
        load_probe_checkpoint(probe_dir)


@pytest.mark.parametrize("change", [
    lambda m: m.update(layer=0),
    lambda m: m.update(domains=["b", "a", "c"]),
], ids=["layer", "domain order"])
def test_an_edited_centroid_manifest_is_refused(centroid_dir, change):
    load_centroids(centroid_dir)
    edit_manifest(centroid_dir, change)
    with pytest.raises(ArtifactError, match="manifest checksum mismatch"):
        load_centroids(centroid_dir)


def test_reformatting_the_manifest_is_not_an_edit(centroid_dir):
    # Only content counts: re-indenting or reordering keys keeps the checksum valid.
    path = centroid_dir / "manifest.json"
    manifest = json.loads(path.read_text())
    path.write_text(json.dumps(dict(reversed(list(manifest.items())))))
    cents, loaded = load_centroids(centroid_dir)
    assert loaded["domains"] == ["a", "b", "c"] and cents.shape == (3, 8)


def test_manifests_from_before_checksums_are_refused_with_a_clear_message(tmp_path):
    save_artifact(tmp_path / "x", {"t": np.zeros(2, np.float32)}, {"note": "x"}, kind="k")
    edit_manifest(tmp_path / "x", lambda m: (m.pop("manifest_sha256"),
                                             m.update(format_version=1)))
    with pytest.raises(ArtifactError, match="no manifest checksum.*re-create"):
        load_artifact(tmp_path / "x")


def test_non_json_safe_values_are_checksummed_as_written(tmp_path):
    directory = save_artifact(tmp_path / "p", {"t": np.ones(3, np.float32)},
                              {"path": tmp_path, "nan": float("nan")}, kind="k")
    _, manifest = load_artifact(directory, kind="k")
    assert manifest["path"] == str(tmp_path)
    assert manifest["manifest_sha256"] == manifest_digest(manifest)


# -- issue 22 item 4: a manifest from elsewhere is untrusted whatever its checksums say ------------

def rewrite_manifest(directory, change) -> None:
    """What an attacker does: edit the manifest and recompute its own checksum."""
    path = directory / "manifest.json"
    manifest = json.loads(path.read_text())
    change(manifest)
    manifest["manifest_sha256"] = manifest_digest(manifest)
    path.write_text(json.dumps(manifest, indent=2, sort_keys=True))


@pytest.mark.parametrize("name", ["../../../x", "/etc/passwd", "sub/probes.safetensors", "..",
                                  "", 7])
def test_tensor_file_outside_the_folder_is_refused(probe_dir, tmp_path, name):
    (tmp_path / "x").write_bytes(b"secret outside")
    rewrite_manifest(probe_dir, lambda m: m.update(tensor_file=name))
    with pytest.raises(ArtifactError, match="file name inside the artifact folder") as err:
        load_probe_checkpoint(probe_dir)
    assert "secret" not in str(err.value)


def test_symlinked_artifact_files_are_refused(probe_dir, tmp_path):
    outside = tmp_path / "elsewhere.safetensors"
    (probe_dir / "probes.safetensors").rename(outside)
    (probe_dir / "probes.safetensors").symlink_to(outside)
    with pytest.raises(ArtifactError, match="symlink"):
        load_probe_checkpoint(probe_dir)
    (probe_dir / "probes.safetensors").unlink()
    outside.rename(probe_dir / "probes.safetensors")
    load_probe_checkpoint(probe_dir)
    real = tmp_path / "manifest_elsewhere.json"
    (probe_dir / "manifest.json").rename(real)
    (probe_dir / "manifest.json").symlink_to(real)
    with pytest.raises(ArtifactError, match="symlink"):
        load_probe_checkpoint(probe_dir)


@pytest.mark.parametrize("change", [
    lambda m: m.update(feature_dim=200_000),
    lambda m: m.update(hidden=[200_000, 200_000]),
    lambda m: m.update(hidden="big"),
    lambda m: m.update(domains=["a", "b"]),
], ids=["feature_dim", "hidden", "hidden type", "domains"])
def test_manifest_shapes_are_checked_against_the_tensors_before_allocating(probe_dir, change,
                                                                           monkeypatch):
    import torch

    import daar_ops.algorithms.probes as probes

    built = []  # probes built with real memory (not on the meta device)
    real = probes.ProbeMLP
    monkeypatch.setattr(probes, "ProbeMLP", lambda *a: (
        torch.empty(0).device.type != "meta" and built.append(a)) or real(*a))
    rewrite_manifest(probe_dir, change)
    with pytest.raises(ArtifactError, match="do not match the manifest|malformed"):
        load_probe_checkpoint(probe_dir)
    assert not built  # nothing was allocated from the manifest's claims


def test_a_model_named_by_a_manifest_is_never_resolved_to_a_hub(probe_dir, tmp_path):
    from daar_ops.probe_checkpoint import checkpoint_model

    _, manifest = load_probe_checkpoint(probe_dir)
    with pytest.raises(ArtifactError, match="nothing is downloaded"):
        checkpoint_model(dict(manifest, model="org/name", model_path="/nowhere/m"))
    assert checkpoint_model(dict(manifest, model="smollm2-135m-instruct")) == \
        "smollm2-135m-instruct"
    assert checkpoint_model(dict(manifest, model_path=str(tmp_path))) == str(tmp_path)
