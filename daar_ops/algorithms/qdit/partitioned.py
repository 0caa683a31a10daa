"""QDIT for very large N in seeded random parts (``partition_size``): each part selects its share
of the budget with the chosen greedy and the picks are merged (GreeDi's first round,
Mirzasoleiman et al. 2013): N^2 / P similarity work instead of N^2."""

from __future__ import annotations

import math

import numpy as np
from loguru import logger

from daar_ops.algorithms.qdit.config import QditConfig


def partitioned_select(x: np.ndarray, q: np.ndarray | None, k: int, config: QditConfig,
                       meta: dict, device: str, progress: bool):
    """Rows ``x`` (normalised) in parts of about ``config.partition_size``; per-part budgets
    proportional to the part's size (largest remainder, ties by part order); quality ``q`` was
    normalised once over the whole set, so the parts share one scale. The merged order is by
    marginal gain; ``objective`` is the sum of the parts' objectives (a lower bound of d(A))."""
    from daar_ops.algorithms.qdit.selection import QditResult, qdit_select

    n = x.shape[0]
    n_parts = int(math.ceil(n / config.partition_size))
    parts = np.array_split(np.random.default_rng(config.seed).permutation(n), n_parts)
    exact = np.array([k * len(p) / n for p in parts])
    budgets = np.floor(exact).astype(int)
    budgets[np.argsort(-(exact - budgets), kind="stable")[:k - int(budgets.sum())]] += 1
    part_config = config.with_budget(0, partition_size=None, quality_norm="none",
                                     quality_fill="min")
    idx, gains, dgains, objective, evals = [], [], [], 0.0, 0
    for j, (part, b) in enumerate(zip(parts, budgets)):
        part = np.sort(part)
        if progress:
            logger.info(f"QDIT partition {j + 1}/{n_parts}: {len(part)} rows, selecting {b}")
        r = qdit_select(x[part], part_config, None if q is None else q[part], device=device,
                        progress=progress, select_num=int(b))
        idx.append(part[r.indices])
        gains.append(r.gains)
        dgains.append(r.diversity_gains)
        objective += r.objective
        evals += r.n_evaluations
    idx_a, gains_a, dgains_a = np.concatenate(idx), np.concatenate(gains), np.concatenate(dgains)
    order = np.lexsort((idx_a, -gains_a))
    meta.update(partitions=n_parts, partition_size=config.partition_size,
                evaluations_per_step=evals / max(k, 1))
    return QditResult(idx_a[order].astype(np.int64), gains_a[order], dgains_a[order], q,
                      float("nan"), objective, evals, meta)
