"""DS2: diversity-aware score curation of LLM quality ratings. No Data-Juicer import.

Implemented from the math (DS2, ICLR 2025; HOC, Zhu et al. ICML'21; SimiFeat, Zhu et al. ICML'22),
not from the reference code. Pipeline, all deterministic for a given ``seed``:

1. :func:`scores_to_classes` - raw ratings -> K ordinal classes (DS2: ``clip(s, 4, 9) - 4``).
2. One exact blocked cosine kNN (:func:`daar_ops.algorithms.knn.knn_cosine`) of ``k_pool``
   neighbours per row; every later step reads prefixes of that list (memory O(N * k_pool), never
   O(N^2)).
3. :func:`consensus_vectors` + :func:`fit_transition_matrix` (HOC) - the 1st/2nd/3rd-order
   consensus of a sample and its 2 nearest neighbours, fitted by ``T = row-softmax(A)``,
   ``p = softmax(b)`` minimising the sum of unsquared Frobenius distances (Adam).
4. :func:`detect_corrupted` (SimiFeat-rank) - per-class noise rates from (T, p), weighted kNN votes
   over random subsets, flagged fraction, suggested score and confidence.
5. :func:`long_tail_scores` - ``tanh(mean cosine distance to the k nearest neighbours / 2)``.
6. :func:`lexicographic_select` - curated score desc, then long-tail desc, then index.

:func:`curate_scores` runs 2-5; :func:`ds2_select` adds 6. :func:`make_synthetic_ds2` builds data
with known truth (clusterable embeddings, scores observed through a known T) for tests and the
benchmark; :func:`write_ds2_report` writes the T heatmap, JSON and score histograms.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from loguru import logger
from tqdm.auto import tqdm

from daar_ops.core import budget
from daar_ops.algorithms.knn import knn_cosine, l2_normalize

# --------------------------------------------------------------------------------------------------
# 1. Scores -> classes


def scores_to_classes(scores: Sequence[float] | np.ndarray, low: float = 4.0, high: float = 9.0,
                      num_classes: int = 6, missing: float | None = None
                      ) -> tuple[np.ndarray, np.ndarray]:
    """Map raw scores to ``num_classes`` ordinal classes 0..K-1 by clipping to [low, high] and
    binning linearly: ``round((clip(s, low, high) - low) / (high - low) * (K - 1))``.

    With the DS2 defaults (low 4, high 9, K 6) an integer 1-10 rating ``s`` becomes
    ``clip(s, 4, 9) - 4``. Missing, NaN, inf or non-numeric scores take ``missing`` (default:
    ``low``, i.e. class 0, as DS2 counts a failed parse as 0).

    :returns: (classes [N] int64, invalid [N] bool marking the values replaced by ``missing``).
    """
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    if not high > low:
        raise ValueError(f"score range needs high > low, got low={low}, high={high}")
    fill = low if missing is None else float(missing)
    values = np.empty(len(scores), dtype=np.float64)
    invalid = np.zeros(len(scores), dtype=bool)
    for i, s in enumerate(scores):
        try:
            v = float(s)
        except (TypeError, ValueError):
            v = math.nan
        if not math.isfinite(v) or isinstance(s, bool):
            invalid[i], v = True, fill
        values[i] = v
    scaled = (np.clip(values, low, high) - low) / (high - low) * (num_classes - 1)
    # floor(x + 0.5): round half up, deterministic (np.round would round half to even).
    return np.floor(scaled + 0.5).astype(np.int64), invalid


# --------------------------------------------------------------------------------------------------
# 2-3. HOC estimation of T and p


def consensus_vectors(labels: np.ndarray, neighbors: np.ndarray, num_classes: int
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Empirical 1st/2nd/3rd-order consensus of each row and its two nearest neighbours.

    Under the HOC assumption (a sample and its 2-NN share the true class) each position of the
    triple ``(y_i, y_n1, y_n2)`` has marginal ``c1 = p T``, every pair ``c2 = T' diag(p) T`` and the
    triple ``c3_jlm = sum_i p_i T_ij T_il T_im``. Because these are symmetric, the estimates average
    over all positions / pairs / orderings of the triple (less variance, same expectation). All N
    triples are used: DS2 averages the frequencies over random subsets, whose expectation this is.

    :param neighbors: [N, >=2] indices of each row's nearest neighbours (most similar first).
    :returns: c1 [K], c2 [K, K], c3 [K, K, K] (float64, each summing to 1).
    """
    y = np.asarray(labels, dtype=np.int64)
    nb = np.asarray(neighbors)[:, :2]
    if nb.shape[1] < 2:
        raise ValueError("HOC needs 2 neighbours per row")
    k = num_classes
    triple = np.stack([y, y[nb[:, 0]], y[nb[:, 1]]], axis=1)
    c1 = np.bincount(triple.ravel(), minlength=k).astype(np.float64)
    c2 = np.zeros((k, k))
    for a, b in ((0, 1), (0, 2), (1, 2)):
        np.add.at(c2, (triple[:, a], triple[:, b]), 1.0)
    c2 = c2 + c2.T
    c3 = np.zeros((k, k, k))
    for perm in ((0, 1, 2), (0, 2, 1), (1, 0, 2), (1, 2, 0), (2, 0, 1), (2, 1, 0)):
        np.add.at(c3, (triple[:, perm[0]], triple[:, perm[1]], triple[:, perm[2]]), 1.0)
    return c1 / c1.sum(), c2 / c2.sum(), c3 / c3.sum()


def fit_transition_matrix(c1: np.ndarray, c2: np.ndarray, c3: np.ndarray, steps: int = 1500,
                          lr: float = 0.1, init_diag: float = 5.0, final_lr_ratio: float = 0.01
                          ) -> tuple[np.ndarray, np.ndarray, float]:
    """Fit ``T = row-softmax(A)`` and ``p = softmax(b)`` to the consensus vectors (HOC).

    Loss: ``||c1 - pT|| + ||c2 - T'diag(p)T|| + ||c3 - sum_i p_i T_i (x) T_i (x) T_i||`` (unsquared
    Frobenius norms, as DS2). Adam with learning rate ``lr``; ``A`` starts at ``init_diag * I - 1``
    (diagonally dominant, which picks the label permutation where observed scores mostly agree with
    the truth), ``b`` at 0. Unlike DS2 the learning rate decays (cosine) to ``lr * final_lr_ratio``
    so the estimate settles instead of jittering at the scale of ``lr``. Float64, CPU,
    deterministic.

    :returns: (T [K, K], p [K], final loss).
    """
    k = c1.shape[0]
    t1, t2, t3 = (torch.as_tensor(c, dtype=torch.float64) for c in (c1, c2, c3))
    a = (init_diag * torch.eye(k, dtype=torch.float64) - 1.0).requires_grad_(True)
    b = torch.zeros(k, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.Adam([a, b], lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(steps, 1),
                                                       eta_min=lr * final_lr_ratio)

    def loss_fn() -> torch.Tensor:
        t = torch.softmax(a, dim=1)
        p = torch.softmax(b, dim=0)
        m1 = p @ t
        m2 = t.T @ (p[:, None] * t)
        m3 = torch.einsum("i,ij,il,im->jlm", p, t, t, t)
        return (torch.linalg.norm(m1 - t1) + torch.linalg.norm(m2 - t2)
                + torch.linalg.norm(m3 - t3))

    for _ in range(steps):
        opt.zero_grad()
        loss = loss_fn()
        loss.backward()
        opt.step()
        sched.step()
    with torch.no_grad():
        final = float(loss_fn())
        return (torch.softmax(a, 1).numpy().copy(), torch.softmax(b, 0).numpy().copy(), final)


def noise_rates(transition: np.ndarray, prior: np.ndarray, observed_freq: np.ndarray,
                clip: tuple[float, float] = (0.05, 0.95)) -> np.ndarray:
    """Per observed class c: ``eta_c = 1 - T_cc p_c / P(observed = c)``, clipped to ``clip``.

    Classes never observed get ``clip[0]`` (nothing to flag)."""
    obs = np.asarray(observed_freq, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        eta = 1.0 - np.diag(transition) * prior / obs
    eta = np.where(obs > 0, eta, clip[0])
    return np.clip(np.nan_to_num(eta, nan=clip[0]), clip[0], clip[1])


# --------------------------------------------------------------------------------------------------
# 4. SimiFeat-rank detection


@dataclass
class Detection:
    """Per-sample output of :func:`detect_corrupted` (all [N])."""

    noisy_rate: np.ndarray  # (flagged + 1) / (drawn + 2)
    suggested: np.ndarray  # int64: most voted score other than the sample's own
    suggestion_share: np.ndarray  # share of rounds in which ``suggested`` was the suggestion
    confidence: np.ndarray  # suggestion_share * noisy_rate
    drawn: np.ndarray  # int64: rounds in which the sample was drawn
    flagged: np.ndarray  # int64: rounds in which it was flagged


def _first_k_kept(kept_nb: np.ndarray, k: int) -> np.ndarray:
    """Mask of the first ``k`` True entries of each row."""
    return kept_nb & (np.cumsum(kept_nb, axis=1) <= k)


def detect_corrupted(labels: np.ndarray, neighbors: np.ndarray, sims: np.ndarray,
                     eta: np.ndarray, num_classes: int, k: int = 10, rounds: int = 10,
                     subset_fraction: float = 0.8, seed: int = 0, progress: bool = False
                     ) -> Detection:
    """SimiFeat-rank detection over ``rounds`` random subsets.

    In each round every row is drawn with probability ``subset_fraction``. A drawn row's
    neighbours are its ``k`` nearest *drawn* rows; they are read from the row's precomputed,
    sorted neighbour list (``neighbors`` [N, k_pool]), which is exact as long as ``k`` of the
    ``k_pool`` listed neighbours were drawn (with k_pool = 3k and fraction 0.8 essentially always;
    otherwise the drawn ones among them vote). Neighbours vote for their scores with weight
    ``1 - cosine distance`` (= similarity, floored at 0). Per observed class c the rows whose
    ``-log(normalised vote for their own score)`` is in the top ``eta_c`` fraction are flagged
    (ties broken by a seeded random key). Each round also records the most voted *other* score as
    the row's suggestion. A drawn row without any usable vote (no drawn neighbour with positive
    similarity) is neither flagged nor given a suggestion in that round.
    """
    y = np.asarray(labels, dtype=np.int64)
    n = y.shape[0]
    nb, w_all = np.asarray(neighbors), np.maximum(np.asarray(sims, dtype=np.float64), 0.0)
    nb_labels = y[nb]
    rng = np.random.default_rng(seed)
    drawn = np.zeros(n, dtype=np.int64)
    flagged = np.zeros(n, dtype=np.int64)
    sugg_counts = np.zeros((n, num_classes), dtype=np.int64)
    rows = np.arange(n)
    for _ in tqdm(range(rounds), desc="DS2 detection", disable=not progress):
        kept = rng.random(n) < subset_fraction
        tie = rng.random(n)
        sel = _first_k_kept(kept[nb], k) & kept[:, None]
        w = np.where(sel, w_all, 0.0)
        votes = np.stack([(w * (nb_labels == c)).sum(axis=1) for c in range(num_classes)], axis=1)
        total = votes.sum(axis=1)
        # A row with no usable vote (no drawn neighbour with positive similarity) is neither
        # flagged nor given a suggestion this round; it still counts as drawn.
        has_vote = total > 0
        norm = votes / np.maximum(total, 1e-300)[:, None]
        own = norm[rows, y]
        score = np.where(has_vote, -np.log(own + 1e-12), -np.inf)
        other = norm.copy()
        other[rows, y] = -1.0
        suggestion = np.argmax(other, axis=1)  # lowest class among ties: deterministic
        for c in range(num_classes):
            members = np.flatnonzero(kept & (y == c))
            if members.size == 0:
                continue
            members = members[has_vote[members]]
            n_flag = int(math.floor(eta[c] * members.size + 0.5))
            if n_flag == 0:
                continue
            order = np.lexsort((tie[members], -score[members]))  # most suspicious first
            flagged[members[order[:n_flag]]] += 1
        drawn[kept] += 1
        voted = kept & has_vote
        sugg_counts[rows[voted], suggestion[voted]] += 1
    noisy_rate = (flagged + 1.0) / (drawn + 2.0)
    suggested = np.argmax(sugg_counts, axis=1)
    share = sugg_counts[rows, suggested] / np.maximum(drawn, 1)
    return Detection(noisy_rate=noisy_rate, suggested=suggested.astype(np.int64),
                     suggestion_share=share, confidence=share * noisy_rate, drawn=drawn,
                     flagged=flagged)


# --------------------------------------------------------------------------------------------------
# 5. Long-tail score


def long_tail_scores(sims: np.ndarray, k: int = 10) -> np.ndarray:
    """``tanh(mean cosine distance to the k nearest neighbours / 2)`` per row (higher = rarer)."""
    s = np.asarray(sims, dtype=np.float64)[:, :k]
    return np.tanh((1.0 - s).mean(axis=1) / 2.0)


# --------------------------------------------------------------------------------------------------
# 6. Selection


def resolve_budget(n: int, select_ratio: float | None = None, select_num: int | None = None
                   ) -> int:
    """Number of rows to keep: the package's one rule, :func:`daar_ops.core.budget`."""
    return budget(n, ratio=select_ratio, num=select_num)


def lexicographic_select(curated: np.ndarray, long_tail: np.ndarray, budget: int) -> np.ndarray:
    """Indices of the ``budget`` rows with the highest curated score, ties broken by the higher
    long-tail score, then the lower index; returned in selection order."""
    curated, long_tail = np.asarray(curated, np.float64), np.asarray(long_tail, np.float64)
    order = np.lexsort((np.arange(curated.shape[0]), -long_tail, -curated))
    return order[:budget]


# --------------------------------------------------------------------------------------------------
# Whole pipeline


@dataclass
class DS2Result:
    """Everything :func:`curate_scores` / :func:`ds2_select` computed (arrays are [N])."""

    raw: np.ndarray  # int64 classes 0..K-1 as observed
    curated: np.ndarray  # int64 classes after curation
    corrupted: np.ndarray  # bool: raw score replaced
    confidence: np.ndarray
    suggested: np.ndarray  # int64
    noisy_rate: np.ndarray
    long_tail: np.ndarray
    transition: np.ndarray  # [K, K] estimated T (rows: true score, cols: observed score)
    prior: np.ndarray  # [K] estimated clean prior p
    eta: np.ndarray  # [K] per-class noise rates used for detection
    selected: np.ndarray | None = None  # int64 indices in selection order
    info: dict[str, Any] = field(default_factory=dict)


def curate_scores(embeddings: np.ndarray, labels: np.ndarray, num_classes: int = 6, k: int = 10,
                  k_pool: int | None = None, hoc_steps: int = 1500, hoc_lr: float = 0.1,
                  detection_rounds: int = 10, subset_fraction: float = 0.8,
                  confidence_threshold: float = 0.5, seed: int = 0, device: str = "cpu",
                  block_size: int = 4096, progress: bool = False) -> DS2Result:
    """Estimate T and p, detect corrupted scores, curate them, and compute long-tail scores.

    :param embeddings: [N, d] sample embeddings (any scale; cosine geometry is used).
    :param labels: [N] observed classes in 0..num_classes-1 (see :func:`scores_to_classes`).
    :param k: neighbours voting in detection and averaged in the long-tail score (DS2: 10).
    :param k_pool: neighbours computed once per row (default ``3 * k``), read by every round.
    :param confidence_threshold: replace a score by its suggestion when confidence >= this.
    """
    y = np.asarray(labels, dtype=np.int64)
    n = y.shape[0]
    if embeddings.shape[0] != n:
        raise ValueError(f"{embeddings.shape[0]} embeddings for {n} labels")
    if n < 3:
        raise ValueError(f"DS2 curation needs at least 3 samples (a sample and 2 neighbours), "
                         f"got {n}")
    if y.min() < 0 or y.max() >= num_classes:
        raise ValueError(f"labels must be in [0, {num_classes - 1}]")
    if k < 2:
        raise ValueError(f"k must be >= 2, got {k}")
    if not 0.0 < subset_fraction <= 1.0:
        raise ValueError(f"subset_fraction must be in (0, 1], got {subset_fraction}")
    emb = np.asarray(embeddings, dtype=np.float32)
    if not np.isfinite(emb).all():
        bad = int((~np.isfinite(emb).all(axis=1)).sum())
        logger.warning(f"DS2: {bad} embeddings contain NaN/inf; those rows are set to 0")
        emb = np.where(np.isfinite(emb), emb, 0.0).astype(np.float32)
    k_pool = min(k_pool or 3 * k, n - 1)
    nb, sims = knn_cosine(l2_normalize(emb), k_pool, block_size=block_size, device=device,
                          progress=progress)
    c1, c2, c3 = consensus_vectors(y, nb, num_classes)
    transition, prior, loss = fit_transition_matrix(c1, c2, c3, steps=hoc_steps, lr=hoc_lr)
    observed = np.bincount(y, minlength=num_classes) / n
    eta = noise_rates(transition, prior, observed)
    det = detect_corrupted(y, nb, sims, eta, num_classes, k=min(k, k_pool),
                           rounds=detection_rounds, subset_fraction=subset_fraction, seed=seed,
                           progress=progress)
    corrupted = (det.confidence >= confidence_threshold) & (det.suggested != y)
    curated = np.where(corrupted, det.suggested, y)
    long_tail = long_tail_scores(sims, k=min(k, k_pool))
    info = dict(n=n, num_classes=num_classes, k=k, k_pool=k_pool, hoc_loss=loss,
                hoc_steps=hoc_steps, detection_rounds=detection_rounds,
                subset_fraction=subset_fraction, confidence_threshold=confidence_threshold,
                seed=seed, n_corrupted=int(corrupted.sum()), c1=c1.tolist())
    logger.info(f"DS2: {int(corrupted.sum())}/{n} scores curated (HOC loss {loss:.4f})")
    return DS2Result(raw=y, curated=curated.astype(np.int64), corrupted=corrupted,
                     confidence=det.confidence, suggested=det.suggested,
                     noisy_rate=det.noisy_rate, long_tail=long_tail, transition=transition,
                     prior=prior, eta=eta, info=info)


def ds2_select(embeddings: np.ndarray, labels: np.ndarray, select_ratio: float | None = None,
               select_num: int | None = None, **kwargs: Any) -> DS2Result:
    """:func:`curate_scores` then :func:`lexicographic_select` of the budget."""
    result = curate_scores(embeddings, labels, **kwargs)
    budget = resolve_budget(len(result.raw), select_ratio, select_num)
    result.selected = lexicographic_select(result.curated, result.long_tail, budget)
    result.info["budget"] = budget
    return result


# --------------------------------------------------------------------------------------------------
# Synthetic data with known truth


def off_diagonal_transition(num_classes: int = 6, off_mass: float = 0.3, decay: float = 1.0
                            ) -> np.ndarray:
    """A transition matrix with ``1 - off_mass`` on the diagonal and ``off_mass`` spread over the
    other classes with weight ``exp(-decay * |i - j|)`` (raters confuse nearby scores most)."""
    idx = np.arange(num_classes)
    w = np.exp(-decay * np.abs(idx[:, None] - idx[None, :]).astype(np.float64))
    np.fill_diagonal(w, 0.0)
    t = off_mass * w / w.sum(axis=1, keepdims=True)
    np.fill_diagonal(t, 1.0 - off_mass)
    return t


def make_synthetic_ds2(n: int = 20000, num_classes: int = 6, off_mass: float = 0.3,
                       dim: int = 32, clusters_per_class: int = 4, noise: float = 0.15,
                       prior: Sequence[float] | None = None, seed: int = 0
                       ) -> dict[str, np.ndarray]:
    """Clusterable embeddings with true scores, and scores observed through a known T.

    Each class owns ``clusters_per_class`` random unit centres in ``dim`` dimensions; a sample is
    its centre plus Gaussian noise of scale ``noise / sqrt(dim)`` per coordinate. The observed score
    of a sample with true score i is drawn from row i of :func:`off_diagonal_transition`.

    :returns: dict with ``embeddings`` [N, dim] float32, ``true`` [N], ``observed`` [N] (int64),
        ``transition`` [K, K] and ``prior`` [K].
    """
    rng = np.random.default_rng(seed)
    p = (np.asarray(prior, dtype=np.float64) if prior is not None
         else np.linspace(1.0, 2.0, num_classes))
    p = p / p.sum()
    t = off_diagonal_transition(num_classes, off_mass)
    true = rng.choice(num_classes, size=n, p=p)
    centres = l2_normalize(rng.standard_normal((num_classes * clusters_per_class, dim)))
    cluster = true * clusters_per_class + rng.integers(0, clusters_per_class, size=n)
    emb = centres[cluster] + rng.standard_normal((n, dim)) * (noise / math.sqrt(dim))
    cum = np.cumsum(t, axis=1)
    u = rng.random(n)
    observed = np.minimum((u[:, None] > cum[true]).sum(axis=1), num_classes - 1)
    return dict(embeddings=emb.astype(np.float32), true=true.astype(np.int64),
                observed=observed.astype(np.int64), transition=t, prior=p)


# --------------------------------------------------------------------------------------------------
# Report


def write_ds2_report(directory: str | os.PathLike, result: DS2Result,
                     extra: dict[str, Any] | None = None) -> dict[str, str]:
    """Write ``transition.json`` (T, p, eta, counts before/after, settings), ``transition.png``
    (T heatmap) and ``score_distribution.png`` (raw vs curated histogram). Returns the paths."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    k = result.transition.shape[0]
    before = np.bincount(result.raw, minlength=k)
    after = np.bincount(result.curated, minlength=k)
    payload = dict(transition=result.transition.tolist(), prior=result.prior.tolist(),
                   noise_rates=result.eta.tolist(), counts_raw=before.tolist(),
                   counts_curated=after.tolist(), n_corrupted=int(result.corrupted.sum()),
                   n_selected=None if result.selected is None else int(len(result.selected)),
                   info={k_: v for k_, v in result.info.items()}, **(extra or {}))
    paths = dict(json=str(out / "transition.json"), heatmap=str(out / "transition.png"),
                 distribution=str(out / "score_distribution.png"))
    Path(paths["json"]).write_text(json.dumps(payload, indent=2, default=float))

    fig, ax = plt.subplots(figsize=(5, 4.2))
    im = ax.imshow(result.transition, vmin=0, vmax=1, cmap="viridis")
    for i in range(k):
        for j in range(k):
            v = result.transition[i, j]
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7,
                    color="black" if v > 0.5 else "white")
    ax.set_xlabel("observed score")
    ax.set_ylabel("true score")
    ax.set_title("DS2 estimated transition matrix T")
    ax.set_xticks(range(k))
    ax.set_yticks(range(k))
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(paths["heatmap"], dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    x = np.arange(k)
    ax.bar(x - 0.2, before, width=0.4, label="raw")
    ax.bar(x + 0.2, after, width=0.4, label="curated")
    ax.set_xlabel("score class")
    ax.set_ylabel("samples")
    ax.set_title("Score distribution before / after curation")
    ax.set_xticks(x)
    ax.legend()
    fig.tight_layout()
    fig.savefig(paths["distribution"], dpi=120)
    plt.close(fig)
    return paths
