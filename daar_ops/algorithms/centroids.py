"""DaaR stage 1, centroids: mean features per domain and nearest-centroid assignment.

No Data-Juicer import, no model loaded, no file written: plain numpy. The pairs the centroids are
made of come from :mod:`daar_ops.algorithms.synthesis`; the features from
:func:`daar_ops.features.embed_texts`; the centroid file is :mod:`daar_ops.centroid_file`.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

METRICS = ("cosine", "euclidean")
FEATURES = ("embedding", "layer")


def unit_rows(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (float64); non-finite entries count as 0, a zero row stays 0."""
    x = np.asarray(x, dtype=np.float64)
    x = np.where(np.isfinite(x), x, 0.0)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def compute_centroids(features: np.ndarray, labels: Sequence[Any],
                      names: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Mean feature per name (order of ``names``): (centroids [K, d] float32, counts [K]).

    Raises ValueError when a name has no row (a centroid cannot be made up).
    """
    features = np.asarray(features, dtype=np.float64)
    labels = np.asarray([str(x) for x in labels])
    if features.ndim != 2 or len(features) != len(labels):
        raise ValueError(f"features must be [N, d] with N = len(labels) = {len(labels)}, "
                         f"got {features.shape}")
    cents, counts = [], []
    for name in names:
        rows = features[labels == str(name)]
        if len(rows) == 0:
            raise ValueError(f"no sample for domain '{name}': cannot compute its centroid")
        cents.append(rows.mean(0))
        counts.append(len(rows))
    return np.stack(cents).astype(np.float32), np.asarray(counts, dtype=np.int64)


def similarities(features: np.ndarray, centroids: np.ndarray,
                 metric: str = "cosine") -> np.ndarray:
    """[N, K] similarity: cosine, or the negative euclidean distance. Non-finite rows -> -inf."""
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    x = np.asarray(features, dtype=np.float64)
    c = np.asarray(centroids, dtype=np.float64)
    if x.ndim != 2 or c.ndim != 2 or x.shape[1] != c.shape[1]:
        raise ValueError(f"feature dim {x.shape} does not match centroids {c.shape}")
    bad = ~np.isfinite(x).all(1)
    x = np.where(bad[:, None], 0.0, x)
    if metric == "cosine":
        sims = unit_rows(x) @ unit_rows(c).T
    else:
        sq = (x ** 2).sum(1, keepdims=True) - 2 * x @ c.T + (c ** 2).sum(1)[None, :]
        sims = -np.sqrt(np.maximum(sq, 0.0))
    sims[bad] = -np.inf
    return sims


def assign_nearest(features: np.ndarray, centroids: np.ndarray,
                   metric: str = "cosine") -> tuple[np.ndarray, np.ndarray]:
    """(labels [N] int64 = argmax similarity, first index on ties; similarities [N, K] float32)."""
    sims = similarities(features, centroids, metric)
    return np.argmax(sims, axis=1).astype(np.int64), sims.astype(np.float32)


def check_feature(feature: str, layer: int) -> int:
    """Validate a feature definition; return the extractor layer to load (0 for embedding)."""
    if feature not in FEATURES:
        raise ValueError(f"feature must be one of {FEATURES}, got {feature!r}")
    if feature == "layer" and (not isinstance(layer, int) or layer < 1):
        raise ValueError(f"feature='layer' needs layer >= 1, got {layer!r}")
    return 0 if feature == "embedding" else layer
