"""Tensor artifacts (probe checkpoints, centroid files): safetensors + a JSON manifest.

An artifact is a directory holding ``<name>.safetensors`` and ``manifest.json``. The manifest
records the SHA-256 of the tensor file, and ``manifest_sha256``, the SHA-256 of the manifest's own
content (canonical JSON without that key); both are verified on every load, so a truncated or
edited tensor file, or a manifest whose ``layer`` or order of ``domains`` was edited by hand, is a
clear error instead of silently wrong numbers. Nothing here unpickles anything.
No Data-Juicer import.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
from pathlib import Path
from typing import Any, Mapping

import numpy as np

MANIFEST = "manifest.json"
FORMAT_VERSION = 2  # 2: the manifest carries its own checksum


class ArtifactError(ValueError):
    """A missing, corrupted or incompatible artifact."""


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def library_versions() -> dict[str, str]:
    import safetensors
    import torch
    import transformers

    import daar_ops

    return {"daar_ops": daar_ops.__version__, "torch": torch.__version__,
            "transformers": transformers.__version__, "safetensors": safetensors.__version__,
            "numpy": np.__version__, "python": platform.python_version()}


def save_artifact(directory: str | os.PathLike, tensors: Mapping[str, Any],
                  manifest: Mapping[str, Any], kind: str, tensor_file: str = "tensors.safetensors"
                  ) -> Path:
    """Write tensors (numpy arrays or torch tensors) and the manifest; return the directory.

    The manifest gains ``kind``, ``format_version``, ``tensor_file``, ``sha256``, ``tensors``,
    ``versions`` and ``manifest_sha256``.
    """
    from safetensors.numpy import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    arrays = {k: _to_numpy(v) for k, v in tensors.items()}
    tensor_path = directory / tensor_file
    tmp = tensor_path.with_suffix(".tmp")
    save_file(arrays, str(tmp))
    os.replace(tmp, tensor_path)
    full = dict(manifest)
    full.update(kind=kind, format_version=FORMAT_VERSION, tensor_file=tensor_file,
                sha256=sha256_file(tensor_path),
                tensors={k: list(a.shape) for k, a in arrays.items()},
                versions=library_versions())
    full.pop("manifest_sha256", None)
    # checksum what a reader will parse (default=str turns e.g. Paths into strings)
    written = json.loads(json.dumps(full, sort_keys=True, default=str))
    written["manifest_sha256"] = manifest_digest(written)
    manifest_path = directory / MANIFEST
    tmp = manifest_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(written, indent=2, sort_keys=True))
    os.replace(tmp, manifest_path)
    return directory


def manifest_digest(manifest: Mapping[str, Any]) -> str:
    """SHA-256 of a manifest's content without its ``manifest_sha256`` key (canonical JSON)."""
    body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canonical.encode("ascii")).hexdigest()


def read_manifest(directory: str | os.PathLike) -> dict[str, Any]:
    """The verified manifest of an artifact directory (its own checksum must match)."""
    path = Path(directory) / MANIFEST
    if not path.exists():
        raise ArtifactError(f"{directory}: no {MANIFEST} (not a daar-ops artifact directory)")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ArtifactError(f"{path}: corrupted manifest ({err})") from err
    if not isinstance(manifest, dict):
        raise ArtifactError(f"{path}: corrupted manifest (not a JSON object)")
    version = manifest.get("format_version", 0)
    if not isinstance(version, int) or version < 2:
        raise ArtifactError(f"{path}: format_version {version!r} has no manifest checksum (written "
                            "by an older daar-ops); re-create the artifact")
    if version > FORMAT_VERSION:
        raise ArtifactError(f"{directory}: format_version {version} is newer than this daar-ops "
                            f"understands ({FORMAT_VERSION}); upgrade daar-ops")
    recorded, actual = manifest.get("manifest_sha256"), manifest_digest(manifest)
    if recorded != actual:
        raise ArtifactError(
            f"{path}: manifest checksum mismatch (recorded {recorded}, content hashes to "
            f"{actual}): manifest.json was edited or corrupted after it was written (a changed "
            "'layer', 'template' or order of 'domains' would silently change every score or "
            "label); re-create the artifact instead of editing it")
    return manifest


def load_artifact(directory: str | os.PathLike, kind: str | None = None
                  ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Load and verify an artifact: (tensors as numpy arrays, manifest)."""
    from safetensors.numpy import load_file

    directory = Path(directory)
    if not directory.is_dir():
        raise ArtifactError(f"artifact directory {directory} does not exist")
    manifest = read_manifest(directory)
    if kind is not None and manifest.get("kind") != kind:
        raise ArtifactError(f"{directory} holds a '{manifest.get('kind')}' artifact, not '{kind}'")
    tensor_path = directory / manifest.get("tensor_file", "tensors.safetensors")
    if not tensor_path.exists():
        raise ArtifactError(f"{directory}: tensor file {tensor_path.name} is missing")
    actual = sha256_file(tensor_path)
    if actual != manifest.get("sha256"):
        raise ArtifactError(f"{tensor_path}: checksum mismatch (manifest {manifest.get('sha256')}, "
                            f"file {actual}); the file is corrupted or was modified")
    try:
        tensors = load_file(str(tensor_path))
    except Exception as err:  # safetensors raises its own error types
        raise ArtifactError(f"{tensor_path}: unreadable safetensors file ({err})") from err
    return tensors, manifest


def check_compatible(manifest: Mapping[str, Any], features: Mapping[str, Any],
                     keys: tuple[str, ...] = ("model_fingerprint", "layer", "feature_dim"),
                     source: str = "artifact") -> None:
    """Raise ArtifactError naming every key where the artifact and the live features differ.

    ``features`` is :meth:`LayerFeatureExtractor.describe` (or any mapping with the same keys).
    """
    diffs = [f"{k}: {source} has {manifest.get(k)!r}, the model gives {features.get(k)!r}"
             for k in keys if manifest.get(k) != features.get(k)]
    if diffs:
        raise ArtifactError(
            f"the {source} was built with another model or feature definition "
            f"(built on '{manifest.get('model')}', now '{features.get('model')}'):\n  "
            + "\n  ".join(diffs))


def _to_numpy(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):
        value = value.detach().cpu().contiguous().numpy()
    return np.ascontiguousarray(value)


def artifact_digest(directory: str | os.PathLike) -> str:
    """SHA-256 of an artifact's manifest file: it names the tensor file's checksum too, so two
    artifacts with the same digest hold the same tensors and settings. Stats written from an
    artifact carry this digest; a changed artifact makes the ops recompute."""
    return sha256_file(Path(directory) / MANIFEST)
