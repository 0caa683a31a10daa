"""Tensor artifacts (probe checkpoints, centroid files): safetensors + a JSON manifest.

An artifact is a directory holding ``<name>.safetensors`` and ``manifest.json``. The manifest
records the SHA-256 of the tensor file, verified on every load, so a truncated or edited file is a
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
FORMAT_VERSION = 1


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

    The manifest gains ``kind``, ``format_version``, ``tensor_file``, ``sha256`` and ``versions``.
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
    (directory / MANIFEST).write_text(json.dumps(full, indent=2, sort_keys=True, default=str))
    return directory


def read_manifest(directory: str | os.PathLike) -> dict[str, Any]:
    path = Path(directory) / MANIFEST
    if not path.exists():
        raise ArtifactError(f"{directory}: no {MANIFEST} (not a daar-ops artifact directory)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ArtifactError(f"{path}: corrupted manifest ({err})") from err


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
    if manifest.get("format_version", 0) > FORMAT_VERSION:
        raise ArtifactError(f"{directory}: format_version {manifest['format_version']} is newer "
                            f"than this daar-ops understands ({FORMAT_VERSION}); upgrade daar-ops")
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
