"""Section 3 of the DaaR paper: inter-/intra-domain contrast of samples against label centroids.

With features x (the paper: embedding-layer masked means of the LLM) and per-domain centroids C_k:

* phi_inter(x) = sum over the *other* domains j != k(x) of cos(x, C_j)            (Eq. 2)
* phi_intra(x) = cos(x, C_k(x))                                                  (Eq. 4)
* Phi_inter    = mean L2 distance over distinct centroid pairs                    (Eq. 3)
* Phi_intra^k  = mean squared L2 distance of domain k's samples to C_k            (Eq. 5)

Contrastive pools keep a percentile band of phi per domain (e.g. 80-100 = the top 20%), as in the
paper's Table 1. No Data-Juicer import.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from daar_ops.algorithms.knn import l2_normalize
from daar_ops.core import budget, rank_order

UNLABELED = -1


def encode_labels(labels: Sequence[object], domains: Sequence[str] | None = None
                  ) -> tuple[list[str], np.ndarray]:
    """Map labels to indices. ``domains`` fixes the order (labels outside it -> -1); otherwise the
    sorted distinct non-empty labels are used. None / "" / NaN are unlabeled (-1)."""
    clean = [None if lab is None or (isinstance(lab, float) and lab != lab) or str(lab).strip() == ""
             else str(lab) for lab in labels]
    names = list(domains) if domains is not None else sorted({c for c in clean if c is not None})
    index = {name: i for i, name in enumerate(names)}
    return names, np.array([index.get(c, UNLABELED) if c is not None else UNLABELED for c in clean],
                           dtype=np.int64)


def label_centroids(features: np.ndarray, label_idx: np.ndarray, n_domains: int) -> np.ndarray:
    """[K, d] mean feature per domain (float64 accumulation); a domain with no sample raises."""
    x = np.asarray(features, dtype=np.float64)
    label_idx = np.asarray(label_idx)
    if x.ndim != 2 or label_idx.shape != (len(x),):
        raise ValueError(f"features [N, d] and labels [N] expected, got {x.shape}, {label_idx.shape}")
    counts = np.bincount(label_idx[label_idx >= 0], minlength=n_domains)[:n_domains]
    if (counts == 0).any():
        raise ValueError(f"domains without samples: {np.flatnonzero(counts == 0).tolist()}")
    sums = np.zeros((n_domains, x.shape[1]))
    np.add.at(sums, label_idx[label_idx >= 0], x[label_idx >= 0])
    return (sums / counts[:, None]).astype(np.float32)


def centroid_cosines(features: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """[N, K] cosine of every sample to every centroid (float64)."""
    return l2_normalize(features).astype(np.float64) @ l2_normalize(centroids).astype(np.float64).T


def phi_scores(features: np.ndarray, centroids: np.ndarray, label_idx: np.ndarray
               ) -> tuple[np.ndarray, np.ndarray]:
    """(phi_inter [N], phi_intra [N]) float64 (Eq. 2 and Eq. 4); NaN for unlabeled rows (-1)."""
    label_idx = np.asarray(label_idx)
    cos = centroid_cosines(features, centroids)
    labeled = label_idx >= 0
    own = np.full(len(label_idx), np.nan)
    own[labeled] = cos[np.flatnonzero(labeled), label_idx[labeled]]
    inter = np.where(labeled, cos.sum(axis=1) - np.nan_to_num(own), np.nan)
    return inter, own


def global_phi_inter(centroids: np.ndarray) -> float:
    """Eq. 3: mean L2 distance over distinct centroid pairs; NaN with fewer than 2 centroids."""
    c = np.asarray(centroids, dtype=np.float64)
    k = len(c)
    if k < 2:
        return float("nan")
    d = np.sqrt(np.maximum(((c[:, None, :] - c[None, :, :]) ** 2).sum(-1), 0.0))
    return float(d[np.triu_indices(k, 1)].mean())


def global_phi_intra(features: np.ndarray, centroids: np.ndarray, label_idx: np.ndarray
                     ) -> np.ndarray:
    """Eq. 5: [K] mean squared L2 distance of each domain's samples to its centroid (NaN if none)."""
    x = np.asarray(features, dtype=np.float64)
    c = np.asarray(centroids, dtype=np.float64)
    label_idx = np.asarray(label_idx)
    out = np.full(len(c), np.nan)
    for k in range(len(c)):
        rows = x[label_idx == k]
        if len(rows):
            out[k] = float(((rows - c[k]) ** 2).sum(axis=1).mean())
    return out


def percentile_band(scores: np.ndarray, label_idx: np.ndarray, lower: float, upper: float
                    ) -> np.ndarray:
    """[N] bool: per domain, the rows whose score lies in the [lower%, upper%] band of that domain.

    Bands are counted from the top with the package's budget rule and tie rule
    (:func:`daar_ops.core.budget`, :func:`daar_ops.core.rank_order`: best first, ties to the
    earlier row, NaN lowest): the band holds the rows of descending rank
    ``[budget(n_k, 1 - upper/100), budget(n_k, 1 - lower/100))``, so the top-20% band (80-100)
    keeps exactly as many rows as every other top-20% selection, and consecutive bands partition
    a domain. Unlabeled rows (-1) are never in a band.
    """
    if not 0 <= lower < upper <= 100:
        raise ValueError(f"need 0 <= lower < upper <= 100, got {lower}, {upper}")
    scores = np.asarray(scores, dtype=np.float64)
    label_idx = np.asarray(label_idx)
    keep = np.zeros(len(scores), dtype=bool)
    for k in np.unique(label_idx[label_idx >= 0]):
        rows = np.flatnonzero(label_idx == k)
        order = rows[rank_order(scores[rows])]
        n = len(rows)
        start = budget(n, ratio=round(1.0 - upper / 100, 12))
        stop = budget(n, ratio=round(1.0 - lower / 100, 12))
        keep[order[start:stop]] = True
    return keep
