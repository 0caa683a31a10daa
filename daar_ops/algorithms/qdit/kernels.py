"""QDIT's compiled kernels: facility-location gains over rows of the clipped similarity, the
heap greedy and the sampled argmax over a held matrix, and the build of that matrix.

Every gain is ``sum_j max(0, row[j] - m[j])`` with float64 accumulation, where ``m`` is the
current coverage; ties go to the lower row index everywhere.
"""

from __future__ import annotations

import mmap

import numba
import numpy as np
import torch
from tqdm.auto import tqdm


@numba.njit(fastmath=True, cache=True)
def row_gain(row, m):  # pragma: no cover - compiled
    """sum_j max(0, row[j] - m[j]), float64 accumulation (vectorised; fastmath only reorders
    this sum)."""
    acc = 0.0
    for j in range(row.shape[0]):
        d = row[j] - m[j]
        if d > 0:
            acc += d
    return acc


@numba.njit(cache=True)
def cached_gains(buf, slots, m, out):  # pragma: no cover - compiled
    """out[i] = sum_j max(0, buf[slots[i], j] - m[j]), float64 accumulation."""
    for i in range(slots.shape[0]):
        out[i] = row_gain(buf[slots[i]], m)


def prefaulted_empty(shape: tuple[int, ...], dtype) -> np.ndarray:
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


def symmetric_similarity(xc: torch.Tensor, store_dtype: torch.dtype, block: int,
                          progress: bool = False) -> torch.Tensor:
    """clip(X X^T, 0) as one [N, N] tensor, built from the upper block triangle: each row block
    is multiplied only by the rows from its own start on, and the off-diagonal part is written
    to both halves (N^2 d / 2 multiply-adds instead of N^2 d)."""
    n = xc.shape[0]
    if xc.device.type == "cpu":
        out = torch.from_numpy(prefaulted_empty((n, n), np.float64 if store_dtype == torch.float64
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
def heap_before(key, idx, i, j):  # pragma: no cover - compiled
    """Heap order: the larger score first, ties to the lower row index."""
    return key[i] > key[j] or (key[i] == key[j] and idx[i] < idx[j])


@numba.njit(cache=True)
def sift_down(heap, key, idx, pos, size):  # pragma: no cover - compiled
    while True:
        left = 2 * pos + 1
        if left >= size:
            return
        best = left
        right = left + 1
        if right < size and heap_before(key, idx, heap[right], heap[left]):
            best = right
        if heap_before(key, idx, heap[best], heap[pos]):
            heap[pos], heap[best] = heap[best], heap[pos]
            pos = best
        else:
            return


@numba.njit(cache=True)
def lazy_greedy_held(sim, first, q, wd, wq, k, m, out_idx, out_gain, out_dgain
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
        sift_down(heap, key, idx, pos, size)
    evaluations = 0
    for step in range(k):
        while True:
            a = heap[0]
            if stamp[a] == step:
                break
            acc = row_gain(sim[a], m)
            evaluations += 1
            first[a] = acc  # the latest exact diversity gain
            key[a] = wd * acc + wq * q[a]
            stamp[a] = step
            sift_down(heap, key, idx, 0, size)
        out_idx[step] = a
        out_gain[step] = key[a]
        out_dgain[step] = first[a]
        size -= 1
        heap[0] = heap[size]
        sift_down(heap, key, idx, 0, size)
        row = sim[a]
        for j in range(n):
            if row[j] > m[j]:
                m[j] = row[j]
    return evaluations


@numba.njit(cache=True)
def sample_argmax(sim, cand, dstale, q, wd, wq, m):  # pragma: no cover - compiled
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
        g = row_gain(sim[a], m)
        evaluations += 1
        dstale[a] = g
        score = wd * g + wq * q[a]
        if score > best_score or (score == best_score and a < best):
            best, best_score, best_dg = a, score, g
    return best, best_score, best_dg, evaluations


@numba.njit(cache=True)
def cover(row, m):  # pragma: no cover - compiled
    """m <- max(m, row) in place."""
    for j in range(m.shape[0]):
        if row[j] > m[j]:
            m[j] = row[j]
