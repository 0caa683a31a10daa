"""The DaaR centroid file: a ``daar_centroids`` artifact (:mod:`daar_ops.artifacts`, checksummed)
holding the tensor ``centroids`` [K, d] float32 and a manifest with the domains, the feature
definition and the feature model's description (docs/daar_stage1.md "Centroid files").

Written by ``centroid_synthesis_mapper`` and ``daar-ops select``; read by
``domain_pseudo_label_mapper`` and ``domain_contrastive_selector``. No Data-Juicer import.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from daar_ops.algorithms.synthesis import DomainSpec
from daar_ops.artifacts import ArtifactError, load_artifact, save_artifact

CENTROID_KIND = "daar_centroids"


def compatibility_keys(feature: str) -> tuple[str, ...]:
    """Manifest keys that must match the live extractor (embedding features do not depend on
    the extractor's layer)."""
    base = ("model_fingerprint", "feature_dim", "feature")
    return base + (("layer",) if feature == "layer" else ())


def feature_description(describe: Mapping[str, Any], feature: str) -> dict[str, Any]:
    """The extractor's ``describe()`` plus the feature kind (what a centroid file records)."""
    out = dict(describe)
    out["feature"] = feature
    if feature == "embedding":
        out["layer"] = 0
    return out


def save_centroids(directory: Any, centroids: np.ndarray, domains: Sequence[DomainSpec],
                   describe: Mapping[str, Any], feature: str, template: str,
                   counts: Sequence[int], extra: Mapping[str, Any] | None = None) -> Any:
    """Write a ``daar_centroids`` artifact: tensor ``centroids`` [K, d] + manifest."""
    centroids = np.asarray(centroids, dtype=np.float32)
    if centroids.shape[0] != len(domains):
        raise ValueError(f"{centroids.shape[0]} centroids for {len(domains)} domains")
    manifest = feature_description(describe, feature)
    manifest.update(domains=[d.name for d in domains],
                    descriptions={d.name: d.description for d in domains},
                    template=template, counts=[int(c) for c in counts])
    if extra:
        manifest.update(extra)
    return save_artifact(directory, {"centroids": centroids}, manifest, kind=CENTROID_KIND)


def load_centroids(directory: Any) -> tuple[np.ndarray, dict[str, Any]]:
    """(centroids [K, d] float32, manifest) of a verified ``daar_centroids`` artifact."""
    tensors, manifest = load_artifact(directory, kind=CENTROID_KIND)
    cents = tensors.get("centroids")
    domains = manifest.get("domains")
    if cents is None or cents.ndim != 2 or not isinstance(domains, list) \
            or len(domains) != cents.shape[0]:
        raise ArtifactError(f"{directory}: a centroid file needs a [K, d] 'centroids' tensor and "
                            f"K domain names")
    if not np.isfinite(cents).all():
        raise ArtifactError(f"{directory}: centroids contain NaN/inf")
    return cents.astype(np.float32), manifest
