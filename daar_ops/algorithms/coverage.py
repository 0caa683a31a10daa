"""Coverage and diversity metrics of a selected subset, in one embedding space.

Blocked and memory bounded (O(block_size * n_selected), never O(N^2)); the nearest selected row
is found by :func:`daar_ops.algorithms.knn.nearest_cosine` (faiss flat search). No Data-Juicer import.

* :func:`facility_location_coverage`: ``(1/N) sum_v max_a max(0, cos(a, v))`` over the pool V and
  the selection A (QDIT's facility-location objective, normalised to [0, 1]).
* :func:`mean_nearest_selected_cosine`: mean over pool rows (by default only those *not* selected)
  of the cosine to their nearest selected row, unclipped: how well the left-out data is represented.
* :func:`mean_pairwise_similarity`: mean cosine over distinct pairs inside a subset (exact, O(n d)).
* :func:`label_entropy`: Shannon entropy (nats) of a label distribution.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Hashable, Iterable, Sequence

import numpy as np

from daar_ops.algorithms.knn import l2_normalize, nearest_cosine


def nearest_selected_cosine(pool: np.ndarray, selected: np.ndarray, block_size: int = 4096,
                            device: str = "cpu") -> np.ndarray:
    """[N] cosine of every pool row to its most similar selected row (rows are L2-normalised)."""
    pool = np.asarray(pool)
    selected = np.asarray(selected)
    if pool.ndim != 2 or selected.ndim != 2 or pool.shape[1] != selected.shape[1]:
        raise ValueError(f"expected 2-D arrays of equal width, got {pool.shape} and {selected.shape}")
    if len(selected) == 0:
        raise ValueError("the selection is empty: coverage is undefined")
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    return nearest_cosine(pool, selected, block_size=block_size, device=device)[1]


def facility_location_coverage(pool: np.ndarray, selected: np.ndarray, block_size: int = 4096,
                               device: str = "cpu") -> float:
    """Facility-location coverage in [0, 1]: mean over the pool of max(0, best cosine to A)."""
    best = nearest_selected_cosine(pool, selected, block_size, device)
    return float(np.clip(best, 0.0, None).mean()) if len(best) else float("nan")


def mean_nearest_selected_cosine(pool: np.ndarray, selected: np.ndarray,
                                 exclude: np.ndarray | None = None, block_size: int = 4096,
                                 device: str = "cpu") -> float:
    """Mean cosine of pool rows to their nearest selected row; rows where ``exclude`` is True
    (typically the selected rows themselves, whose value is 1) are left out. NaN if none remain."""
    pool = np.asarray(pool)
    if exclude is not None:
        exclude = np.asarray(exclude, dtype=bool)
        if exclude.shape != (len(pool),):
            raise ValueError(f"exclude must have shape ({len(pool)},), got {exclude.shape}")
        pool = pool[~exclude]
    if len(pool) == 0:
        return float("nan")
    return float(nearest_selected_cosine(pool, selected, block_size, device).mean())


def mean_pairwise_similarity(embeddings: np.ndarray) -> float:
    """Mean cosine over the n(n-1) ordered pairs of distinct rows; NaN for fewer than 2 rows.

    Uses ``|sum x|^2 = sum_i sum_j x_i.x_j`` on normalised rows, so it is exact and O(n d).
    """
    x = np.asarray(embeddings)
    n = len(x)
    if n < 2:
        return float("nan")
    x = l2_normalize(x).astype(np.float64)
    total = x.sum(axis=0)
    diag = (x * x).sum()
    return float((total @ total - diag) / (n * (n - 1)))


def label_distribution(labels: Iterable[Hashable | None]) -> dict[str, int]:
    """Counts per label (as str), most frequent first then by name; None/"" count as '<none>'."""
    counts = Counter("<none>" if lab is None or (isinstance(lab, float) and math.isnan(lab))
                     or str(lab).strip() == "" else str(lab) for lab in labels)
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def entropy_from_counts(counts: Sequence[int] | dict[str, int]) -> float:
    """Shannon entropy in nats of a count vector; NaN when the total is zero."""
    values = np.asarray(list(counts.values()) if isinstance(counts, dict) else counts, dtype=float)
    total = values.sum()
    if total <= 0:
        return float("nan")
    p = values[values > 0] / total
    return float(-(p * np.log(p)).sum())


def label_entropy(labels: Iterable[Hashable | None]) -> float:
    """Entropy (nats) of the label distribution; maximum is ln(number of labels)."""
    return entropy_from_counts(label_distribution(labels))
