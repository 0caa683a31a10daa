"""DS2: diversity-aware score curation of LLM quality ratings. No Data-Juicer import.

Implemented from the math (DS2, ICLR 2025; HOC, Zhu et al. ICML'21; SimiFeat, Zhu et al. ICML'22),
not from the reference code. Pipeline, all deterministic for a given ``seed``:

1. :func:`scores_to_classes` - raw ratings -> K ordinal classes (DS2: ``clip(s, 4, 9) - 4``).
2. One cosine kNN (:func:`daar_ops.algorithms.knn.knn_cosine`: exact faiss flat search by default,
   IVF / HNSW as options) of ``k_pool`` neighbours per row; every later step reads prefixes of that list (memory O(N * k_pool), never
   O(N^2)).
   :func:`uninformative_neighbourhoods` - the degenerate-geometry guard: rows whose k-NN are tied
   or exact duplicates are never curated and left out of HOC (logged; if fewer than 3 rows are
   informative nothing is curated).
3. :func:`consensus_vectors` + :func:`fit_transition_matrix` (HOC) - the 1st/2nd/3rd-order
   consensus of a sample (its own position, as HOC) and its 2 nearest neighbours, fitted by
   ``T = row-softmax(A)``, ``p = softmax(b)`` minimising the sum of unsquared Frobenius
   distances (Adam).
4. :func:`detect_corrupted` (SimiFeat-rank) - per-class noise rates from (T, p) (only impossible
   values repaired), weighted kNN votes over random subsets, SimiFeat's cosine score, flagged
   fraction, suggestion from the flagged rounds with add-one smoothing, and confidence.
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


CONSENSUS_POSITIONS = ("own", "all")


def consensus_vectors(labels: np.ndarray, neighbors: np.ndarray, num_classes: int,
                      positions: str = "own", rows: np.ndarray | None = None
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Empirical 1st/2nd/3rd-order consensus of each row and its two nearest neighbours (HOC).

    Under the HOC assumption (a sample and its 2-NN share the true class) the triple
    ``(y_i, y_n1, y_n2)`` has ``c1 = p T`` (one label), ``c2 = T' diag(p) T`` (two labels) and
    ``c3_jlm = sum_i p_i T_ij T_il T_im`` (three labels).

    * ``positions="own"`` (default, HOC): ``c1`` counts the sample's own label, ``c2`` the pair
      (own, 1st neighbour), ``c3`` the triple (own, 1st, 2nd) - every row counted once, so ``c1``
      is exactly the observed score distribution. ``c2`` / ``c3`` are then symmetrised (the model
      is symmetric; the fitted loss only sees the symmetric part plus a constant).
    * ``positions="all"``: every position / pair / ordering of the triple is counted. Samples that
      are neighbours of many others (hubs, common on real kNN graphs) then weigh more, which moves
      ``c1`` away from the observed distribution and biases the prior (measured in
      ``tools/bench_ds2.py``); kept for comparison.

    All N triples are used (DS2 averages the frequencies over random subsets, whose expectation
    this is). ``rows`` restricts the counts to those rows (as centre of the triple).

    :param neighbors: [N, >=2] indices of each row's nearest neighbours (most similar first).
    :returns: c1 [K], c2 [K, K], c3 [K, K, K] (float64, each summing to 1).
    """
    if positions not in CONSENSUS_POSITIONS:
        raise ValueError(f"positions must be one of {CONSENSUS_POSITIONS}, got {positions!r}")
    y = np.asarray(labels, dtype=np.int64)
    nb = np.asarray(neighbors)[:, :2]
    if nb.shape[1] < 2:
        raise ValueError("HOC needs 2 neighbours per row")
    if rows is not None:
        nb = nb[rows]
        centre = y[rows]
    else:
        centre = y
    k = num_classes
    triple = np.stack([centre, y[nb[:, 0]], y[nb[:, 1]]], axis=1)
    c2 = np.zeros((k, k))
    c3 = np.zeros((k, k, k))
    if positions == "own":
        c1 = np.bincount(triple[:, 0], minlength=k).astype(np.float64)
        np.add.at(c2, (triple[:, 0], triple[:, 1]), 1.0)
        np.add.at(c3, (triple[:, 0], triple[:, 1], triple[:, 2]), 1.0)
    else:
        c1 = np.bincount(triple.ravel(), minlength=k).astype(np.float64)
        for a, b in ((0, 1), (0, 2), (1, 2)):
            np.add.at(c2, (triple[:, a], triple[:, b]), 1.0)
        np.add.at(c3, (triple[:, 0], triple[:, 1], triple[:, 2]), 1.0)
    c2 = c2 + c2.T
    c3 = sum(c3.transpose(perm) for perm in ((0, 1, 2), (0, 2, 1), (1, 0, 2), (1, 2, 0),
                                             (2, 0, 1), (2, 1, 0)))
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
    import torch

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
                clip: tuple[float, float] = (0.0, 1.0)) -> np.ndarray:
    """Per observed class c: ``eta_c = 1 - T_cc p_c / P(observed = c)``, clipped to ``clip``.

    The default ``(0, 1)`` only repairs impossible values (as the DS2 reference does): a
    negative estimate means HOC judged the class clean (nothing is flagged), one above 1 that it
    is all noise. A class never observed gets ``clip[0]`` (nothing to flag). The former default
    ``(0.05, 0.95)`` forced at least 5% of every class to be flagged in every round, which made
    well-rated classes lose correct scores (lower precision; see docs/ds2.md).
    """
    lo, hi = float(clip[0]), float(clip[1])
    if not 0.0 <= lo <= hi <= 1.0:
        raise ValueError(f"noise-rate clip must satisfy 0 <= low <= high <= 1, got {clip}")
    obs = np.asarray(observed_freq, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        eta = 1.0 - np.diag(transition) * prior / obs
    eta = np.where(obs > 0, eta, lo)
    return np.clip(np.nan_to_num(eta, nan=lo), lo, hi)


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


DETECTION_SCORES = ("cosine", "share")
SUGGESTIONS = ("flagged", "all")


def detect_corrupted(labels: np.ndarray, neighbors: np.ndarray, sims: np.ndarray,
                     eta: np.ndarray, num_classes: int, k: int = 10, rounds: int = 10,
                     subset_fraction: float = 0.8, seed: int = 0, progress: bool = False,
                     score: str = "cosine", self_weight: float = 0.0,
                     suggestion: str = "flagged", informative: np.ndarray | None = None
                     ) -> Detection:
    """SimiFeat-rank detection over ``rounds`` random subsets.

    In each round every row is drawn with probability ``subset_fraction``. A drawn row's
    neighbours are its ``k`` nearest *drawn* rows; they are read from the row's precomputed,
    sorted neighbour list (``neighbors`` [N, k_pool]), which is exact as long as ``k`` of the
    ``k_pool`` listed neighbours were drawn (with k_pool = 3k and fraction 0.8 essentially always;
    otherwise the drawn ones among them vote). Neighbours vote for their scores with weight
    ``1 - cosine distance`` (= similarity, floored at 0), plus ``self_weight`` for the row's own
    score, giving the soft label ``v``. The detection score of a row with observed score y is

    * ``score="cosine"`` (default, SimiFeat's rank score): ``v_y / ||v||_2``, the cosine between
      the soft label and the one-hot observed score. At equal own share, a row whose other votes
      agree on one alternative scores lower (is more suspicious) than one whose other votes
      scatter;
    * ``score="share"``: ``v_y / sum(v)``, the own score's share of the votes (the former
      behaviour).

    Per observed class c the ``round(eta_c * n_c)`` drawn rows with the lowest score are flagged
    (ties broken by a seeded random key). Suggestions:

    * ``suggestion="flagged"`` (default, DS2 reference): in each round where a row is flagged its
      soft label's majority score is recorded; over the F flagged rounds the most frequent one is
      the suggestion, with share ``(count + 1) / (F + K)`` (add-one smoothing over the K classes,
      so a row flagged once cannot be fully confident). A row never flagged keeps its score;
    * ``suggestion="all"``: every round records the most voted score other than the row's own;
      share = count / drawn (the former behaviour).

    ``confidence = share * noisy_rate`` with ``noisy_rate = (flagged + 1) / (drawn + 2)``.
    A drawn row without any usable vote (no drawn neighbour with positive similarity), and any
    row where ``informative`` is False, is never flagged and gets no suggestion.
    """
    if score not in DETECTION_SCORES:
        raise ValueError(f"score must be one of {DETECTION_SCORES}, got {score!r}")
    if suggestion not in SUGGESTIONS:
        raise ValueError(f"suggestion must be one of {SUGGESTIONS}, got {suggestion!r}")
    if not (math.isfinite(self_weight) and self_weight >= 0):
        raise ValueError(f"self_weight must be a finite number >= 0, got {self_weight!r}")
    y = np.asarray(labels, dtype=np.int64)
    n = y.shape[0]
    nb, w_all = np.asarray(neighbors), np.maximum(np.asarray(sims, dtype=np.float64), 0.0)
    nb_labels = y[nb]
    usable = np.ones(n, dtype=bool) if informative is None else np.asarray(informative, bool)
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
        # A row with no usable vote (no drawn neighbour with positive similarity) is neither
        # flagged nor given a suggestion this round; it still counts as drawn.
        has_vote = (votes.sum(axis=1) > 0) & usable
        if self_weight > 0:
            votes[rows, y] += self_weight
        if score == "cosine":
            norm = np.sqrt((votes ** 2).sum(axis=1))
        else:
            norm = votes.sum(axis=1)
        own = votes[rows, y] / np.maximum(norm, 1e-300)
        suspicion = np.where(has_vote, -np.log(own + 1e-12), -np.inf)
        flagged_now = np.zeros(n, dtype=bool)
        for c in range(num_classes):
            members = np.flatnonzero(kept & (y == c) & has_vote)
            if members.size == 0:
                continue
            n_flag = int(math.floor(eta[c] * members.size + 0.5))
            if n_flag == 0:
                continue
            order = np.lexsort((tie[members], -suspicion[members]))  # most suspicious first
            flagged_now[members[order[:n_flag]]] = True
        flagged += flagged_now
        drawn[kept] += 1
        if suggestion == "flagged":
            majority = np.argmax(votes, axis=1)  # lowest class among ties: deterministic
            sugg_counts[rows[flagged_now], majority[flagged_now]] += 1
        else:
            other = votes.copy()
            other[rows, y] = -1.0
            voted = kept & has_vote
            sugg_counts[rows[voted], np.argmax(other, axis=1)[voted]] += 1
    noisy_rate = (flagged + 1.0) / (drawn + 2.0)
    suggested = np.argmax(sugg_counts, axis=1)
    if suggestion == "flagged":
        suggested = np.where(flagged > 0, suggested, y)
        share = np.where(flagged > 0, (sugg_counts[rows, suggested] + 1.0)
                         / (flagged + num_classes), 0.0)
    else:
        share = sugg_counts[rows, suggested] / np.maximum(drawn, 1)
    return Detection(noisy_rate=noisy_rate, suggested=suggested.astype(np.int64),
                     suggestion_share=share, confidence=share * noisy_rate, drawn=drawn,
                     flagged=flagged)


def uninformative_neighbourhoods(sims: np.ndarray, k: int, tol: float = 1e-6) -> np.ndarray:
    """Rows whose k-NN vote carries no information about *that* row (True = uninformative):

    * ties: the k-th neighbour is as similar as the last listed one (``sims[:, k-1] <=
      sims[:, -1] + tol``), so which k rows vote is decided by the tie-break, not by the
      geometry (e.g. many identical embeddings, or a row equidistant from everything);
    * zero distances: all k voters are exact duplicates of the row (``sims[:, k-1] >= 1 - tol``),
      so the row cannot be told apart from the rows it would be compared with.

    :param sims: [N, k_pool] sorted neighbour similarities (most similar first), k_pool >= k.
    """
    s = np.asarray(sims, dtype=np.float64)
    kk = min(k, s.shape[1])
    kth = s[:, kk - 1]
    tied = kth <= s[:, -1] + tol if s.shape[1] > kk else (s[:, 0] - s[:, -1]) <= tol
    return tied | (kth >= 1.0 - tol)


# --------------------------------------------------------------------------------------------------
# 5. Long-tail score


def long_tail_scores(sims: np.ndarray, k: int = 10) -> np.ndarray:
    """``tanh(mean cosine distance to the k nearest neighbours / 2)`` per row (higher = rarer)."""
    s = np.asarray(sims, dtype=np.float64)[:, :k]
    return np.tanh((1.0 - s).mean(axis=1) / 2.0)


# --------------------------------------------------------------------------------------------------
# 6. Selection


def lexicographic_select(curated: np.ndarray, long_tail: np.ndarray, n_keep: int) -> np.ndarray:
    """Indices of the ``n_keep`` rows with the highest curated score, ties broken by the higher
    long-tail score, then the lower index; returned in selection order."""
    curated, long_tail = np.asarray(curated, np.float64), np.asarray(long_tail, np.float64)
    order = np.lexsort((np.arange(curated.shape[0]), -long_tail, -curated))
    return order[:n_keep]


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
                  detection_rounds: int = 20, subset_fraction: float = 0.8,
                  confidence_threshold: float = 0.5, seed: int = 0, device: str = "cpu",
                  block_size: int = 4096, progress: bool = False,
                  consensus_positions: str = "own", detection_score: str = "cosine",
                  self_weight: float = 0.0, suggestion: str = "flagged",
                  noise_rate_clip: tuple[float, float] = (0.0, 1.0),
                  tie_tolerance: float = 1e-6, knn_index: str = "exact",
                  knn_params: dict[str, Any] | None = None) -> DS2Result:
    """Estimate T and p, detect corrupted scores, curate them, and compute long-tail scores.

    :param embeddings: [N, d] sample embeddings (any scale; cosine geometry is used).
    :param labels: [N] observed classes in 0..num_classes-1 (see :func:`scores_to_classes`).
    :param k: neighbours voting in detection and averaged in the long-tail score (DS2: 10).
    :param k_pool: neighbours computed once per row (default ``3 * k``), read by every round.
    :param confidence_threshold: replace a score by its suggestion when confidence >= this.
    :param detection_rounds: random subsets of the detection (default 20: with the smoothed
        suggestion share ``(count + 1) / (F + K)`` times ``noisy_rate`` a sample must be flagged
        in most of its rounds to reach confidence 0.5, which needs enough rounds; with 4 rounds
        nothing can be replaced, with 10 a sample must be flagged in ~every round).
    :param consensus_positions: HOC counts: ``own`` (the sample's own position, HOC; default) or
        ``all`` (every position of the triple); see :func:`consensus_vectors`.
    :param detection_score: ``cosine`` (SimiFeat, default) or ``share``; see
        :func:`detect_corrupted`, which also explains ``self_weight`` and ``suggestion``.
    :param noise_rate_clip: bounds of the per-class noise rates (default: only impossible values
        are repaired); see :func:`noise_rates`.
    :param tie_tolerance: similarity tolerance of the degenerate-geometry guard: rows whose k-NN
        are tied or exact duplicates (:func:`uninformative_neighbourhoods`) are never curated and
        are left out of the HOC counts; if fewer than 3 rows are informative nothing is curated
        (T is then reported as the identity and the prior as the observed distribution, with
        ``info["curation_skipped"]``).
    :param knn_index: the neighbour search of :func:`daar_ops.algorithms.knn.knn_cosine`:
        ``exact`` (default, faiss flat inner product), ``ivf`` or ``hnsw`` (approximate; for
        millions of rows, see docs/ds2.md); ``knn_params``: its options (``nlist``, ``nprobe``,
        ``hnsw_m``, ``ef_search``, ``ef_construction``, ``tie_margin``).
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
    if consensus_positions not in CONSENSUS_POSITIONS:
        raise ValueError(f"consensus_positions must be one of {CONSENSUS_POSITIONS}, "
                         f"got {consensus_positions!r}")
    if detection_score not in DETECTION_SCORES or suggestion not in SUGGESTIONS:
        raise ValueError(f"detection_score must be one of {DETECTION_SCORES} and suggestion one "
                         f"of {SUGGESTIONS}, got {detection_score!r}, {suggestion!r}")
    emb = np.asarray(embeddings, dtype=np.float32)
    if not np.isfinite(emb).all():
        bad = int((~np.isfinite(emb).all(axis=1)).sum())
        logger.warning(f"DS2: {bad} embeddings contain NaN/inf; those rows are set to 0")
        emb = np.where(np.isfinite(emb), emb, 0.0).astype(np.float32)
    k_pool = min(k_pool or 3 * k, n - 1)
    k_vote = min(k, k_pool)
    nb, sims = knn_cosine(l2_normalize(emb), k_pool, block_size=block_size, device=device,
                          progress=progress, index=knn_index, seed=seed, **(knn_params or {}))
    long_tail = long_tail_scores(sims, k=k_vote)
    uninformative = uninformative_neighbourhoods(sims, k_vote, tol=tie_tolerance)
    informative_rows = np.flatnonzero(~uninformative)
    info = dict(n=n, num_classes=num_classes, k=k, k_pool=k_pool, hoc_steps=hoc_steps,
                detection_rounds=detection_rounds, subset_fraction=subset_fraction,
                confidence_threshold=confidence_threshold, seed=seed,
                consensus_positions=consensus_positions, detection_score=detection_score,
                self_weight=self_weight, suggestion=suggestion,
                noise_rate_clip=list(noise_rate_clip), n_uninformative=int(uninformative.sum()),
                knn_index=knn_index, knn_params=dict(knn_params or {}))
    if uninformative.any():
        logger.warning(f"DS2: {int(uninformative.sum())}/{n} samples have uninformative "
                       f"neighbourhoods (their {k_vote} nearest neighbours are tied or exact "
                       f"duplicates); their scores are not curated")
    if informative_rows.size < 3:
        logger.warning("DS2: the embeddings carry no neighbourhood information (fewer than 3 "
                       "samples with an informative k-NN); no score is curated, T is reported as "
                       "the identity")
        observed = np.bincount(y, minlength=num_classes) / n
        zeros = np.zeros(n)
        info.update(curation_skipped="uninformative neighbourhoods", hoc_loss=float("nan"),
                    n_corrupted=0, c1=observed.tolist())
        return DS2Result(raw=y, curated=y.copy(), corrupted=np.zeros(n, dtype=bool),
                         confidence=zeros, suggested=y.copy(), noisy_rate=zeros.copy(),
                         long_tail=long_tail, transition=np.eye(num_classes), prior=observed,
                         eta=np.zeros(num_classes), info=info)
    rows = None if informative_rows.size == n else informative_rows
    c1, c2, c3 = consensus_vectors(y, nb, num_classes, positions=consensus_positions, rows=rows)
    transition, prior, loss = fit_transition_matrix(c1, c2, c3, steps=hoc_steps, lr=hoc_lr)
    observed = np.bincount(y[informative_rows], minlength=num_classes) / informative_rows.size
    eta = noise_rates(transition, prior, observed, clip=noise_rate_clip)
    det = detect_corrupted(y, nb, sims, eta, num_classes, k=k_vote, rounds=detection_rounds,
                           subset_fraction=subset_fraction, seed=seed, progress=progress,
                           score=detection_score, self_weight=self_weight,
                           suggestion=suggestion, informative=~uninformative)
    corrupted = (det.confidence >= confidence_threshold) & (det.suggested != y) & ~uninformative
    curated = np.where(corrupted, det.suggested, y)
    info.update(hoc_loss=loss, n_corrupted=int(corrupted.sum()), c1=c1.tolist())
    logger.info(f"DS2: {int(corrupted.sum())}/{n} scores curated (HOC loss {loss:.4f})")
    return DS2Result(raw=y, curated=curated.astype(np.int64), corrupted=corrupted,
                     confidence=det.confidence, suggested=det.suggested,
                     noisy_rate=det.noisy_rate, long_tail=long_tail, transition=transition,
                     prior=prior, eta=eta, info=info)


def ds2_select(embeddings: np.ndarray, labels: np.ndarray, select_ratio: float | None = None,
               select_num: int | None = None, **kwargs: Any) -> DS2Result:
    """:func:`curate_scores` then :func:`lexicographic_select` of the budget."""
    result = curate_scores(embeddings, labels, **kwargs)
    keep_n = budget(len(result.raw), ratio=select_ratio, num=select_num)
    result.selected = lexicographic_select(result.curated, result.long_tail, keep_n)
    result.info["budget"] = keep_n
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
