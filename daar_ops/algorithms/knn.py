"""Exact cosine k-nearest neighbours in blocks, memory bounded. No Data-Juicer import."""

from __future__ import annotations

import numpy as np
import torch
from tqdm.auto import tqdm


def l2_normalize(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, eps)


def knn_cosine(embeddings: np.ndarray, k: int, block_size: int = 4096, device: str = "cpu",
               exclude_self: bool = True, progress: bool = False
               ) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k cosine neighbours of every row among all rows.

    Works on L2-normalised copies; similarities are computed one block of ``block_size`` query rows
    at a time, so memory is O(block_size * N), never O(N^2). Ties are broken by the lower index
    (a stable, deterministic order). With ``exclude_self`` a row is never its own neighbour, even
    when exact duplicates exist (duplicates of a row are still each other's neighbours).

    :returns: (indices [N, k] int64, similarities [N, k] float32), most similar first.
    """
    x = torch.from_numpy(l2_normalize(embeddings)).to(device)
    n = x.shape[0]
    k_eff = min(k, n - 1 if exclude_self else n)
    if k < 1 or k_eff < 1:
        raise ValueError(f"k must be in [1, {n - 1 if exclude_self else n}] for {n} rows, got {k}")
    indices = np.empty((n, k_eff), dtype=np.int64)
    sims = np.empty((n, k_eff), dtype=np.float32)
    # A tiny index-dependent offset makes topk's order deterministic among equal similarities.
    tiebreak = torch.arange(n, device=device, dtype=torch.float64) * 1e-12
    for start in tqdm(range(0, n, block_size), desc="kNN", disable=not progress):
        stop = min(start + block_size, n)
        block = (x[start:stop] @ x.T).to(torch.float64) - tiebreak
        if exclude_self:
            rows = torch.arange(stop - start, device=device)
            block[rows, rows + start] = -torch.inf
        top_vals, top_idx = torch.topk(block, k_eff, dim=1, largest=True, sorted=True)
        indices[start:stop] = top_idx.cpu().numpy()
        sims[start:stop] = (top_vals + tiebreak[top_idx]).to(torch.float32).cpu().numpy()
    return indices, sims
