"""QDIT's greedy: :func:`qdit_select` and the paths it dispatches to.

Each step takes ``argmax (1 - alpha) * d(a | A) / scale + alpha * q(a)`` (module docstring of
:mod:`daar_ops.algorithms.qdit`). Paths, all with the same argmax and tie rule (the lower index):

* the whole similarity matrix held on the CPU: one compiled heap greedy (lazy) or one compiled
  sampled argmax per step (stochastic), :mod:`daar_ops.algorithms.qdit.kernels`;
* otherwise (rows computed on the fly, kNN, a GPU, or the ``running_max`` scale): the batched lazy
  loop over a backend (:func:`_general_greedy`);
* ``alpha = 1``: a sort by quality; ``partition_size``: GreeDi
  (:mod:`daar_ops.algorithms.qdit.partitioned`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch
from loguru import logger
from tqdm.auto import tqdm

from daar_ops.algorithms.qdit.backends import Backend, BlockedRows, make_backend
from daar_ops.algorithms.qdit.config import (QUALITY_FILLS, QUALITY_NORMS, REFERENCE_RATIO,
                                             RUNNING_SCALE, QditConfig)
from daar_ops.algorithms.qdit.kernels import cover, lazy_greedy_held, sample_argmax
from daar_ops.core import native_bf16, resolve_device


@dataclass
class QditResult:
    """A QDIT selection. Arrays are in selection order (``indices[0]`` was picked first)."""

    indices: np.ndarray  # [K] int64 row indices, selection order
    gains: np.ndarray  # [K] float64 combined score when selected (the objective's marginal gain)
    diversity_gains: np.ndarray  # [K] float64 raw facility-location gain d(a | A) (unscaled)
    quality: np.ndarray | None  # [N] float64 normalised quality used (None when alpha == 0)
    diversity_scale: float
    objective: float  # d(A) of the selection under the backend's similarity (raw sum)
    n_evaluations: int  # exact gain evaluations (rows), the unit of work
    meta: dict[str, Any] = field(default_factory=dict)


def normalize_quality(values: Sequence[Any] | np.ndarray, method: str = "minmax",
                      fill: str | float = "min") -> tuple[np.ndarray, np.ndarray]:
    """Quality scores as float64 in [0, 1] (for ``minmax``/``rank``), and the invalid-value mask.

    Missing (None), non-numeric, NaN and +-inf values are invalid; they are replaced, before
    normalisation, by ``fill``: the ``min`` (default: an unknown quality counts as the worst seen),
    ``median`` or ``max`` of the valid values, or a given number. With no valid value at all every
    quality is 0 (pure diversity in effect).

    * ``minmax``: (q - min) / (max - min); all-equal values give 0.
    * ``rank``: average rank / (n - 1) in [0, 1]; robust to outliers and to the score's scale.
    * ``none``: the raw (filled) values.
    """
    if method not in QUALITY_NORMS or (fill not in QUALITY_FILLS if isinstance(fill, str)
                                       else not math.isfinite(float(fill))):
        raise ValueError(f"quality normalisation must be one of {QUALITY_NORMS} and its fill one "
                         f"of {QUALITY_FILLS} or a number, got {method!r}, {fill!r}")
    raw = np.empty(len(values), dtype=np.float64)
    for i, v in enumerate(values):
        try:
            raw[i] = float(v) if not isinstance(v, (bool, str, bytes)) else float("nan")
        except (TypeError, ValueError):
            raw[i] = float("nan")
    invalid = ~np.isfinite(raw)
    valid = raw[~invalid]
    if valid.size == 0:
        return np.zeros_like(raw), invalid
    fill_value = ({"min": np.min, "median": np.median, "max": np.max}[fill](valid)
                  if isinstance(fill, str) else float(fill))
    q = np.where(invalid, fill_value, raw)
    if method == "none":
        return q, invalid
    if method == "minmax":
        lo, hi = float(q.min()), float(q.max())
        return (np.zeros_like(q) if hi <= lo else (q - lo) / (hi - lo)), invalid
    if q.size == 1:
        return np.zeros_like(q), invalid
    order = np.argsort(q, kind="stable")
    ranks = np.empty_like(q)
    ranks[order] = np.arange(q.size, dtype=np.float64)
    # average ranks of ties so equal scores get equal normalised quality
    _, inverse, counts = np.unique(q, return_inverse=True, return_counts=True)
    sums = np.bincount(inverse, weights=ranks)
    return sums[inverse] / counts[inverse] / (q.size - 1), invalid


def prepare_embeddings(embeddings: np.ndarray, dtype: str) -> np.ndarray:
    """L2-normalised rows as float32 (float64 for ``dtype="float64"``); a row with NaN / inf is
    a zero vector (similar to nothing)."""
    x = np.asarray(embeddings)
    if x.ndim != 2:
        raise ValueError(f"embeddings must be a 2-D array [N, d], got shape {x.shape}")
    x = x.astype(np.float64 if dtype == "float64" else np.float32, copy=True)
    bad = ~np.isfinite(x).all(axis=1)
    if bad.any():
        logger.warning(f"QDIT: {int(bad.sum())} embeddings contain NaN/inf; they are treated as "
                       f"zero vectors (similar to nothing, so selected only for quality)")
        x[bad] = 0.0
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


def qdit_select(embeddings: np.ndarray, config: QditConfig | None = None,
                quality: Sequence[Any] | np.ndarray | None = None, *, device: str = "cpu",
                progress: bool = True, **params: Any) -> QditResult:
    """Select rows of ``embeddings`` [N, d] by the QDIT greedy.

    :param config: the selection's :class:`QditConfig`; ``params`` (its field names, e.g.
        ``select_num=10, alpha=0.7``) replace fields of it, or build one when it is None.
    :param quality: [N] quality scores (any scale; invalid values get ``quality_fill``); required
        when ``alpha > 0``.
    :param device: ``cpu``, ``cuda`` or ``auto``.
    :param progress: progress bars and per-partition log lines.
    """
    config = QditConfig.of(config, **params)
    x = prepare_embeddings(embeddings, config.compute_dtype)
    n = x.shape[0]
    k = config.budget(n)
    q = _quality(quality, n, config)
    meta = dict(method=config.method, similarity=config.similarity, alpha=config.alpha, n=n,
                k=k, compute_dtype=config.compute_dtype, quality_norm=config.quality_norm,
                epsilon=config.epsilon, seed=config.seed)
    if k == 0 or n == 0:
        empty = np.zeros(0)
        return QditResult(empty.astype(np.int64), empty, empty, q, 1.0, 0.0, 0, meta)
    device = resolve_device(device)
    if config.partition_size is not None and n > config.partition_size and config.alpha < 1.0:
        from daar_ops.algorithms.qdit.partitioned import partitioned_select

        return partitioned_select(x, q, k, config, meta, device, progress)
    if config.alpha == 1.0:  # pure quality: a sort (ties by index); no similarity needed
        order = np.lexsort((np.arange(n), -q))[:k].astype(np.int64)
        return QditResult(order, q[order].copy(), np.full(k, np.nan), q, 1.0, float("nan"), 0,
                          meta)
    backend = make_backend(x, config, device, progress)
    return _greedy(backend, q, k, config, meta, device, progress)


def _quality(quality: Sequence[Any] | np.ndarray | None, n: int, config: QditConfig
             ) -> np.ndarray | None:
    """The normalised quality (None when alpha is 0), with the count of invalid values logged."""
    if config.alpha > 0 and quality is None:
        raise ValueError("alpha > 0 needs quality scores")
    if quality is not None and len(quality) != n:
        raise ValueError(f"quality has {len(quality)} values for {n} embeddings")
    if quality is None or config.alpha == 0:
        return None
    q, invalid = normalize_quality(quality, config.quality_norm, config.quality_fill)
    if invalid.any():
        logger.warning(f"QDIT: {int(invalid.sum())} of {n} quality values are missing, "
                       f"non-numeric, NaN or inf; they get the {config.quality_fill!r} quality")
    return q


def diversity_scale_of(config: QditConfig, n: int, k: int) -> float:
    """The fixed divisor of d(a|A): ``budget`` -> 0.1 * N / K, a number -> itself (NaN for the
    per-step ``running_max``)."""
    if config.diversity_scale == RUNNING_SCALE:
        return math.nan
    if isinstance(config.diversity_scale, float):
        return config.diversity_scale
    # the raw gain at a 10% budget, kept at that meaning for any N and K: per-pick gains grow
    # like N / K (each pick stands for N / K rows), so divide by 0.1 * N / K
    return max(REFERENCE_RATIO * n / max(k, 1), 1e-12)


def _greedy(backend: Backend, q: np.ndarray | None, k: int, config: QditConfig, meta: dict,
            device: str, progress: bool) -> QditResult:
    """The greedy over a backend: the compiled paths over a held matrix, else the general loop."""
    n = backend.n
    held = isinstance(backend, BlockedRows) and backend.held is not None
    running = config.diversity_scale == RUNNING_SCALE  # the scale is set anew at every step
    fast = config.fast_bounds if config.fast_bounds is not None else native_bf16(device)
    fast = bool(fast) and isinstance(backend, BlockedRows) and not held \
        and config.compute_dtype != "bfloat16"
    meta.update(fast_bounds=fast, held_matrix=held)
    mdtype = torch.float64 if config.compute_dtype == "float64" else torch.float32
    m = torch.zeros(n, dtype=mdtype, device="cpu" if config.similarity == "knn" else device)
    first = backend.all_gains(m, progress, fast).cpu() if config.method == "lazy" else None
    scale = diversity_scale_of(config, n, k)
    qv = np.zeros(n) if q is None else q.astype(np.float64)
    greedy = _general_greedy
    if held and not running and backend.device.type == "cpu":
        greedy = _held_lazy if config.method == "lazy" else _held_stochastic
    idx, gains, dgains = greedy(backend, qv, first, scale, k, config, m, meta, progress)
    meta["evaluations_per_step"] = backend.n_evaluations / k
    return QditResult(idx, gains, dgains, q, scale, float(m.sum(dtype=torch.float64)),
                      backend.n_evaluations, meta)


def _outputs(k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return np.empty(k, dtype=np.int64), np.empty(k), np.empty(k)


def _held_lazy(backend: BlockedRows, qv: np.ndarray, first: torch.Tensor, scale: float, k: int,
               config: QditConfig, m: torch.Tensor, meta: dict, progress: bool):
    """Exact lazy greedy over the held matrix: one compiled heap loop (the general loop's
    sequence)."""
    out = _outputs(k)
    evals = lazy_greedy_held(backend.held.numpy(), first.numpy().copy(), qv,
                             (1.0 - config.alpha) / scale, config.alpha, k, m.numpy(), *out)
    backend.n_evaluations += int(evals)
    return out


def _sample_size(n: int, k: int, epsilon: float) -> int:
    """Candidates a stochastic-greedy step draws: ceil(N / K * ln(1 / epsilon)), at most N."""
    return min(n, int(math.ceil(n / k * math.log(1.0 / epsilon))))


def _held_stochastic(backend: BlockedRows, qv: np.ndarray, first: None, scale: float, k: int,
                     config: QditConfig, m: torch.Tensor, meta: dict, progress: bool):
    """Stochastic greedy over the held matrix: the general loop's seeded samples and exact
    argmax per sample (so the same sequence), each step one compiled call."""
    n = backend.n
    sim, mn = backend.held.numpy(), m.numpy()
    wd = (1.0 - config.alpha) / scale
    dstale = np.full(n, np.inf)
    selected = np.zeros(n, dtype=bool)
    out_idx, out_gain, out_dgain = _outputs(k)
    rng = np.random.default_rng(config.seed)
    sample_size = _sample_size(n, k, config.epsilon)
    for step in tqdm(range(k), desc="QDIT stochastic greedy", disable=not progress):
        avail = np.flatnonzero(~selected)
        cand = avail if sample_size >= n - step else \
            np.sort(rng.choice(avail, size=sample_size, replace=False))
        best, score, dg, evals = sample_argmax(sim, cand, dstale, qv, wd, config.alpha, mn)
        backend.n_evaluations += int(evals)
        selected[best] = True
        dstale[best] = -np.inf
        out_idx[step], out_gain[step], out_dgain[step] = best, score, dg
        cover(sim[best], mn)
    return out_idx, out_gain, out_dgain


def _general_greedy(backend: Backend, qv: np.ndarray, first: torch.Tensor | None, scale: float,
                    k: int, config: QditConfig, m: torch.Tensor, meta: dict, progress: bool):
    """The batched lazy loop over any backend (rows on the fly, kNN, GPU, ``running_max``).

    ``dstale[a] >= d(a | A)``: the last exact diversity gain of a (gains only shrink as A grows),
    +inf when never evaluated. The step's score is ``wd * d(a | A) + wq * q(a)`` with wd, wq >= 0,
    so ``bound = wd * dstale + wq * q`` is an upper bound of it (what the lazy greedy needs).
    With ``running_max`` the step first finds the best diversity gain among its candidates (on
    the diversity bounds alone): that row then has diversity term 1 - alpha.
    """
    n, alpha = backend.n, config.alpha
    running = config.diversity_scale == RUNNING_SCALE
    qt = torch.from_numpy(qv)
    dstale = first.clone() if first is not None else torch.full((n,), math.inf,
                                                                dtype=torch.float64)
    weights = [0.0, alpha] if running else [(1.0 - alpha) / scale, alpha]  # [wd, wq]
    bound = qt.clone() if running else weights[0] * dstale + weights[1] * qt
    selected = torch.zeros(n, dtype=torch.bool)
    out_idx, out_gain, out_dgain = _outputs(k)
    rng = np.random.default_rng(config.seed)
    sample_size = _sample_size(n, k, config.epsilon)
    step_scales = np.full(k, np.nan)
    knn = config.similarity == "knn"

    def gains_of(idx: torch.Tensor) -> torch.Tensor:
        dg = backend.gains(idx if knn else idx.to(m.device), m).cpu()
        dstale[idx] = dg
        return dg

    def evaluate(idx: torch.Tensor) -> torch.Tensor:
        dg = gains_of(idx)
        bound[idx] = weights[0] * dg + weights[1] * qt[idx]
        return dg

    for step in tqdm(range(k), desc=f"QDIT {config.method} greedy", disable=not progress):
        pool = None  # every unselected row
        if config.method == "stochastic" and sample_size < n - step:
            avail = np.flatnonzero(~selected.numpy())
            pool = torch.from_numpy(np.sort(rng.choice(avail, size=sample_size, replace=False)))
        if running:
            _, top_gain, _ = _lazy_argmax(dstale, selected, pool, gains_of, config.batch)
            step_scales[step] = top_gain
            weights[0] = (1.0 - alpha) / top_gain if top_gain > 0 else 0.0
            if weights[0] > 0:
                torch.add(weights[1] * qt, dstale, alpha=weights[0], out=bound)
            else:  # everything left is fully covered: quality alone decides
                torch.mul(qt, weights[1], out=bound)
            bound[selected] = -math.inf
        best, best_score, best_dg = _lazy_argmax(bound, selected, pool, evaluate, config.batch)
        selected[best] = True
        bound[best] = dstale[best] = -math.inf
        out_idx[step], out_gain[step], out_dgain[step] = best, best_score, best_dg
        backend.update(best, m)
    if running:
        meta["step_scales"] = step_scales
    return out_idx, out_gain, out_dgain


def _lazy_argmax(bound: torch.Tensor, selected: torch.Tensor, pool: torch.Tensor | None,
                 evaluate: Callable[[torch.Tensor], torch.Tensor], batch: int
                 ) -> tuple[int, float, float]:
    """Exact argmax of the current score over ``pool`` (all unselected rows when None).

    ``bound`` holds upper bounds (stale scores); evaluated rows get their exact score. The first
    round re-evaluates the ``batch`` best bounds; each later round every stale row whose bound
    still reaches the best exact score (best bounds first, 4096 at most), until no bound does.
    Ties go to the lower index.
    """
    if pool is None:
        cand_bound = bound.clone()
        cand_bound[selected] = -math.inf
    else:
        cand_bound = bound[pool].clone()
    fresh = torch.zeros(len(cand_bound), dtype=torch.bool)
    best_pos, best_row, best_score, best_dg = -1, -1, -math.inf, 0.0
    first_round = True
    while True:
        stale = cand_bound.masked_fill(fresh, -math.inf)
        top_pos = _next_round(stale, pool, best_score, best_row, batch if first_round else 0)
        if top_pos is None:
            break
        first_round = False
        rows = top_pos if pool is None else pool[top_pos]
        dg = evaluate(rows)
        cand_bound[top_pos] = bound[rows]
        fresh[top_pos] = True
        # best among fresh, ties by the lower row index
        exact = cand_bound[top_pos]
        mx = float(exact.max())
        if mx > best_score or (mx == best_score and best_pos >= 0):
            tied = torch.nonzero(exact == mx).flatten()
            j = int(torch.argmin(rows[tied]))
            if mx > best_score or int(rows[tied[j]]) < best_row:
                best_pos, best_row = int(top_pos[tied[j]]), int(rows[tied[j]])
                best_score, best_dg = mx, float(dg[tied[j]])
    return best_row, best_score, best_dg


def _next_round(stale: torch.Tensor, pool: torch.Tensor | None, best_score: float,
                best_row: int, first_batch: int) -> torch.Tensor | None:
    """Positions a lazy round evaluates (None when done): the ``first_batch`` best bounds in the
    first round; later every stale row whose bound reaches the best exact score (a tie only
    matters for a lower index), best bound first, at most 4096."""
    if first_batch:
        take = min(first_batch, int((stale > -math.inf).sum()))
        return torch.topk(stale, take).indices if take else None
    cand = torch.nonzero(stale >= best_score).flatten()
    if len(cand):
        rows_c = cand if pool is None else pool[cand]
        cand = cand[(stale[cand] > best_score) | (rows_c < best_row)]
    if len(cand) == 0:
        return None
    if len(cand) > 4096:
        cand = cand[torch.topk(stale[cand], 4096).indices]
    return cand
