"""Reference pieces of the QDIT tests (product and research): test data and a naive greedy."""

from __future__ import annotations

import numpy as np


def clustered(n: int, d: int = 16, centers: int = 8, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    c = rng.normal(size=(centers, d))
    return c[rng.integers(0, centers, n)] + 0.6 * rng.normal(size=(n, d))


def unstructured(n: int, d: int = 32, seed: int = 0) -> np.ndarray:
    # unstructured data: facility-location gains have no structural ties (clustered data has
    # exact ties, e.g. two points covering only each other), so any exact greedy gives one sequence
    return np.random.default_rng(seed).normal(size=(n, d))


def clipped_sim(x: np.ndarray) -> np.ndarray:
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    return np.clip(xn @ xn.T, 0.0, None)


def naive_greedy(sim: np.ndarray, k: int, q: np.ndarray | None, alpha: float,
                 scale: float) -> list[int]:
    """argmax (1 - alpha) d(a|A) / scale + alpha q(a), K times; ties to the lower index."""
    n = sim.shape[0]
    m = np.zeros(n)
    chosen: list[int] = []
    for _ in range(k):
        score = (1 - alpha) * np.clip(sim - m, 0, None).sum(1) / scale
        if q is not None:
            score = score + alpha * q
        score[chosen] = -np.inf
        a = int(np.argmax(score))  # first maximum: ties go to the lower index
        chosen.append(a)
        m = np.maximum(m, sim[a])
    return chosen


def minmax(values: np.ndarray) -> np.ndarray:
    return (values - values.min()) / (values.max() - values.min())
