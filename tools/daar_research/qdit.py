"""QDIT research variants, built on the product's greedy (:mod:`daar_ops.algorithms.qdit`).

* The diversity scalings that lost to ``budget``: ``mean`` (divide d(a|A) by N, the former
  default), ``max_singleton`` (by the best first-step gain) and ``none`` (= 1.0, the raw sum).
  Under ``mean`` and ``max_singleton`` the diversity term falls to ~1e-3 after a few picks, so any
  alpha >= 0.1 selects the top K by quality (399 of 400 at alpha = 0.7 on the pool): alpha trades
  nothing (docs/qdit.md, ``tools/bench_qdit.py --alpha-sweep``). Each resolves to a fixed number
  that the product's ``diversity_scale`` accepts, so the greedy itself is the product's.
* :func:`facility_location_value`: d(A) of any index set, what the benchmarks and tests compare
  selections by (the product reports d(A) of its own selection as ``QditResult.objective``).
* :func:`first_round_select`: the former ``partition_size`` (parts select their share of the
  budget, merged without a second round), which ``tools/bench_qdit.py --synthetic`` measured at
  N = 200k; the product's ``partition_size`` is now GreeDi (both rounds).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch

from daar_ops.algorithms.knn import l2_normalize
from daar_ops.algorithms.qdit import QditConfig, qdit_select as product_select
from daar_ops.algorithms.qdit.backends import TORCH_DTYPES, BlockedRows
from daar_ops.algorithms.qdit.selection import QditResult, normalize_quality, prepare_embeddings

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


def first_round_select(embeddings: np.ndarray, config: QditConfig | None = None,
                       quality: Any = None, *, device: str = "cpu", progress: bool = False,
                       **params: Any) -> QditResult:
    """The former ``partition_size`` (before GreeDi's second round was added): seeded random
    parts of ``partition_size`` rows each select their share of the budget (``K * |part| / N``,
    largest remainder, ties by part order) and the picks are merged, ordered by marginal gain;
    ``objective`` is the sum of the parts' objectives. No second round, so it scales to budgets
    above the part size (tools/bench_qdit.py --synthetic measures it at N = 200k)."""
    config = QditConfig.of(config, **params)
    x = prepare_embeddings(embeddings, config.compute_dtype)
    n, k = len(x), config.budget(len(x))
    q = None if quality is None or config.alpha == 0 else \
        normalize_quality(quality, config.quality_norm, config.quality_fill)[0]
    parts = [np.asarray(p) for p in np.array_split(
        np.random.default_rng(config.seed).permutation(n), max(1, -(-n // config.partition_size)))]
    exact = np.array([k * len(p) / n for p in parts])
    budgets = np.floor(exact).astype(int)
    budgets[np.argsort(-(exact - budgets), kind="stable")[:k - int(budgets.sum())]] += 1
    part_config = config.with_budget(0, partition_size=None, quality_norm="none")
    runs = []
    for part, b in zip(parts, budgets):
        part = np.sort(part)
        r = product_select(x[part], part_config, None if q is None else q[part], device=device,
                           progress=progress, select_num=int(b))
        runs.append((part[r.indices], r))
    idx = np.concatenate([p for p, _ in runs])
    gains = np.concatenate([r.gains for _, r in runs])
    order = np.lexsort((idx, -gains))
    return QditResult(idx[order].astype(np.int64), gains[order],
                      np.concatenate([r.diversity_gains for _, r in runs])[order], q,
                      float("nan"), float(sum(r.objective for _, r in runs)),
                      sum(r.n_evaluations for _, r in runs),
                      dict(partitions=len(parts), evaluations_per_step=sum(
                          r.n_evaluations for _, r in runs) / max(k, 1)))
