"""QDIT research variants, built on the product's greedy (:mod:`daar_ops.algorithms.qdit`).

* The diversity scalings that lost to ``budget``: ``mean`` (divide d(a|A) by N, the former
  default), ``max_singleton`` (by the best first-step gain) and ``none`` (= 1.0, the raw sum).
  Under ``mean`` and ``max_singleton`` the diversity term falls to ~1e-3 after a few picks, so any
  alpha >= 0.1 selects the top K by quality (399 of 400 at alpha = 0.7 on the pool): alpha trades
  nothing (docs/qdit.md, ``tools/bench_qdit.py --alpha-sweep``). Each resolves to a fixed number
  that the product's ``diversity_scale`` accepts, so the greedy itself is the product's.
* :func:`facility_location_value`: d(A) of any index set, what the benchmarks and tests compare
  selections by (the product reports d(A) of its own selection as ``QditResult.objective``).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch

from daar_ops.algorithms.knn import l2_normalize
from daar_ops.algorithms.qdit import QditConfig, qdit_select as product_select
from daar_ops.algorithms.qdit.backends import TORCH_DTYPES, BlockedRows
from daar_ops.algorithms.qdit.selection import QditResult, prepare_embeddings

RESEARCH_SCALES = ("mean", "max_singleton", "none")


def facility_location_value(embeddings: np.ndarray, indices: Sequence[int],
                            block_size: int = 4096, device: str = "cpu") -> float:
    """d(A) = sum_v max_{a in A} max(0, cos(a, v)), computed in blocks (float64 sum)."""
    idx = np.asarray(indices, dtype=np.int64)
    if idx.size == 0:
        return 0.0
    x = torch.from_numpy(l2_normalize(embeddings)).to(device)
    sel = x[torch.from_numpy(idx).to(device)]
    total = 0.0
    for start in range(0, x.shape[0], block_size):
        s = x[start:start + block_size] @ sel.T
        total += float(s.max(dim=1).values.clamp(min=0.0).sum(dtype=torch.float64))
    return total


def first_gains(embeddings: np.ndarray, compute_dtype: str = "float32",
                max_memory_mb: float = 2048.0) -> np.ndarray:
    """d(a | {}) of every row: its summed clipped similarity, by the product's backend."""
    x = torch.from_numpy(prepare_embeddings(embeddings, compute_dtype))
    backend = BlockedRows(x, TORCH_DTYPES[compute_dtype], max_memory_mb)
    mdtype = torch.float64 if compute_dtype == "float64" else torch.float32
    return backend.all_gains(torch.zeros(len(x), dtype=mdtype), False).numpy()


def research_scale(embeddings: np.ndarray, diversity_scale: Any, compute_dtype: str = "float32",
                   max_memory_mb: float = 2048.0) -> Any:
    """The fixed divisor a research scaling stands for (other values are returned as given)."""
    if diversity_scale == "mean":
        return float(len(embeddings))
    if diversity_scale == "none":
        return 1.0
    if diversity_scale == "max_singleton":
        gains = first_gains(embeddings, compute_dtype, max_memory_mb)
        top = float(gains.max()) if len(gains) else 0.0
        return top if top > 0 else 1.0
    return diversity_scale


def qdit_select(embeddings: np.ndarray, config: QditConfig | None = None,
                quality: Any = None, *, diversity_scale: Any = None, **kwargs: Any) -> QditResult:
    """The product's :func:`~daar_ops.algorithms.qdit.qdit_select`, also accepting the research
    scalings in ``diversity_scale`` (resolved to a number first)."""
    if diversity_scale is not None:
        dtype = kwargs.get("compute_dtype", (config or QditConfig).compute_dtype)
        memory = kwargs.get("max_memory_mb", (config or QditConfig).max_memory_mb)
        kwargs["diversity_scale"] = research_scale(embeddings, diversity_scale, dtype, memory)
    return product_select(embeddings, config, quality, **kwargs)
