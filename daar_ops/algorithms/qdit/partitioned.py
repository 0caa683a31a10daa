"""Partitioned QDIT in the style of GreeDi (Mirzasoleiman et al. 2013), for data too large for one
exact greedy: the greedy on each partition picks the budget K (all of a smaller partition), then
the greedy on the union of their picks picks the final K.

Each round is the exact QDIT greedy on a subset: its facility-location gains are over that subset
(the partition, then the union), and its quality is the one normalised over the whole set, so
every round ranks quality alike. ``diversity_scale: budget`` scales each round by its own
``0.1 * rows / K`` (alpha keeps its meaning); a fixed number is scaled by ``rows / N`` (the raw
gains of a subset of ``rows`` are about ``rows / N`` of the whole set's).

Work: the partitions' greedy costs ``N * P * d`` (P rows per partition) instead of ``N^2 d``, the
union's ``(m K)^2 d`` for m partitions; so partitioning saves work when K is well below P. The
rounds are plain functions over arrays: :func:`partitioned_select` runs them in-process over
seeded random partitions (``partition_size``), and the Ray executor runs :func:`greedi_round` on
each partition on the workers and on the union at the driver (``daar_ops.ops._qdit_ray``).
Unlike GreeDi's analysis, the union's selection is not compared with the best partition's
selection on the whole set (that needs another pass over all rows).
"""

from __future__ import annotations

import math

import numpy as np
from loguru import logger

from daar_ops.algorithms.qdit.config import QditConfig


def random_parts(n: int, size: int, seed: int) -> list[np.ndarray]:
    """Seeded random partition of ``range(n)`` into ceil(n / size) parts of equal size (+-1),
    each sorted."""
    parts = np.array_split(np.random.default_rng(seed).permutation(n), int(math.ceil(n / size)))
    return [np.sort(p) for p in parts]


def round_config(config: QditConfig, k: int, rows: int, n_total: int) -> QditConfig:
    """The config of one round over ``rows`` of ``n_total`` rows: K picks (at most ``rows``),
    quality already normalised, no further partitioning, a fixed scale in the subset's units."""
    scale = config.diversity_scale
    if isinstance(scale, float):
        scale = scale * rows / n_total
    return config.with_budget(min(k, rows), partition_size=None, quality_norm="none",
                              quality_fill="min", diversity_scale=scale)


def greedi_round(x: np.ndarray, q: np.ndarray | None, k: int, config: QditConfig, n_total: int,
                 device: str = "cpu", progress: bool = False):
    """One round: QDIT on the rows ``x`` (a partition, or the union of the partitions' picks)
    picking ``min(k, len(x))`` with the normalised quality ``q``; a ``QditResult`` whose
    ``indices`` are positions in ``x``."""
    from daar_ops.algorithms.qdit.selection import qdit_select

    return qdit_select(x, round_config(config, k, len(x), n_total), q, device=device,
                       progress=progress)


def greedi_select(x: np.ndarray, q: np.ndarray | None, k: int, config: QditConfig,
                  parts: list[np.ndarray], device: str = "cpu", progress: bool = False,
                  meta: dict | None = None):
    """GreeDi over the given partitions (index arrays into ``x``). ``q``: quality normalised over
    all rows (None for alpha 0). The result's ``objective`` is d(A) over the union (the second
    round's rows); ``meta["union"]`` is the union's size."""
    from daar_ops.algorithms.qdit.selection import QditResult

    n = x.shape[0]
    picks, evals = [], 0
    for j, part in enumerate(parts):
        if progress:
            logger.info(f"QDIT partition {j + 1}/{len(parts)}: {len(part)} rows, selecting "
                        f"{min(k, len(part))}")
        r = greedi_round(x[part], None if q is None else q[part], k, config, n, device)
        picks.append(part[r.indices])
        evals += r.n_evaluations
    union = np.sort(np.concatenate(picks)) if picks else np.zeros(0, dtype=np.int64)
    if progress:
        logger.info(f"QDIT: greedy on the union of the partitions' picks ({len(union)} rows)")
    final = greedi_round(x[union], None if q is None else q[union], k, config, n, device,
                         progress)
    meta = dict(meta or {}, partitions=len(parts), union=len(union),
                evaluations_per_step=(evals + final.n_evaluations) / max(k, 1))
    return QditResult(union[final.indices].astype(np.int64), final.gains, final.diversity_gains,
                      q, final.diversity_scale, final.objective, evals + final.n_evaluations,
                      meta)


def partitioned_select(x: np.ndarray, q: np.ndarray | None, k: int, config: QditConfig,
                       meta: dict, device: str, progress: bool):
    """:func:`greedi_select` over seeded random parts of about ``config.partition_size`` rows."""
    parts = random_parts(x.shape[0], config.partition_size, config.seed)
    if k >= config.partition_size:
        logger.warning(f"QDIT: partition_size={config.partition_size} is not above the budget "
                       f"K={k}: every partition keeps all its rows and the union is the whole "
                       f"set, so partitioning saves no work (make the partitions larger than K)")
    return greedi_select(x, q, k, config, parts, device, progress,
                         dict(meta, partition_size=config.partition_size))
