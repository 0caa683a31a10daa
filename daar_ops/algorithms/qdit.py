"""QDIT: quality-diversity selection by greedy facility location. No Data-Juicer import.

Objective (Bukharin et al., arXiv 2311.14736): greedily pick, K times,

    argmax_a  (1 - alpha) * d(a | A) / diversity_scale  +  alpha * q(a)

with ``d(A) = sum_v max_{a in A} sim(a, v)`` the facility-location function over the cosine
similarity of L2-normalised embeddings, clipped at 0, so ``d(a | A) = sum_v max(0, sim(a, v) - m(v))``
with ``m(v)`` the current coverage of v. ``q`` is the quality normalised by
:func:`normalize_quality` (default: min-max to [0, 1]).

Scaling (the paper leaves it open; ``d(a|A)`` is a sum over the N rows, and a pick's gain is
about what the N / K rows it stands for gain, so it grows like N / K):

* ``"budget"`` (default): ``d(a|A) / (0.1 * N / K)``, i.e. the paper's raw gain at a 10% budget
  (where the scale is exactly 1), kept at that meaning for any N and K. Gains fall over the
  selection, so early picks are driven by coverage and later ones weigh quality more; on the
  shared pool's MiniLM embeddings alpha = 0.7 lands between the ends (about 0.84 of the
  quality gain and 0.67 of the coverage gain with uniform quality, stable for K = N/20 .. N/5
  and N = 4k .. 8k; ``tools/bench_qdit.py --alpha-sweep``).
* ``"running_max"``: divide by the best gain among the candidates of the step (the best
  diversity candidate has term 1 - alpha at every step): a constant per-step trade-off, which
  makes the sweep switch sharply from coverage to quality (alpha = 0.7 got 0.97 of the quality
  gain).
* ``"mean"`` (divide by N) and ``"max_singleton"`` (divide by the best first-step gain): the
  diversity term falls to ~1e-3 after a few picks, so any alpha >= 0.1 selects the top-K by
  quality (399 of 400 at alpha = 0.7): alpha does not trade anything.
* ``"none"`` (= 1.0): the raw sum (same as ``budget`` at K = N / 10, drifts with K / N); a positive
  number divides by that number.

Optimisers (all deterministic for a seed; ties broken by the lower index):

* ``lazy`` (default): exact lazy greedy (Minoux). Stale gains are upper bounds; the top stale
  candidates are re-evaluated *in batches* (one matmul for a batch of rows), and a candidate is
  taken when its exact score is at least every remaining bound. Same sequence as the plain greedy.
  When the whole matrix is held (below) the greedy is one compiled binary-heap loop instead
  (the same argmax and tie rule, far less overhead per step).
* ``stochastic``: stochastic greedy (Mirzasoleiman et al. 2015): each step draws
  ``ceil(N / K * ln(1 / epsilon))`` unselected candidates with a seeded generator and takes the best
  of them, found lazily with the same bounds. Expected (1 - 1/e - epsilon) guarantee, far fewer
  evaluations for large N (but each sampled candidate still needs its whole similarity row once).

Similarity backends (``similarity=``):

* ``blocked`` (default): when the clipped N x N matrix fits ``max_memory_mb`` (N^2 * 4 bytes plus a
  matmul block: N <= ~22k at the default 2048 MB) it is held, built from the upper block triangle
  (S is symmetric: N^2 d / 2 multiply-adds) into prefaulted memory (MAP_POPULATE), and every gain is
  a fused pass over a held row. Otherwise rows are computed on the fly with matmuls
  (``compute_dtype``: float32, or bfloat16 which uses AMX/tensor cores and is ~5x faster on CPUs
  that have them, at ~1e-3 error per similarity) and kept in an LRU cache of recently evaluated
  rows. Memory is bounded by ``max_memory_mb`` either way.
* ``dense``: the full clipped N x N matrix is held whatever ``max_memory_mb`` says (N^2 * 4
  bytes: 1.6 GB at 20k, 40 GB at 100k); only when asked for.
* ``knn``: sparse facility location where a candidate covers only itself and its ``knn_k`` nearest
  neighbours (exact cosine kNN from :func:`daar_ops.algorithms.knn.knn_cosine`). O(N * k) memory;
  gains cost O(k); a different (truncated) objective, good for very large N.
"""

from __future__ import annotations

import math
import mmap
from dataclasses import dataclass, field
from typing import Any, Sequence

import numba
import numpy as np
import torch
from loguru import logger
from tqdm.auto import tqdm

from daar_ops.core import budget, resolve_device
from daar_ops.algorithms.knn import knn_cosine, l2_normalize

# the option names live in a torch-free module (the op imports them; this module only to select)
from daar_ops.algorithms.qdit_params import (  # noqa: F401 (re-exported)
    ADAPTIVE_SCALES, BF16_MARGIN, COMPUTE_DTYPE_NAMES, DEFAULT_DIVERSITY_SCALE, DIVERSITY_SCALES,
    METHODS, QUALITY_FILLS, QUALITY_NORMS, REFERENCE_RATIO, RUNNING_SCALE, SIMILARITIES)

COMPUTE_DTYPES = {name: getattr(torch, name) for name in COMPUTE_DTYPE_NAMES}


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


# --------------------------------------------------------------------------------------------
# budget and quality
# --------------------------------------------------------------------------------------------

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
    if method not in QUALITY_NORMS:
        raise ValueError(f"quality normalisation must be one of {QUALITY_NORMS}, got {method!r}")
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
    if isinstance(fill, str):
        if fill not in QUALITY_FILLS:
            raise ValueError(f"quality fill must be one of {QUALITY_FILLS} or a number, got {fill!r}")
        fill_value = {"min": np.min, "median": np.median, "max": np.max}[fill](valid)
    else:
        fill_value = float(fill)
        if not math.isfinite(fill_value):
            raise ValueError(f"quality fill must be finite, got {fill!r}")
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


# --------------------------------------------------------------------------------------------
# similarity backends: each gives exact facility-location gains for a batch of candidates
# --------------------------------------------------------------------------------------------

@numba.njit(fastmath=True, cache=True)
def _row_gain(row, m):  # pragma: no cover - compiled
    """sum_j max(0, row[j] - m[j]), float64 accumulation (vectorised; fastmath only reorders
    this sum)."""
    acc = 0.0
    for j in range(row.shape[0]):
        d = row[j] - m[j]
        if d > 0:
            acc += d
    return acc


@numba.njit(cache=True)
def _cached_gains(buf, slots, m, out):  # pragma: no cover - compiled
    """out[i] = sum_j max(0, buf[slots[i], j] - m[j]), float64 accumulation."""
    for i in range(slots.shape[0]):
        out[i] = _row_gain(buf[slots[i]], m)


def _prefaulted_empty(shape: tuple[int, ...], dtype) -> np.ndarray:
    """An uninitialised array in anonymous memory mapped with MAP_POPULATE: a held N x N matrix is
    touched once, and taking its 4 KiB page faults one at a time during the build cost more than
    the matmul on the project's CPU (1.6 GB: ~1.4 s prefaulted against 2-4 s faulted, and huge
    pages were no better under memory pressure); plain ``np.empty`` where that flag is missing."""
    count = int(np.prod(shape))
    nbytes = count * np.dtype(dtype).itemsize
    if nbytes < 2**21 or not hasattr(mmap, "MAP_POPULATE"):
        return np.empty(shape, dtype=dtype)
    buf = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | mmap.MAP_POPULATE)
    return np.frombuffer(buf, dtype=dtype, count=count).reshape(shape)


def _symmetric_similarity(xc: torch.Tensor, store_dtype: torch.dtype, block: int,
                          progress: bool = False) -> torch.Tensor:
    """clip(X X^T, 0) as one [N, N] tensor, built from the upper block triangle: each row block
    is multiplied only by the rows from its own start on, and the off-diagonal part is written
    to both halves (N^2 d / 2 multiply-adds instead of N^2 d)."""
    n = xc.shape[0]
    if xc.device.type == "cpu":
        out = torch.from_numpy(_prefaulted_empty((n, n), np.float64 if store_dtype == torch.float64
                                               else np.float32))
    else:
        out = torch.empty((n, n), dtype=store_dtype, device=xc.device)
    # one block buffer for every product: a fresh [block, N] temporary per block is returned to
    # the OS and faulted in again each time (~as costly as the matmul on the project's CPU)
    flat = torch.empty(min(block, n) * n, dtype=xc.dtype, device=xc.device)
    for start in tqdm(range(0, n, block), desc="QDIT similarity (symmetric blocks)",
                      disable=not progress):
        stop = min(start + block, n)
        b = flat[:(stop - start) * (n - start)].view(stop - start, n - start)
        torch.matmul(xc[start:stop], xc[start:].T, out=b)
        b = b.to(store_dtype).clamp_(min=0.0)
        out[start:stop, start:].copy_(b)
        out[stop:, start:stop].copy_(b[:, stop - start:].T)
    return out


@numba.njit(cache=True)
def _heap_before(key, idx, i, j):  # pragma: no cover - compiled
    """Heap order: the larger score first, ties to the lower row index."""
    return key[i] > key[j] or (key[i] == key[j] and idx[i] < idx[j])


@numba.njit(cache=True)
def _sift_down(heap, key, idx, pos, size):  # pragma: no cover - compiled
    while True:
        left = 2 * pos + 1
        if left >= size:
            return
        best = left
        right = left + 1
        if right < size and _heap_before(key, idx, heap[right], heap[left]):
            best = right
        if _heap_before(key, idx, heap[best], heap[pos]):
            heap[pos], heap[best] = heap[best], heap[pos]
            pos = best
        else:
            return


@numba.njit(cache=True)
def _lazy_greedy_dense(sim, first, q, wd, wq, k, m, out_idx, out_gain, out_dgain
                       ):  # pragma: no cover - compiled
    """Exact lazy greedy (Minoux) over a held clipped similarity matrix, with a binary heap.

    ``first`` holds the exact first gains (m = 0 on entry). A row is taken when it is on top of
    the heap with a score evaluated at the current step; otherwise its exact score is computed
    (one fused pass over its row, float64 accumulation) and it sinks. Scores only shrink, so a
    stale score is an upper bound and the top fresh row is the exact argmax; ties go to the lower
    row index (the heap order). Returns the number of gain evaluations after the first pass.
    """
    n = sim.shape[0]
    key = wd * first + wq * q  # the step-0 scores, exact
    idx = np.arange(n)
    stamp = np.zeros(n, dtype=np.int64)  # the step at which a row's score was evaluated
    heap = np.arange(n)
    size = n
    for pos in range(n // 2 - 1, -1, -1):
        _sift_down(heap, key, idx, pos, size)
    evaluations = 0
    for step in range(k):
        while True:
            a = heap[0]
            if stamp[a] == step:
                break
            acc = _row_gain(sim[a], m)
            evaluations += 1
            first[a] = acc  # the latest exact diversity gain
            key[a] = wd * acc + wq * q[a]
            stamp[a] = step
            _sift_down(heap, key, idx, 0, size)
        out_idx[step] = a
        out_gain[step] = key[a]
        out_dgain[step] = first[a]
        size -= 1
        heap[0] = heap[size]
        _sift_down(heap, key, idx, 0, size)
        row = sim[a]
        for j in range(n):
            if row[j] > m[j]:
                m[j] = row[j]
    return evaluations


@numba.njit(cache=True)
def _sample_argmax(sim, cand, dstale, q, wd, wq, m):  # pragma: no cover - compiled
    """Exact argmax of wd * d(a | A) + wq * q(a) over the rows ``cand`` (sorted), lazily: rows are
    evaluated in the order of their upper bounds (``dstale``: the last exact gain, +inf if never
    evaluated) until no bound can beat the best exact score; ties go to the lower row index.
    Updates ``dstale`` of the evaluated rows. Returns (row, score, diversity gain, evaluations)."""
    ub = np.empty(cand.shape[0])
    for i in range(cand.shape[0]):
        ub[i] = wd * dstale[cand[i]] + wq * q[cand[i]] if dstale[cand[i]] < np.inf else np.inf
    order = np.argsort(-ub, kind="mergesort")  # stable: equal bounds keep the index order
    best, best_score, best_dg, evaluations = -1, -np.inf, 0.0, 0
    for o in order:
        a = cand[o]
        if ub[o] < best_score or (ub[o] == best_score and a > best):
            break  # sorted: no later bound beats the best exact score
        g = _row_gain(sim[a], m)
        evaluations += 1
        dstale[a] = g
        score = wd * g + wq * q[a]
        if score > best_score or (score == best_score and a < best):
            best, best_score, best_dg = a, score, g
    return best, best_score, best_dg, evaluations


@numba.njit(cache=True)
def _cover(row, m):  # pragma: no cover - compiled
    """m <- max(m, row) in place."""
    for j in range(m.shape[0]):
        if row[j] > m[j]:
            m[j] = row[j]


class _Backend:
    n: int
    n_evaluations: int = 0

    def gains(self, idx: torch.Tensor, m: torch.Tensor) -> torch.Tensor:  # float64 [B]
        raise NotImplementedError

    def update(self, a: int, m: torch.Tensor) -> None:  # m <- max(m, sim(a, .)) in place
        raise NotImplementedError

    def all_gains(self, m: torch.Tensor, progress: bool, fast_bounds: bool = False
                  ) -> torch.Tensor:
        out = torch.empty(self.n, dtype=torch.float64)
        step = self.block_rows()
        for start in tqdm(range(0, self.n, step), desc="QDIT initial gains", disable=not progress):
            idx = torch.arange(start, min(start + step, self.n))
            out[start:start + len(idx)] = self.gains(idx, m)
        return out

    def block_rows(self) -> int:
        return 1024


class _DenseRows(_Backend):
    """Rows of clip(X X^T, 0) computed on the fly in blocks, with a bounded row cache.

    ``max_memory_mb`` is split: a quarter for matmul blocks, the rest for cached rows. The initial
    pass (all first gains) keeps the rows with the largest first gains, which are the ones the lazy
    greedy re-evaluates; later, rows are cached as evaluated, evicting the least recently used.
    """

    def __init__(self, x: torch.Tensor, compute_dtype: torch.dtype, max_memory_mb: float,
                 dense: bool = False, progress: bool = False):
        self.x = x  # [N, d] normalised, float32 or float64
        self.n = x.shape[0]
        self.device = x.device
        self.store_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        self.xc = x.to(compute_dtype)
        self.row_bytes = self.n * (8 if self.store_dtype == torch.float64 else 4)
        budget = max(0.0, float(max_memory_mb)) * 2**20
        self.block = int(max(8, min(4096, budget / 4 / (self.row_bytes * 2))))
        # hold the whole matrix when it fits the memory bound: built once with half the matmul
        # work (S is symmetric), and every later gain is a lookup (the ``dense`` similarity too)
        hold_block = int(min(1024, (budget - self.n * self.row_bytes) / (2 * self.row_bytes)))
        hold = dense or hold_block >= min(64, self.n)
        self.capacity = 0 if hold else int(min(self.n, budget * 3 / 4 / self.row_bytes))
        self.buf = torch.empty((self.capacity, self.n), dtype=self.store_dtype, device=self.device)
        self.slot = np.full(self.n, -1, dtype=np.int64)  # row -> slot
        self.owner = np.full(self.capacity, -1, dtype=np.int64)  # slot -> row
        self.last_used = np.zeros(self.capacity, dtype=np.int64)
        self.clock = 0
        self.dense = None
        if hold:
            self.dense = _symmetric_similarity(self.xc, self.store_dtype,
                                               max(8, min(self.block, hold_block)), progress)

    def block_rows(self) -> int:
        return self.block

    def _compute(self, idx: torch.Tensor) -> torch.Tensor:
        idx = idx.to(self.device)
        out = (self.xc[idx] @ self.xc.T).to(self.store_dtype)
        return out.clamp_(min=0.0)

    def _insert(self, rows: np.ndarray, values: torch.Tensor) -> None:
        """Cache ``values`` (rows of S) evicting the least recently used slots."""
        if self.capacity == 0 or len(rows) == 0:
            return
        rows, values = rows[: self.capacity], values[: self.capacity]
        free = np.flatnonzero(self.owner < 0)
        if len(free) < len(rows):
            need = len(rows) - len(free)
            used = np.flatnonzero(self.owner >= 0)
            victims = used[np.argpartition(self.last_used[used], need - 1)[:need]]
            self.slot[self.owner[victims]] = -1
            self.owner[victims] = -1
            free = np.concatenate([free, victims])
        slots = free[: len(rows)]
        self.buf.index_copy_(0, torch.from_numpy(slots).to(self.device), values)
        self.owner[slots] = rows
        self.slot[rows] = slots
        self.last_used[slots] = self.clock

    def rows(self, idx: torch.Tensor) -> torch.Tensor:
        if self.dense is not None:
            return self.dense[idx.to(self.device)]
        self.clock += 1
        ids = idx.cpu().numpy()
        slots = self.slot[ids]
        hit = slots >= 0
        if hit.all():
            self.last_used[slots] = self.clock
            return self.buf[torch.from_numpy(slots).to(self.device)]
        out = torch.empty((len(ids), self.n), dtype=self.store_dtype, device=self.device)
        if hit.any():
            self.last_used[slots[hit]] = self.clock
            out[torch.from_numpy(np.flatnonzero(hit)).to(self.device)] = \
                self.buf[torch.from_numpy(slots[hit]).to(self.device)]
        miss_pos = np.flatnonzero(~hit)
        for start in range(0, len(miss_pos), self.block):
            pos = miss_pos[start:start + self.block]
            out[torch.from_numpy(pos).to(self.device)] = self._compute(torch.from_numpy(ids[pos]))
        self._insert(ids[miss_pos], out[torch.from_numpy(miss_pos).to(self.device)])
        return out

    def gains(self, idx: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        self.n_evaluations += len(idx)
        if self.device.type == "cpu" and (self.dense is not None or len(idx) <= self.capacity):
            ids = idx.numpy()
            if self.dense is not None:
                buf, slots = self.dense, ids
            else:
                self.clock += 1
                slots = self.slot[ids]
                self.last_used[slots[slots >= 0]] = self.clock
                miss = np.flatnonzero(slots < 0)
                # compute and cache the missing rows (LRU eviction never hits this batch's rows,
                # which were just touched, because the batch fits in the cache)
                for start in range(0, len(miss), self.block):
                    part = ids[miss[start:start + self.block]]
                    self._insert(part, self._compute(torch.from_numpy(part)))
                buf, slots = self.buf, self.slot[ids]
            out = np.empty(len(ids), dtype=np.float64)
            _cached_gains(buf.numpy(), slots, m.numpy(), out)  # one fused pass per row
            return torch.from_numpy(out)
        r = self.rows(idx)
        return r.sub_(m).clamp_(min=0.0).sum(dim=1).to(torch.float64)

    def all_gains(self, m: torch.Tensor, progress: bool, fast_bounds: bool = False
                  ) -> torch.Tensor:
        """First gains of every row in one blocked pass (m = 0).

        With ``fast_bounds`` the pass uses a bfloat16 matmul and returns rigorous *upper bounds*:
        sum_v max(0, s~(a, v) + BF16_MARGIN), where |s~ - s| <= BF16_MARGIN for unit vectors
        (inputs and output rounded to bfloat16, float32 accumulation). Exact rows are then
        computed in the working precision only for the candidates the greedy evaluates. Without
        it, the exact pass also caches the rows with the largest first gains.
        """
        if self.dense is not None and self.device.type == "cpu":
            out = np.empty(self.n, dtype=np.float64)
            _cached_gains(self.dense.numpy(), np.arange(self.n), m.numpy(), out)
            self.n_evaluations += self.n
            return torch.from_numpy(out)
        out = torch.empty(self.n, dtype=torch.float64)
        xb = self.x.to(torch.bfloat16) if fast_bounds else None
        for start in tqdm(range(0, self.n, self.block), desc="QDIT initial gains",
                          disable=not progress):
            stop = min(start + self.block, self.n)
            if fast_bounds:
                r = (xb[start:stop] @ xb.T).to(torch.float32)
                out[start:stop] = r.add_(BF16_MARGIN).clamp_(min=0.0).sum(dim=1).cpu()
                continue
            r = self.dense[start:stop] if self.dense is not None else \
                self._compute(torch.arange(start, stop))
            g = (r - m).clamp_(min=0.0).sum(dim=1).to(torch.float64)
            out[start:stop] = g.cpu()
            if self.capacity:
                self._keep_best(np.arange(start, stop), r, out)
        self.n_evaluations += 0 if fast_bounds else self.n
        return out

    def _keep_best(self, rows: np.ndarray, values: torch.Tensor, gains: torch.Tensor) -> None:
        free = int((self.owner < 0).sum())
        order = np.argsort(-gains[rows].numpy(), kind="stable")
        take = order[:free]
        if len(take):
            self._insert(rows[take], values[torch.from_numpy(take).to(self.device)])
        rest = order[free:]
        if len(rest) == 0:
            return
        # replace cached rows whose first gain is lower than the block's best remaining ones
        cached = np.flatnonzero(self.owner >= 0)
        cached_g = gains[self.owner[cached]].numpy()
        worst = cached[np.argsort(cached_g, kind="stable")]
        worst_g = np.sort(cached_g, kind="stable")
        rest_g = gains[rows[rest]].numpy()
        n_swap = int(np.sum(rest_g[: len(worst_g)] > worst_g[: len(rest_g)]))
        if n_swap:
            victims = worst[:n_swap]
            self.slot[self.owner[victims]] = -1
            self.owner[victims] = -1
            self._insert(rows[rest[:n_swap]], values[torch.from_numpy(rest[:n_swap]).to(self.device)])

    def update(self, a: int, m: torch.Tensor) -> None:
        row = self.rows(torch.tensor([a]))[0]
        torch.maximum(m, row, out=m)
        if self.dense is None and self.slot[a] >= 0:  # a selected row is never evaluated again
            self.owner[self.slot[a]] = -1
            self.slot[a] = -1


class _SparseKnn(_Backend):
    """Each candidate covers itself (similarity 1) and its k nearest neighbours (clipped cosine)."""

    def __init__(self, x: np.ndarray, k: int, block_size: int, device: str, progress: bool):
        self.n = x.shape[0]
        k = min(k, self.n - 1)
        if k >= 1:
            nbr, sims = knn_cosine(x, k, block_size=block_size, device=device, exclude_self=True,
                                   progress=progress)
        else:
            nbr = np.zeros((self.n, 0), dtype=np.int64)
            sims = np.zeros((self.n, 0), dtype=np.float32)
        self_sim = np.minimum(1.0, (x.astype(np.float64) ** 2).sum(1)).astype(np.float32)
        self.idx = torch.from_numpy(np.concatenate([np.arange(self.n)[:, None], nbr], 1))
        self.sim = torch.from_numpy(np.concatenate([self_sim[:, None], sims], 1)).clamp_(min=0.0)

    def gains(self, idx: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        self.n_evaluations += len(idx)
        cols = self.idx[idx]
        return (self.sim[idx] - m[cols]).clamp_(min=0.0).sum(dim=1, dtype=torch.float64)

    def block_rows(self) -> int:
        return 65536

    def update(self, a: int, m: torch.Tensor) -> None:
        cols = self.idx[a]
        m[cols] = torch.maximum(m[cols], self.sim[a])


# --------------------------------------------------------------------------------------------
# the greedy
# --------------------------------------------------------------------------------------------

def _prepare_embeddings(embeddings: np.ndarray, dtype: str) -> np.ndarray:
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


def qdit_select(embeddings: np.ndarray, select_num: int | None = None,
                select_ratio: float | None = None, quality: Sequence[Any] | np.ndarray | None = None,
                alpha: float = 0.0, diversity_scale: str | float = DEFAULT_DIVERSITY_SCALE,
                quality_norm: str = "minmax", quality_fill: str | float = "min",
                method: str = "lazy", epsilon: float = 0.01, seed: int = 0,
                similarity: str = "blocked", knn_k: int = 50, max_memory_mb: float = 2048.0,
                compute_dtype: str = "float32", fast_bounds: bool | None = None,
                partition_size: int | None = None, batch: int = 16, device: str = "cpu",
                progress: bool = True) -> QditResult:
    """Select rows of ``embeddings`` [N, d] by the QDIT greedy (see the module docstring).

    :param select_num: number of rows to select (capped at N); or give ``select_ratio`` in [0, 1].
    :param quality: [N] quality scores (any scale; invalid values handled by ``quality_fill``);
        required when ``alpha > 0``.
    :param alpha: weight of quality in [0, 1]; 0 = pure diversity (facility location).
    :param diversity_scale: ``budget`` (gain / (0.1 N / K), default), ``running_max``, ``mean``
        (gain / N), ``max_singleton``, ``none`` or a positive number (see the module docstring).
    :param method: ``lazy`` (exact) or ``stochastic`` (with ``epsilon`` and ``seed``).
    :param similarity: ``blocked`` (default), ``dense`` or ``knn`` (with ``knn_k``).
    :param max_memory_mb: memory for the similarity (``blocked``): the whole matrix when it fits
        (held; the fast path), else matmul blocks and a row cache.
    :param compute_dtype: ``float32`` (default), ``bfloat16`` (fast, approximate) or ``float64``
        (all arithmetic in float64; for exact comparisons).
    :param fast_bounds: compute the lazy greedy's first-step upper bounds with a bfloat16 matmul
        plus a rigorous error margin (the selection is unchanged: exact gains are always
        evaluated before a pick). ``None`` (default): on where bfloat16 is fast (CUDA, or a CPU with
        AMX / AVX512-BF16) and compute_dtype is float32 or float64.
    :param partition_size: for very large N: split the rows into seeded random parts of about
        this size, select ``K * |part| / N`` in each with the chosen greedy and merge (GreeDi's
        first round, Mirzasoleiman et al. 2013): N^2 / P similarity work instead of N^2. The
        merged order is by marginal gain; ``objective`` is the sum of the parts' objectives (a lower
        bound of d(A) on the whole set). ``None``: no partitioning.
    :param batch: candidates evaluated in a lazy step's first round; later rounds take every
        candidate whose bound still reaches the best exact score.
    :param device: ``cpu``, ``cuda`` or ``auto``.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if similarity not in SIMILARITIES:
        raise ValueError(f"similarity must be one of {SIMILARITIES}, got {similarity!r}")
    if compute_dtype not in COMPUTE_DTYPES:
        raise ValueError(f"compute_dtype must be one of {tuple(COMPUTE_DTYPES)}, got {compute_dtype!r}")
    if not (isinstance(alpha, (int, float)) and 0.0 <= float(alpha) <= 1.0):
        raise ValueError(f"alpha must be in [0, 1], got {alpha!r}")
    if not 0.0 < float(epsilon) < 1.0:
        raise ValueError(f"epsilon must be in (0, 1), got {epsilon!r}")
    if int(batch) < 1 or int(knn_k) < 1:
        raise ValueError("batch and knn_k must be >= 1")
    alpha = float(alpha)
    x_np = np.asarray(embeddings)
    n = x_np.shape[0] if x_np.ndim == 2 else -1
    k = budget(max(n, 0), ratio=select_ratio, num=select_num)
    if alpha > 0 and quality is None:
        raise ValueError("alpha > 0 needs quality scores")
    if quality is not None and len(quality) != n:
        raise ValueError(f"quality has {len(quality)} values for {n} embeddings")
    device = resolve_device(device)
    x_np = _prepare_embeddings(x_np, compute_dtype)
    q = None
    if quality is not None and alpha > 0:
        q, invalid = normalize_quality(quality, quality_norm, quality_fill)
        if invalid.any():
            logger.warning(f"QDIT: {int(invalid.sum())} of {n} quality values are missing, "
                           f"non-numeric, NaN or inf; they get the {quality_fill!r} quality")
    meta = dict(method=method, similarity=similarity, alpha=alpha, n=n, k=k,
                compute_dtype=compute_dtype, quality_norm=quality_norm, epsilon=epsilon, seed=seed)
    empty = np.zeros(0, dtype=np.int64)
    if k == 0 or n == 0:
        return QditResult(empty, np.zeros(0), np.zeros(0), q, 1.0, 0.0, 0, meta)

    if partition_size is not None and int(partition_size) < 1:
        raise ValueError(f"partition_size must be >= 1, got {partition_size!r}")
    if partition_size is not None and n > int(partition_size) and alpha < 1.0:
        return _partitioned(x_np, k, quality, q, int(partition_size), meta, progress,
                            dict(alpha=alpha, diversity_scale=diversity_scale,
                                 quality_norm=quality_norm, quality_fill=quality_fill,
                                 method=method, epsilon=epsilon, seed=seed, similarity=similarity,
                                 knn_k=knn_k, max_memory_mb=max_memory_mb,
                                 compute_dtype=compute_dtype, fast_bounds=fast_bounds,
                                 batch=batch, device=device))

    if alpha == 1.0:  # pure quality: a sort (ties by index); no similarity needed
        order = np.lexsort((np.arange(n), -q))[:k]
        return QditResult(order.astype(np.int64), q[order].copy(), np.full(k, np.nan), q, 1.0,
                          float("nan"), 0, meta)

    # the backend
    if similarity == "knn":
        backend: _Backend = _SparseKnn(x_np.astype(np.float32), int(knn_k), 4096, device, progress)
    else:
        x = torch.from_numpy(x_np).to(device)
        backend = _DenseRows(x, COMPUTE_DTYPES[compute_dtype], max_memory_mb,
                             dense=similarity == "dense", progress=progress)
    mdtype = torch.float64 if compute_dtype == "float64" else torch.float32
    m = torch.zeros(n, dtype=mdtype, device=device if similarity != "knn" else "cpu")

    running = diversity_scale in ADAPTIVE_SCALES  # the scale is set anew at every step
    need_all = method == "lazy" or diversity_scale == "max_singleton"
    if fast_bounds is None:
        fast_bounds = _bf16_is_fast(device)
    fast_bounds = bool(fast_bounds) and isinstance(backend, _DenseRows) \
        and backend.dense is None and compute_dtype != "bfloat16" \
        and diversity_scale != "max_singleton"
    meta["fast_bounds"] = fast_bounds
    first = backend.all_gains(m, progress, fast_bounds).cpu() if need_all else None
    scale = math.nan if running else _resolve_scale(diversity_scale, n, first, k)
    qv = torch.from_numpy(q) if q is not None else torch.zeros(n, dtype=torch.float64)

    # dstale[a] >= d(a | A): the last exact diversity gain of a (gains only shrink as A grows),
    # +inf when never evaluated. The step's score is wd * d(a | A) + wq * q(a) with wd, wq >= 0,
    # so bound = wd * dstale + wq * q is an upper bound of it (what the lazy greedy needs).
    if (method == "lazy" and not running and isinstance(backend, _DenseRows)
            and backend.dense is not None and backend.device.type == "cpu"):
        # the whole matrix is held: the compiled heap greedy (same sequence as the loop below)
        out_idx = np.empty(k, dtype=np.int64)
        out_gain = np.empty(k, dtype=np.float64)
        out_dgain = np.empty(k, dtype=np.float64)
        wd = (1.0 - alpha) / scale
        evals = _lazy_greedy_dense(backend.dense.numpy(), first.numpy().copy(),
                                   qv.numpy().astype(np.float64), wd, alpha, k, m.numpy(),
                                   out_idx, out_gain, out_dgain)
        backend.n_evaluations += int(evals)
        meta["evaluations_per_step"] = backend.n_evaluations / k
        meta["held_matrix"] = True
        return QditResult(out_idx, out_gain, out_dgain, q, scale,
                          float(m.sum(dtype=torch.float64)), backend.n_evaluations, meta)
    meta["held_matrix"] = isinstance(backend, _DenseRows) and backend.dense is not None
    if (method == "stochastic" and not running and meta["held_matrix"]
            and backend.device.type == "cpu"):
        return _stochastic_held(backend, q, qv, alpha, scale, k, n, m, seed, epsilon, meta,
                                progress)
    dstale = first.clone() if first is not None else torch.full((n,), math.inf,
                                                                dtype=torch.float64)
    weights = [0.0, alpha] if running else [(1.0 - alpha) / scale, alpha]  # [wd, wq]
    bound = weights[0] * dstale + weights[1] * qv if not running else qv.clone()
    selected = torch.zeros(n, dtype=torch.bool)
    out_idx = np.empty(k, dtype=np.int64)
    out_gain = np.empty(k, dtype=np.float64)
    out_dgain = np.empty(k, dtype=np.float64)
    rng = np.random.default_rng(seed)
    sample_size = min(n, int(math.ceil(n / k * math.log(1.0 / float(epsilon)))))
    batch = int(batch)
    step_scales = np.full(k, np.nan) if running else None

    def gains_of(idx: torch.Tensor) -> torch.Tensor:
        dg = backend.gains(idx.to(m.device) if similarity != "knn" else idx, m).cpu()
        dstale[idx] = dg
        return dg

    def evaluate(idx: torch.Tensor) -> torch.Tensor:
        dg = gains_of(idx)
        bound[idx] = weights[0] * dg + weights[1] * qv[idx]
        return dg

    for step in tqdm(range(k), desc=f"QDIT {method} greedy", disable=not progress):
        if method == "lazy" or sample_size >= n - step:
            pool = None  # every unselected row
        else:
            avail = np.flatnonzero(~selected.numpy())
            pool = torch.from_numpy(np.sort(rng.choice(avail, size=sample_size, replace=False)))
        if running:
            # the best diversity gain among the candidates (exact, found lazily on the diversity
            # bounds alone); that row then has diversity term 1 - alpha
            _, top_gain, _ = _lazy_argmax(dstale, selected, pool, gains_of, batch)
            step_scales[step] = top_gain
            weights[:] = [(1.0 - alpha) / top_gain if top_gain > 0 else 0.0, alpha]
            if weights[0] > 0:
                torch.add(weights[1] * qv, dstale, alpha=weights[0], out=bound)
            else:  # everything left is fully covered: quality alone decides
                torch.mul(qv, weights[1], out=bound)
            bound[selected] = -math.inf
        best, best_score, best_dg = _lazy_argmax(bound, selected, pool, evaluate, batch)
        selected[best] = True
        bound[best] = -math.inf
        dstale[best] = -math.inf
        out_idx[step], out_gain[step], out_dgain[step] = best, best_score, best_dg
        backend.update(best, m)
    objective = float(m.sum(dtype=torch.float64))
    meta["evaluations_per_step"] = backend.n_evaluations / k
    if running:
        meta["step_scales"] = step_scales
    return QditResult(out_idx, out_gain, out_dgain, q, scale, objective, backend.n_evaluations,
                      meta)


def _stochastic_held(backend: "_DenseRows", q, qv: torch.Tensor, alpha: float, scale: float,
                     k: int, n: int, m: torch.Tensor, seed: int, epsilon: float, meta: dict,
                     progress: bool) -> QditResult:
    """Stochastic greedy over a held matrix: the same seeded samples and the same exact argmax
    per sample as the general loop (so the same sequence), each step one compiled call."""
    sim, mn = backend.dense.numpy(), m.numpy()
    qn = qv.numpy().astype(np.float64)
    wd = (1.0 - alpha) / scale
    dstale = np.full(n, np.inf)
    selected = np.zeros(n, dtype=bool)
    out_idx = np.empty(k, dtype=np.int64)
    out_gain = np.empty(k, dtype=np.float64)
    out_dgain = np.empty(k, dtype=np.float64)
    rng = np.random.default_rng(seed)
    sample_size = min(n, int(math.ceil(n / k * math.log(1.0 / float(epsilon)))))
    for step in tqdm(range(k), desc="QDIT stochastic greedy", disable=not progress):
        avail = np.flatnonzero(~selected)
        cand = avail if sample_size >= n - step else \
            np.sort(rng.choice(avail, size=sample_size, replace=False))
        best, score, dg, evals = _sample_argmax(sim, cand, dstale, qn, wd, alpha, mn)
        backend.n_evaluations += int(evals)
        selected[best] = True
        dstale[best] = -np.inf
        out_idx[step], out_gain[step], out_dgain[step] = best, score, dg
        _cover(sim[best], mn)
    meta["evaluations_per_step"] = backend.n_evaluations / k
    return QditResult(out_idx, out_gain, out_dgain, q, scale, float(m.sum(dtype=torch.float64)),
                      backend.n_evaluations, meta)


def _partitioned(x: np.ndarray, k: int, quality, q, part_size: int, meta: dict,
                 progress: bool, kwargs: dict) -> QditResult:
    n = x.shape[0]
    n_parts = int(math.ceil(n / part_size))
    perm = np.random.default_rng(kwargs["seed"]).permutation(n)
    parts = np.array_split(perm, n_parts)
    # per-part budgets proportional to size, largest remainder, ties by part order
    exact = np.array([k * len(p) / n for p in parts])
    budgets = np.floor(exact).astype(int)
    extra = k - int(budgets.sum())
    budgets[np.argsort(-(exact - budgets), kind="stable")[:extra]] += 1
    idx, gains, dgains, objective, evals = [], [], [], 0.0, 0
    # quality is normalised once over the whole set so parts share one scale
    part_quality = q if q is not None else None
    for j, (part, b) in enumerate(zip(parts, budgets)):
        part = np.sort(part)
        if progress:
            logger.info(f"QDIT partition {j + 1}/{n_parts}: {len(part)} rows, selecting {b}")
        r = qdit_select(x[part], select_num=int(b),
                        quality=None if part_quality is None else part_quality[part],
                        partition_size=None, progress=progress,
                        **{**kwargs, "quality_norm": "none", "quality_fill": "min"})
        idx.append(part[r.indices])
        gains.append(r.gains)
        dgains.append(r.diversity_gains)
        objective += r.objective
        evals += r.n_evaluations
    idx_a, gains_a, dgains_a = np.concatenate(idx), np.concatenate(gains), np.concatenate(dgains)
    order = np.lexsort((idx_a, -gains_a))
    meta.update(partitions=n_parts, partition_size=part_size,
                evaluations_per_step=evals / max(k, 1))
    return QditResult(idx_a[order].astype(np.int64), gains_a[order], dgains_a[order], q, float("nan"),
                      objective, evals, meta)


def _bf16_is_fast(device: str) -> bool:
    from daar_ops.core import native_bf16

    return native_bf16(device)


def _resolve_scale(diversity_scale: str | float, n: int, first: torch.Tensor | None,
                   k: int = 1) -> float:
    if diversity_scale == "budget":
        # the raw gain at a 10% budget, kept at that meaning for any N and K: per-pick gains
        # grow like N / K (each pick stands for N / K rows), so divide by 0.1 * N / K
        return max(REFERENCE_RATIO * n / max(k, 1), 1e-12)
    if diversity_scale == "mean":
        return float(n)
    if diversity_scale == "none":
        return 1.0
    if diversity_scale == "max_singleton":
        top = float(first.max()) if first is not None and len(first) else 0.0
        return top if top > 0 else 1.0
    if isinstance(diversity_scale, (int, float)) and not isinstance(diversity_scale, bool) \
            and math.isfinite(diversity_scale) and diversity_scale > 0:
        return float(diversity_scale)
    raise ValueError(f"diversity_scale must be one of {DIVERSITY_SCALES} or a positive number, "
                     f"got {diversity_scale!r}")


def _lazy_argmax(bound: torch.Tensor, selected: torch.Tensor, pool: torch.Tensor | None,
                 evaluate, batch: int) -> tuple[int, float, float]:
    """Exact argmax of the current score over ``pool`` (all unselected rows when None).

    ``bound`` holds upper bounds (stale scores); evaluated rows get their exact score. The first
    round re-evaluates the ``batch`` best bounds; each later round every stale row whose bound
    still reaches the best exact score (best bounds first, 4096 at most), until no bound does.
    Ties go to the lower index.
    """
    if pool is None:
        cand_bound = bound.clone()
        cand_bound[selected] = -math.inf
        ids = None
    else:
        ids = pool
        cand_bound = bound[pool].clone()
    fresh = torch.zeros(len(cand_bound), dtype=torch.bool)
    best_pos, best_row, best_score, best_dg = -1, -1, -math.inf, 0.0
    first_round = True
    while True:
        stale = cand_bound.masked_fill(fresh, -math.inf)
        if first_round:
            take = min(batch, int((stale > -math.inf).sum()))
            if take == 0:
                break
            top_val, top_pos = torch.topk(stale, take)
        else:
            # every stale row whose bound reaches the best exact score (a tie only matters for a
            # lower index), best bound first, at most 4096 per round
            cand = torch.nonzero(stale >= best_score).flatten()
            if len(cand):
                rows_c = cand if ids is None else ids[cand]
                cand = cand[(stale[cand] > best_score) | (rows_c < best_row)]
            if len(cand) == 0:
                break
            if len(cand) > 4096:
                cand = cand[torch.topk(stale[cand], 4096).indices]
            top_pos = cand
        first_round = False
        rows = top_pos if ids is None else ids[top_pos]
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
