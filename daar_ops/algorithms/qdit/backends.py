"""QDIT's similarity backends: each gives exact facility-location gains ``d(a | A)`` for a batch
of candidate rows and updates the coverage ``m`` when a row is selected.

* :class:`BlockedRows` (``similarity: blocked``): rows of the clipped cosine similarity
  ``clip(X X^T, 0)``. The whole N x N matrix is held when it fits ``max_memory_mb`` (built once
  from its upper block triangle); otherwise rows are computed by matmuls in blocks and kept in an
  LRU cache. Memory is bounded by ``max_memory_mb`` either way.
* :class:`KnnRows` (``similarity: knn``): sparse facility location, each row covering itself and
  its ``knn_k`` nearest neighbours (a different, truncated objective; O(N k) memory).
"""

from __future__ import annotations

import numpy as np
import torch
from tqdm.auto import tqdm

from daar_ops.algorithms.knn import knn_cosine
from daar_ops.algorithms.qdit.config import BF16_MARGIN, QditConfig
from daar_ops.algorithms.qdit.kernels import cached_gains, symmetric_similarity

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}


class Backend:
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


class BlockedRows(Backend):
    """Rows of clip(X X^T, 0): the whole matrix held (``held``) when it fits ``max_memory_mb``,
    else computed on the fly in blocks, with a bounded row cache.

    Not held, ``max_memory_mb`` is split: a quarter for matmul blocks, the rest for cached rows.
    The initial pass (all first gains) keeps the rows with the largest first gains, which are the
    ones the lazy greedy re-evaluates; later, rows are cached as evaluated, evicting the least
    recently used.
    """

    def __init__(self, x: torch.Tensor, compute_dtype: torch.dtype, max_memory_mb: float,
                 progress: bool = False):
        self.x = x  # [N, d] normalised, float32 or float64
        self.n = x.shape[0]
        self.device = x.device
        self.store_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        self.xc = x.to(compute_dtype)
        self.row_bytes = self.n * (8 if self.store_dtype == torch.float64 else 4)
        budget = max(0.0, float(max_memory_mb)) * 2**20
        self.block = int(max(8, min(4096, budget / 4 / (self.row_bytes * 2))))
        # hold the whole matrix when it fits the memory bound: built once with half the matmul
        # work (S is symmetric), and every later gain is a lookup
        hold_block = int(min(1024, (budget - self.n * self.row_bytes) / (2 * self.row_bytes)))
        hold = hold_block >= min(64, self.n)
        self.capacity = 0 if hold else int(min(self.n, budget * 3 / 4 / self.row_bytes))
        self.buf = torch.empty((self.capacity, self.n), dtype=self.store_dtype, device=self.device)
        self.slot = np.full(self.n, -1, dtype=np.int64)  # row -> slot
        self.owner = np.full(self.capacity, -1, dtype=np.int64)  # slot -> row
        self.last_used = np.zeros(self.capacity, dtype=np.int64)
        self.clock = 0
        self.held = None
        if hold:
            self.held = symmetric_similarity(self.xc, self.store_dtype,
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
        if self.held is not None:
            return self.held[idx.to(self.device)]
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
        if self.device.type == "cpu" and (self.held is not None or len(idx) <= self.capacity):
            ids = idx.numpy()
            if self.held is not None:
                buf, slots = self.held, ids
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
            cached_gains(buf.numpy(), slots, m.numpy(), out)  # one fused pass per row
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
        if self.held is not None and self.device.type == "cpu":
            out = np.empty(self.n, dtype=np.float64)
            cached_gains(self.held.numpy(), np.arange(self.n), m.numpy(), out)
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
            r = self.held[start:stop] if self.held is not None else \
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
        if self.held is None and self.slot[a] >= 0:  # a selected row is never evaluated again
            self.owner[self.slot[a]] = -1
            self.slot[a] = -1


class KnnRows(Backend):
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


def make_backend(x: np.ndarray, config: QditConfig, device: str, progress: bool) -> Backend:
    """The backend ``config.similarity`` names over the normalised rows ``x`` [N, d]."""
    if config.similarity == "knn":
        return KnnRows(x.astype(np.float32), config.knn_k, 4096, device, progress)
    return BlockedRows(torch.from_numpy(x).to(device), TORCH_DTYPES[config.compute_dtype],
                       config.max_memory_mb, progress=progress)
