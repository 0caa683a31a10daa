"""Cosine k-nearest neighbours through faiss, memory bounded, with a deterministic tie rule.

No Data-Juicer import, no model loading, no file I/O.

* ``index="exact"`` (default): brute-force inner product on L2-normalised float32 rows with faiss's
  flat kernel (``faiss.knn`` = what ``IndexFlatIP.search`` runs, without copying the base into an
  index). Exact.
* ``index="ivf"``: ``IndexIVFFlat`` (spherical k-means coarse quantizer with ``nlist`` cells, trained
  on a seeded sample; ``nprobe`` cells searched). Approximate: recall measured in
  ``tools/bench_knn.py``.
* ``index="hnsw"``: ``IndexHNSWFlat`` (``hnsw_m`` links, ``ef_construction`` / ``ef_search``).
  Approximate; its graph depends on the insertion order of parallel threads, so it is
  deterministic only with one thread.
* ``device="cuda"``: the torch blocked matmul (:func:`knn_cosine_torch`; faiss-gpu is not
  installed), exact only.

The tie rule is the package's (:func:`daar_ops.core.rank_order`): among equal similarities the lower
index comes first. faiss promises no order among ties, so every backend retrieves ``tie_margin``
extra candidates and they are re-sorted by (-similarity, index). A row whose k-th kept similarity
equals the last retrieved one (the tie group may continue past what was retrieved), or that got
fewer than k candidates (an approximate index that probed too few cells), is recomputed exactly
against all rows with a stable sort, so the rule holds for any number of duplicates.
"""

from __future__ import annotations

import numpy as np
import torch
from tqdm.auto import tqdm

KNN_INDEXES = ("exact", "ivf", "hnsw")


def l2_normalize(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, eps)


def _check_k(n: int, k: int, exclude_self: bool) -> None:
    top = n - 1 if exclude_self else n
    if not 1 <= k <= top:
        raise ValueError(f"k must be in [1, {top}] for {n} rows"
                         f"{' (a row is not its own neighbour)' if exclude_self else ''}, got {k}")


def _faiss():
    """faiss with its OpenMP threads set from torch's, so tests and benchmarks stay at 1-2."""
    import faiss

    faiss.omp_set_num_threads(max(1, torch.get_num_threads()))
    return faiss


def _tie_ruled(cand_idx: np.ndarray, cand_sim: np.ndarray, rows: np.ndarray, k: int,
               exclude_self: bool, complete: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The first k of each row's candidates in (-similarity, index) order.

    :param cand_idx: [B, c] candidate indices (-1 = none), any order.
    :param cand_sim: [B, c] their similarities.
    :param rows: [B] the query rows' own indices (dropped with ``exclude_self``).
    :param complete: the candidates are all rows (nothing beyond them can tie).
    :returns: (indices [B, k], sims [B, k], exact [B] bool: False where the row must be recomputed).
    """
    idx = cand_idx.astype(np.int64, copy=True)
    sim = cand_sim.astype(np.float32, copy=True)
    invalid = idx < 0
    if exclude_self:
        invalid |= idx == rows[:, None]
    sentinel = np.iinfo(np.int64).max
    idx[invalid] = sentinel
    sim[invalid] = -np.inf
    order = np.lexsort((idx, -sim), axis=-1)
    idx = np.take_along_axis(idx, order, axis=1)[:, :k]
    sim = np.take_along_axis(sim, order, axis=1)[:, :k]
    enough = idx[:, k - 1] != sentinel
    if complete:
        return idx, sim, enough
    # lowest similarity retrieved (self and empty slots aside): a tie with the k-th kept one means
    # rows outside the candidates may share that similarity and have a lower index
    retrieved = np.where(np.isfinite(cand_sim) & (cand_idx >= 0), cand_sim, np.inf).min(axis=1)
    return idx, sim, enough & (sim[:, k - 1] > retrieved)


def _exact_rows(x: np.ndarray, rows: np.ndarray, k: int, exclude_self: bool
                ) -> tuple[np.ndarray, np.ndarray]:
    """Exact neighbours of ``rows`` against all of ``x`` by a stable full sort (the fallback)."""
    out_idx = np.empty((len(rows), k), dtype=np.int64)
    out_sim = np.empty((len(rows), k), dtype=np.float32)
    for start in range(0, len(rows), 256):
        r = rows[start:start + 256]
        s = x[r] @ x.T
        if exclude_self:
            s[np.arange(len(r)), r] = -np.inf
        order = np.argsort(-s, axis=1, kind="stable")[:, :k]
        out_idx[start:start + len(r)] = order
        out_sim[start:start + len(r)] = np.take_along_axis(s, order, axis=1)
    return out_idx, out_sim


def _build_index(x: np.ndarray, index: str, nlist: int | None, hnsw_m: int,
                 ef_construction: int | None, seed: int):
    faiss = _faiss()
    n, d = x.shape
    if index == "ivf":
        nlist = int(nlist) if nlist else max(1, min(int(4 * np.sqrt(n)), n // 39))
        if not 1 <= nlist <= n:
            raise ValueError(f"nlist must be in [1, {n}], got {nlist}")
        quantizer = faiss.IndexFlatIP(d)
        ivf = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
        ivf.cp.seed = int(seed)
        ivf.cp.spherical = True  # centroids on the unit sphere, as the data
        train_n = min(n, 64 * nlist)  # faiss wants >= 39 points per cell; more only costs time
        sample = np.sort(np.random.default_rng(seed).choice(n, train_n, replace=False))
        ivf.train(x[sample])
        ivf.add(x)
        return ivf
    hnsw = faiss.IndexHNSWFlat(d, int(hnsw_m), faiss.METRIC_INNER_PRODUCT)
    hnsw.hnsw.efConstruction = int(ef_construction or 2 * int(hnsw_m))
    hnsw.add(x)
    return hnsw


def knn_cosine(embeddings: np.ndarray, k: int, block_size: int = 4096, device: str = "cpu",
               exclude_self: bool = True, progress: bool = False, index: str = "exact",
               nlist: int | None = None, nprobe: int = 16, hnsw_m: int = 32,
               ef_search: int = 128, ef_construction: int | None = None, tie_margin: int = 8,
               seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Top-k cosine neighbours of every row among all rows (see the module docstring).

    Queries run ``block_size`` rows at a time, so besides the data (and an index for ivf/hnsw)
    memory is O(block_size * (k + tie_margin)), never O(N^2). With ``exclude_self`` a row is never
    its own neighbour, even when exact duplicates exist (duplicates of a row are still each
    other's neighbours). Among equal similarities the lower index comes first.

    :param k: neighbours per row, in [1, N-1] with ``exclude_self`` (else [1, N]).
    :param index: ``exact`` (default), ``ivf`` or ``hnsw``; ``device="cuda"`` supports only exact.
    :param nlist: IVF cells (default ``4 sqrt(N)``, at most N / 39); ``nprobe``: cells searched.
    :param hnsw_m: HNSW links per node; ``ef_construction`` (default ``2 * hnsw_m``) and
        ``ef_search`` (raised to the number of candidates if lower): HNSW beam widths.
    :param tie_margin: extra candidates retrieved per row for the tie rule.
    :param seed: IVF training sample and k-means seed.
    :returns: (indices [N, k] int64, similarities [N, k] float32), most similar first.
    """
    if index not in KNN_INDEXES:
        raise ValueError(f"index must be one of {KNN_INDEXES}, got {index!r}")
    if block_size < 1 or tie_margin < 0:
        raise ValueError(f"block_size must be >= 1 and tie_margin >= 0, got {block_size}, "
                         f"{tie_margin}")
    if str(device).startswith("cuda"):
        if index != "exact":
            raise ValueError(f"index={index!r} needs faiss-gpu, which is not installed; on CUDA "
                             f"only index='exact' (torch) is available")
        return knn_cosine_torch(embeddings, k, block_size=block_size, device=device,
                                exclude_self=exclude_self, progress=progress,
                                tie_margin=tie_margin)
    x = np.ascontiguousarray(l2_normalize(embeddings))
    n = x.shape[0]
    _check_k(n, k, exclude_self)
    faiss = _faiss()
    n_cand = min(n, k + int(exclude_self) + tie_margin)
    searcher = None
    if index != "exact":
        searcher = _build_index(x, index, nlist, hnsw_m, ef_construction, seed)
        if index == "ivf":
            searcher.nprobe = max(1, min(int(nprobe), searcher.nlist))
        else:
            searcher.hnsw.efSearch = max(int(ef_search), n_cand)
    indices = np.empty((n, k), dtype=np.int64)
    sims = np.empty((n, k), dtype=np.float32)
    redo: list[np.ndarray] = []
    for start in tqdm(range(0, n, block_size), desc="kNN", disable=not progress):
        stop = min(start + block_size, n)
        if searcher is None:
            d, i = faiss.knn(x[start:stop], x, n_cand, metric=faiss.METRIC_INNER_PRODUCT)
        else:
            d, i = searcher.search(x[start:stop], n_cand)
        rows = np.arange(start, stop)
        idx, sim, exact = _tie_ruled(i, d, rows, k, exclude_self, complete=n_cand == n)
        indices[start:stop], sims[start:stop] = idx, sim
        redo.append(rows[~exact])
    _repair(x, indices, sims, np.concatenate(redo), k, exclude_self)
    return indices, sims


def _repair(x: np.ndarray, indices: np.ndarray, sims: np.ndarray, rows: np.ndarray, k: int,
            exclude_self: bool) -> None:
    if len(rows):
        indices[rows], sims[rows] = _exact_rows(x, rows, k, exclude_self)


def knn_cosine_torch(embeddings: np.ndarray, k: int, block_size: int = 4096, device: str = "cpu",
                     exclude_self: bool = True, progress: bool = False, tie_margin: int = 8
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k cosine neighbours by a torch blocked matmul (the CUDA path of
    :func:`knn_cosine`; same contract). Memory O(block_size * N) per block."""
    xn = np.ascontiguousarray(l2_normalize(embeddings))
    n = xn.shape[0]
    _check_k(n, k, exclude_self)
    x = torch.from_numpy(xn).to(device)
    n_cand = min(n, k + int(exclude_self) + tie_margin)
    indices = np.empty((n, k), dtype=np.int64)
    sims = np.empty((n, k), dtype=np.float32)
    redo: list[np.ndarray] = []
    for start in tqdm(range(0, n, block_size), desc="kNN", disable=not progress):
        stop = min(start + block_size, n)
        top_vals, top_idx = torch.topk(x[start:stop] @ x.T, n_cand, dim=1, largest=True,
                                       sorted=True)
        rows = np.arange(start, stop)
        idx, sim, exact = _tie_ruled(top_idx.cpu().numpy(), top_vals.cpu().numpy(), rows, k,
                                     exclude_self, complete=n_cand == n)
        indices[start:stop], sims[start:stop] = idx, sim
        redo.append(rows[~exact])
    _repair(xn, indices, sims, np.concatenate(redo), k, exclude_self)
    return indices, sims


def nearest_cosine(queries: np.ndarray, base: np.ndarray, block_size: int = 4096,
                   device: str = "cpu") -> tuple[np.ndarray, np.ndarray]:
    """Exact nearest row of ``base`` for every row of ``queries`` by cosine (faiss flat search on
    CPU, a torch blocked matmul on CUDA); the lower base index wins ties.

    :returns: (indices [Q] int64, similarities [Q] float32).
    """
    q = np.ascontiguousarray(l2_normalize(queries))
    b = np.ascontiguousarray(l2_normalize(base))
    if len(b) == 0:
        raise ValueError("the base is empty: no nearest row")
    out_idx = np.empty(len(q), dtype=np.int64)
    out_sim = np.empty(len(q), dtype=np.float32)
    cuda = str(device).startswith("cuda")
    faiss = None if cuda else _faiss()
    bt = torch.from_numpy(b).to(device) if cuda else None
    n_cand = min(len(b), 1 + 8)
    for start in range(0, len(q), block_size):
        block = q[start:start + block_size]
        if cuda:
            vals, idx = torch.topk(torch.from_numpy(block).to(device) @ bt.T, n_cand, dim=1)
            d, i = vals.cpu().numpy(), idx.cpu().numpy()
        else:
            d, i = faiss.knn(block, b, n_cand, metric=faiss.METRIC_INNER_PRODUCT)
        rows = np.full(len(block), -1, dtype=np.int64)  # no self to exclude
        idx, sim, exact = _tie_ruled(i, d, rows, 1, False, complete=n_cand == len(b))
        for r in np.flatnonzero(~exact):  # a tie group larger than the margin
            s = b @ block[r]
            j = int(np.argmax(s))  # argmax returns the first (lowest) index of the maximum
            idx[r, 0], sim[r, 0] = j, s[j]
        out_idx[start:start + len(block)] = idx[:, 0]
        out_sim[start:start + len(block)] = sim[:, 0]
    return out_idx, out_sim
