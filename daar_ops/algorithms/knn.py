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
extra candidates, rescores them pair by pair in float64 (a BLAS GEMM may give exact duplicates
similarities one float32 ulp apart) and re-sorts them by (-similarity, index). A row whose k-th kept similarity
equals the last retrieved one (the tie group may continue past what was retrieved), or that got
fewer than k candidates (an approximate index that probed too few cells), is recomputed exactly
against all rows with a stable sort, so the rule holds for any number of duplicates.
"""

from __future__ import annotations

import numpy as np
from tqdm.auto import tqdm

# torch and faiss are imported where used: importing this module (as every op does) stays cheap.

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
    import torch

    faiss.omp_set_num_threads(max(1, torch.get_num_threads()))
    return faiss


# float32 BLAS similarities of unit vectors are within this of the true cosine (typical error
# ~sqrt(d) * 2^-24, ~1e-6 at d = 384); a candidate list whose k-th value clears the last retrieved
# one by more than this cannot miss a row that ties with or beats its k-th.
SIM_TOLERANCE = 1e-5


def _pair_sims(queries: np.ndarray, base: np.ndarray, cand: np.ndarray) -> np.ndarray:
    """[B, c] cosines of each query with its candidates, each pair summed by one fixed routine in
    float64 (exact products), so exact duplicates get bit-identical similarities (a BLAS GEMM does
    not promise that: its edge tiles sum in another order)."""
    out = np.empty(cand.shape, dtype=np.float64)
    step = max(1, (1 << 22) // max(1, cand.shape[1] * queries.shape[1]))
    for s in range(0, len(cand), step):
        q = queries[s:s + step].astype(np.float64)
        out[s:s + step] = (q[:, None, :] * base[cand[s:s + step]].astype(np.float64)).sum(-1)
    return out


def _tie_ruled(queries: np.ndarray, base: np.ndarray, cand_idx: np.ndarray,
               cand_sim: np.ndarray, rows: np.ndarray | None, k: int, complete: bool
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The first k of each query's candidates in (-similarity, index) order.

    :param cand_idx: [B, c] candidate rows of ``base`` (-1 = none), any order.
    :param cand_sim: [B, c] their similarities as the search computed them.
    :param rows: [B] the queries' own rows in ``base``, dropped (``exclude_self``); or None.
    :param complete: the candidates are all rows (nothing beyond them can tie).
    :returns: (indices [B, k], sims [B, k], exact [B] bool: False where the row must be recomputed).
    """
    invalid = cand_idx < 0
    if rows is not None:
        invalid |= cand_idx == rows[:, None]
    sentinel = np.iinfo(np.int64).max
    idx = np.where(invalid, sentinel, cand_idx).astype(np.int64)
    sim = np.where(invalid, -np.inf, _pair_sims(queries, base, np.where(invalid, 0, cand_idx)))
    order = np.lexsort((idx, -sim), axis=-1)[:, :k]
    idx = np.take_along_axis(idx, order, axis=1)
    sim = np.take_along_axis(sim, order, axis=1)
    exact = idx[:, k - 1] != sentinel
    if not complete:
        # the lowest similarity retrieved (self and empty slots aside): rows outside the candidates
        # are at most this similar, so the k-th kept one must clear it
        retrieved = np.where(invalid, np.inf, cand_sim).min(axis=1)
        exact &= sim[:, k - 1] > retrieved + SIM_TOLERANCE
    return idx, sim.astype(np.float32), exact


def _exact_rows(queries: np.ndarray, base: np.ndarray, rows: np.ndarray | None, k: int
                ) -> tuple[np.ndarray, np.ndarray]:
    """Exact neighbours of ``queries`` against all of ``base`` (the fallback): every row within
    SIM_TOLERANCE of the k-th similarity is rescored by :func:`_pair_sims` and sorted with the tie
    rule. ``rows``: the queries' own rows in ``base`` (excluded) or None."""
    out_idx = np.empty((len(queries), k), dtype=np.int64)
    out_sim = np.empty((len(queries), k), dtype=np.float32)
    for j, q in enumerate(queries):
        s = base @ q
        if rows is not None:
            s[rows[j]] = -np.inf
        kth = np.partition(s, len(s) - k)[len(s) - k]
        cand = np.flatnonzero(s >= kth - 2 * SIM_TOLERANCE)
        if rows is not None:
            cand = cand[cand != rows[j]]
        sim = _pair_sims(q[None], base, cand[None])[0]
        order = np.lexsort((cand, -sim))[:k]
        out_idx[j], out_sim[j] = cand[order], sim[order]
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
        idx, sim, exact = _tie_ruled(x[start:stop], x, i, d, rows if exclude_self else None, k,
                                     complete=n_cand == n)
        indices[start:stop], sims[start:stop] = idx, sim
        redo.append(rows[~exact])
    _repair(x, indices, sims, np.concatenate(redo), k, exclude_self)
    return indices, sims


def _repair(x: np.ndarray, indices: np.ndarray, sims: np.ndarray, rows: np.ndarray, k: int,
            exclude_self: bool) -> None:
    if len(rows):
        indices[rows], sims[rows] = _exact_rows(x[rows], x, rows if exclude_self else None, k)


def knn_cosine_torch(embeddings: np.ndarray, k: int, block_size: int = 4096, device: str = "cpu",
                     exclude_self: bool = True, progress: bool = False, tie_margin: int = 8
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k cosine neighbours by a torch blocked matmul (the CUDA path of
    :func:`knn_cosine`; same contract). Memory O(block_size * N) per block."""
    import torch

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
        idx, sim, exact = _tie_ruled(xn[start:stop], xn, top_idx.cpu().numpy(),
                                     top_vals.cpu().numpy(), rows if exclude_self else None, k,
                                     complete=n_cand == n)
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
    if cuda:
        import torch
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
        idx, sim, exact = _tie_ruled(block, b, i, d, None, 1, complete=n_cand == len(b))
        redo = np.flatnonzero(~exact)  # a tie group larger than the margin
        if len(redo):
            idx[redo], sim[redo] = _exact_rows(block[redo], b, None, 1)
        out_idx[start:start + len(block)] = idx[:, 0]
        out_sim[start:start + len(block)] = sim[:, 0]
    return out_idx, out_sim
