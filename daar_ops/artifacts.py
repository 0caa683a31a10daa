"""Tensor artifacts (probe checkpoints, centroid files): safetensors + a JSON manifest.

An artifact is a directory holding ``<name>.safetensors`` and ``manifest.json``. The manifest
records the SHA-256 of the tensor file, and ``manifest_sha256``, the SHA-256 of the manifest's own
content (canonical JSON without that key); both are verified on every load, so a truncated or
edited tensor file, or a manifest whose ``layer`` or order of ``domains`` was edited by hand, is a
clear error instead of silently wrong numbers. Nothing here unpickles anything.

The checksums detect corruption and hand edits, not tampering: whoever can rewrite the tensor file
can rewrite the manifest and its checksum too. So an artifact from elsewhere is read as untrusted
input whatever its checksums say: every file it names must be a plain file inside its folder (no
path, no ``..``, no symlink), the manifest is size-checked before it is parsed, loaders check the
shapes a manifest claims against the tensors before allocating anything from them
(:func:`daar_ops.probe_checkpoint.load_probe_checkpoint`), and a model the manifest names is used
only when it is a prepared short name or an existing local folder (:func:`recorded_model`), never
resolved to a model hub.
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
MAX_MANIFEST_BYTES = 16 << 20


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


def member(directory: str | os.PathLike, name: Any, what: str) -> Path:
    """The file ``name`` inside an artifact folder, refused unless it is a plain file name (no
    folder part, no ``..``, not absolute) of a regular file that is not a symlink."""
    if not isinstance(name, str) or not name or name in (".", "..") or "/" in name \
            or "\\" in name or "\0" in name or Path(name).name != name:
        raise ArtifactError(f"{directory}: the {what} must be a file name inside the artifact "
                            f"folder, got {name!r}")
    path = Path(directory) / name
    if path.is_symlink():
        raise ArtifactError(f"{directory}: the {what} {name} is a symlink; an artifact holds "
                            f"plain files only")
    if not path.exists():
        raise ArtifactError(f"{directory}: {what} {name} is missing")
    if not path.is_file():
        raise ArtifactError(f"{directory}: the {what} {name} is not a regular file")
    return path


def read_manifest(directory: str | os.PathLike) -> dict[str, Any]:
    """The verified manifest of an artifact directory (its own checksum must match)."""
    if not (Path(directory) / MANIFEST).exists() and not (Path(directory) / MANIFEST).is_symlink():
        raise ArtifactError(f"{directory}: no {MANIFEST} (not a daar-ops artifact directory)")
    path = member(directory, MANIFEST, "manifest")
    if path.stat().st_size > MAX_MANIFEST_BYTES:
        raise ArtifactError(f"{path}: {path.stat().st_size} bytes, more than a manifest can be "
                            f"({MAX_MANIFEST_BYTES})")
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
    tensor_path = member(directory, manifest.get("tensor_file", "tensors.safetensors"),
                         "tensor file")
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


def recorded_model(manifest: Mapping[str, Any], source: str) -> str:
    """The model an artifact was built on, as something that loads without a network: its
    recorded folder if that exists, else its name if that is a prepared short name
    (:data:`daar_ops.models.KNOWN_MODELS`). A hub id or a missing folder is refused (pass the
    model yourself to use it): a manifest from elsewhere must not make this package download."""
    from daar_ops.models import KNOWN_MODELS

    path, name = manifest.get("model_path"), manifest.get("model")
    if isinstance(path, str) and path and Path(path).is_dir():
        return path
    if isinstance(name, str) and name in KNOWN_MODELS:
        return name
    if isinstance(name, str) and name and Path(name).expanduser().is_dir():
        return name
    raise ArtifactError(
        f"the {source} was built on model {name!r} (folder {path!r}), which is neither a prepared "
        f"model ({', '.join(sorted(KNOWN_MODELS))}) nor a folder on this machine; pass the model "
        f"(a local folder) explicitly: nothing is downloaded for a model an artifact names")


def artifact_digest(directory: str | os.PathLike) -> str:
    """SHA-256 of an artifact's manifest file: it names the tensor file's checksum too, so two
    artifacts with the same digest hold the same tensors and settings. Stats written from an
    artifact carry this digest; a changed artifact makes the ops recompute."""
    return sha256_file(Path(directory) / MANIFEST)
