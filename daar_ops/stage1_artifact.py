"""A fitted stage 1 as a checksummed artifact (``daar_stage1``), like the probe checkpoint.

``domain_pseudo_label_mapper`` fits stage 1 on its dataset (the probe pool) and can write it
(``save_stage1``); ``daar-ops fit-stage1`` does the same from files; with ``stage1_path`` the
mapper labels every record on its own from the file (per sample: under Ray, on any pool).

Layout: ``tensors.safetensors`` holds ``prototypes`` [K, d], per clustering ``centres_<i>``
[C_i, dc] and ``centre_labels_<i>`` [C_i], and for the joint space ``joint_mean``,
``joint_components``, ``joint_scale``; ``manifest.json`` holds the method, the domains in label
order, the text template, the labelling space's feature description (checked against the live
model before any record is labelled), the joint LM features' description and the stage-1
config. A file from elsewhere is untrusted: its shapes are checked against one another and
against a size cap from the manifest before the tensors are read.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from daar_ops.algorithms.pseudo_labels import JointTransform, Stage1Model
from daar_ops.artifacts import (ArtifactError, load_artifact, member, read_manifest,
                                save_artifact)

KIND = "daar_stage1"
MAX_TENSOR_BYTES = 1 << 30  # a fitted stage 1 is kilobytes to megabytes; refuse anything huge
MAX_CLUSTERINGS = 256


def save_stage1(directory: str | os.PathLike, model: Stage1Model, domains: list[str],
                manifest: Mapping[str, Any]) -> Path:
    """Write ``model`` (labels index ``domains``) with ``manifest`` (template, feature
    descriptions, config) as a ``daar_stage1`` artifact; return the directory."""
    if len(domains) != model.n_domains:
        raise ValueError(f"{len(domains)} domain names for a stage 1 of {model.n_domains}")
    tensors: dict[str, np.ndarray] = {"prototypes": model.prototypes.astype(np.float64)}
    for i, (centres, labels) in enumerate(zip(model.centres, model.centre_labels or
                                              [None] * len(model.centres))):
        tensors[f"centres_{i}"] = centres.astype(np.float64)
        if labels is not None:
            tensors[f"centre_labels_{i}"] = labels.astype(np.int64)
    joint = model.joint
    if joint is not None:
        tensors["joint_mean"] = joint.mean.astype(np.float64)
        if joint.components is not None:
            tensors["joint_components"] = joint.components.astype(np.float64)
            tensors["joint_scale"] = joint.scale.astype(np.float64)
    full = dict(manifest)
    full.update(method=model.method, domains=list(domains), n_clusterings=len(model.centres),
                joint_weight=None if joint is None else joint.weight)
    return save_artifact(directory, tensors, full, kind=KIND)


def _check_manifest(directory: str | os.PathLike, manifest: Mapping[str, Any]) -> None:
    """Refuse a manifest whose tensors do not fit together, before any tensor is read."""
    shapes, domains = manifest.get("tensors"), manifest.get("domains")
    n = manifest.get("n_clusterings")
    method = manifest.get("method")
    if not isinstance(shapes, dict) or not isinstance(domains, list) or not domains or \
            not isinstance(n, int) or not 0 <= n <= MAX_CLUSTERINGS or \
            method not in ("fixed", "kmeans", "cluster"):
        raise ArtifactError(f"{directory}: not a valid stage-1 file (method, domains, "
                            f"n_clusterings or tensors missing or out of range)")
    k = len(domains)
    proto = shapes.get("prototypes")
    if not (isinstance(proto, list) and len(proto) == 2 and proto[0] == k):
        raise ArtifactError(f"{directory}: prototypes {proto} do not match {k} domains")
    expected = {"prototypes"} | {f"centres_{i}" for i in range(n)}
    if method == "cluster":
        expected |= {f"centre_labels_{i}" for i in range(n)}
    if manifest.get("joint_weight") is not None:
        expected |= {"joint_mean"} | ({"joint_components", "joint_scale"}
                                      if "joint_components" in shapes else set())
    if set(shapes) != expected:
        raise ArtifactError(f"{directory}: tensors {sorted(shapes)} are not those of a "
                            f"'{method}' stage 1 ({sorted(expected)})")
    if not {"fixed": n == 0, "kmeans": n == 1, "cluster": n >= 1}[method]:
        raise ArtifactError(f"{directory}: {n} clusterings do not fit method '{method}'")
    total = 0
    for name, shape in shapes.items():
        if not isinstance(shape, list) or not all(isinstance(s, int) and s >= 0 for s in shape):
            raise ArtifactError(f"{directory}: tensor {name} has a malformed shape {shape!r}")
        total += 8 * int(np.prod(shape, dtype=np.float64))
    if total > MAX_TENSOR_BYTES:
        raise ArtifactError(f"{directory}: the manifest announces {total} bytes of tensors, more "
                            f"than a stage-1 file can hold ({MAX_TENSOR_BYTES})")
    tensor_file = member(directory, manifest.get("tensor_file", "tensors.safetensors"),
                         "tensor file")
    if tensor_file.stat().st_size > total + (1 << 20):
        raise ArtifactError(f"{tensor_file}: {tensor_file.stat().st_size} bytes for {total} "
                            f"bytes of announced tensors")


def load_stage1(directory: str | os.PathLike) -> tuple[Stage1Model, dict[str, Any]]:
    """(model, manifest) of a verified ``daar_stage1`` artifact."""
    manifest = read_manifest(directory)
    if manifest.get("kind") != KIND:
        raise ArtifactError(f"{directory} holds a '{manifest.get('kind')}' artifact, not '{KIND}'")
    _check_manifest(directory, manifest)
    t, manifest = load_artifact(directory, kind=KIND)
    n, d = len(manifest["domains"]), t["prototypes"].shape[1]
    centres = tuple(t[f"centres_{i}"] for i in range(manifest["n_clusterings"]))
    labels = tuple(t[f"centre_labels_{i}"] for i in range(len(centres))) \
        if manifest["method"] == "cluster" else ()
    joint = None
    if manifest.get("joint_weight") is not None:
        joint = JointTransform(float(manifest["joint_weight"]), t["joint_mean"],
                               t.get("joint_components"), t.get("joint_scale"))
    model = Stage1Model(manifest["method"], t["prototypes"], centres, labels, joint)
    _check_model(directory, model, n, d)
    return model, manifest


def _check_model(directory: Any, model: Stage1Model, n: int, d: int) -> None:
    arrays = [model.prototypes, *model.centres]
    if model.joint is not None:
        arrays += [a for a in (model.joint.mean, model.joint.components, model.joint.scale)
                   if a is not None]
    if not all(np.isfinite(a).all() for a in arrays):
        raise ArtifactError(f"{directory}: the stage-1 tensors contain NaN/inf")
    dc = None if not model.centres else model.centres[0].shape[1]
    for centres, labels in zip(model.centres, model.centre_labels or [None] * len(model.centres)):
        if centres.ndim != 2 or centres.shape[1] != dc or len(centres) < 1:
            raise ArtifactError(f"{directory}: clusterings of different widths")
        if labels is not None and (labels.shape != (len(centres),) or labels.min() < 0
                                   or labels.max() >= n):
            raise ArtifactError(f"{directory}: cluster labels out of the {n} domains")
    if model.method == "kmeans" and model.centres[0].shape != (n, d):
        raise ArtifactError(f"{directory}: k-means centres must be [{n}, {d}]")
    joint = model.joint
    if model.method == "cluster":
        width = d if joint is None else d + (len(joint.mean) if joint.components is None
                                             else joint.components.shape[0])
        if dc != width:
            raise ArtifactError(f"{directory}: cluster centres have {dc} columns, the space "
                                f"{width}")
    if joint is not None and joint.components is not None and (
            joint.components.shape[1] != len(joint.mean)
            or joint.scale.shape != (joint.components.shape[0],)):
        raise ArtifactError(f"{directory}: the joint whitening's shapes do not fit together")
