"""DS2: diversity-aware score curation of LLM quality ratings. No Data-Juicer import.

Implemented from the math (DS2, ICLR 2025; HOC, Zhu et al. ICML'21; SimiFeat, Zhu et al. ICML'22),
not from the reference code. Every setting is a field of one frozen :class:`DS2Config`, validated
when it is built. Pipeline, all deterministic for a given ``seed``:

1. :func:`scores_to_classes` - raw ratings -> K ordinal classes (DS2: ``clip(s, 4, 9) - 4``).
2. :func:`neighbourhoods` - one cosine kNN (:func:`daar_ops.algorithms.knn.knn_cosine`: exact
   faiss flat search by default, IVF / HNSW as options) of ``k_pool`` neighbours per row; every
   later step reads prefixes of that list (memory O(N * k_pool), never O(N^2)). With it the
   degenerate-geometry guard (:func:`uninformative_neighbourhoods`): rows whose k-NN are tied or
   exact duplicates are never curated and left out of HOC (logged; if fewer than 3 rows are
   informative nothing is curated).
3. :func:`consensus_vectors` + :func:`fit_transition_matrix` (HOC) - the 1st/2nd/3rd-order
   consensus of a sample (its own position, as HOC) and its 2 nearest neighbours, fitted by
   ``T = row-softmax(A)``, ``p = softmax(b)`` minimising the sum of unsquared Frobenius
   distances (Adam).
4. :func:`detect_corrupted` (SimiFeat-rank) - per-class noise rates from (T, p)
   (:func:`noise_rates`, only impossible values repaired), weighted kNN votes over random
   subsets, SimiFeat's cosine score, flagged fraction, suggestion from the flagged rounds with
   add-one smoothing, and confidence.
5. :func:`long_tail_scores` - ``tanh(mean cosine distance to the k nearest neighbours / 2)``.
6. :func:`lexicographic_select` - curated score desc, then long-tail desc, then index.

:func:`curate_scores` runs 2-5; :func:`ds2_select` adds 6 with the budget of the config (the one
implementation; ``ds2_selector`` calls it). The defaults are the papers' procedure (HOC's
own-position consensus, SimiFeat's cosine rank score, DS2's suggestion from the flagged rounds
and noise rates clipped only to [0, 1]). The earlier variants of this package (all-position
consensus, vote-share score, suggestion from every round, a self vote, clipped noise rates) and
the synthetic data with known truth live in ``tools/daar_research/ds2.py``; the report files
(T heatmap, JSON, score histograms) are written by :mod:`daar_ops.ds2_report`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
from loguru import logger
from tqdm.auto import tqdm

from daar_ops.algorithms.knn import KNN_INDEXES, knn_cosine, l2_normalize
from daar_ops.core import budget, is_number

# a sample and its 2 nearest neighbours: the fewest rows HOC (and so curation) can use
MIN_SAMPLES = 3
# the options of daar_ops.algorithms.knn.knn_cosine a config may set (``knn_params``)
KNN_OPTIONS = ("nlist", "nprobe", "hnsw_m", "ef_search", "ef_construction", "tie_margin")
# similarity tolerance of the degenerate-geometry guard (uninformative_neighbourhoods)
TIE_TOLERANCE = 1e-6


# --------------------------------------------------------------------------------------------------
# The parameter object


@dataclass(frozen=True)
class DS2Config:
    """Every setting of DS2, validated once when the config is built (``ValueError`` naming the
    field). ``ds2_selector`` builds it from its parameters of the same names, which document
    each field; ``daar_ops.defaults.DS2`` is the default config. Without ``select_ratio`` /
    ``select_num`` every sample is kept (:meth:`keep`; the budget rule is
    :func:`daar_ops.core.budget`). ``detection_rounds`` defaults to 20: with the smoothed
    suggestion share ``(count + 1) / (F + K)`` times ``noisy_rate`` a sample must be flagged in
    most of its rounds to reach confidence 0.5 (with 4 rounds nothing can be replaced, with 10 a
    sample must be flagged in ~every round). ``knn_params``: the options of
    :func:`daar_ops.algorithms.knn.knn_cosine` (:data:`KNN_OPTIONS`); ``block_size``: kNN query
    rows per block (memory, not results).
    """

    score_low: float = 0.0
    score_high: float = 5.0
    num_classes: int = 6
    missing_score: float | None = None
    select_ratio: float | None = None
    select_num: int | None = None
    k: int = 10
    k_pool: int | None = None
    hoc_steps: int = 1500
    hoc_lr: float = 0.1
    detection_rounds: int = 20
    subset_fraction: float = 0.8
    confidence_threshold: float = 0.5
    seed: int = 0
    knn_index: str = "exact"
    knn_params: Mapping[str, Any] = field(default_factory=dict)
    block_size: int = 4096

    def __post_init__(self) -> None:
        if self.knn_params is None or isinstance(self.knn_params, Mapping):
            object.__setattr__(self, "knn_params", dict(self.knn_params or {}))
        for name in _INTEGER_FIELDS:  # 10.0 from a recipe is 10
            value = getattr(self, name)
            if isinstance(value, float) and value.is_integer():
                object.__setattr__(self, name, int(value))
        self.validate()

    def validate(self) -> None:
        def bad(name: str, rule: str) -> ValueError:
            return ValueError(f"DS2Config.{name} must be {rule}, got {getattr(self, name)!r}")

        def integer(name: str, low: int) -> None:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < low:
                raise bad(name, f"an integer >= {low}")


        if not (is_number(self.score_low) and is_number(self.score_high)
                and self.score_high > self.score_low):
            raise ValueError(f"DS2Config.score_low / score_high must be finite with score_low < "
                             f"score_high, got {self.score_low!r}, {self.score_high!r}")
        if self.missing_score is not None and not is_number(self.missing_score):
            raise bad("missing_score", "a finite number or None")
        for name, low in (("num_classes", 2), ("k", 2), ("hoc_steps", 1),
                          ("detection_rounds", 1), ("block_size", 1), ("seed", 0)):
            integer(name, low)
        if self.k_pool is not None:
            integer("k_pool", self.k)
        if self.select_ratio is not None or self.select_num is not None:
            try:
                budget(0, ratio=self.select_ratio, num=self.select_num)
            except ValueError as err:
                raise ValueError(f"DS2Config.select_ratio / select_num: {err}") from None
        if not (is_number(self.hoc_lr) and self.hoc_lr > 0):
            raise bad("hoc_lr", "a finite number > 0")
        if not (is_number(self.subset_fraction) and 0.0 < self.subset_fraction <= 1.0):
            raise bad("subset_fraction", "in (0, 1]")
        if not (is_number(self.confidence_threshold) and 0.0 <= self.confidence_threshold <= 1.0):
            raise bad("confidence_threshold", "in [0, 1]")
        if self.knn_index not in KNN_INDEXES:
            raise bad("knn_index", f"one of {KNN_INDEXES}")
        if not isinstance(self.knn_params, dict) or set(self.knn_params) - set(KNN_OPTIONS):
            raise bad("knn_params", f"a mapping with keys among {KNN_OPTIONS}")

    def keep(self, n: int) -> int:
        """How many of ``n`` samples the selection keeps (all of them without a budget)."""
        if self.select_ratio is None and self.select_num is None:
            return n
        return budget(n, ratio=self.select_ratio, num=self.select_num)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


_INTEGER_FIELDS = ("num_classes", "select_num", "k", "k_pool", "hoc_steps", "detection_rounds",
                   "seed", "block_size")


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
# 2. Neighbourhoods


def uninformative_neighbourhoods(sims: np.ndarray, k: int, tol: float = TIE_TOLERANCE
                                 ) -> np.ndarray:
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


@dataclass
class Neighbourhoods:
    """The one kNN of :func:`neighbourhoods` and what is read from it (arrays are [N, ...])."""

    neighbors: np.ndarray  # int64 [N, k_pool], most similar first
    sims: np.ndarray  # float32 [N, k_pool]
    k_vote: int  # neighbours that vote / enter the long-tail score: min(k, k_pool)
    long_tail: np.ndarray  # [N]
    uninformative: np.ndarray  # bool [N], see uninformative_neighbourhoods


def neighbourhoods(embeddings: np.ndarray, config: DS2Config, device: str = "cpu",
                   progress: bool = False) -> Neighbourhoods:
    """The cosine kNN of ``k_pool`` neighbours per row (non-finite embedding values are set to
    0, logged), the long-tail scores and the degenerate-geometry guard."""
    emb = np.asarray(embeddings, dtype=np.float32)
    if not np.isfinite(emb).all():
        bad = int((~np.isfinite(emb).all(axis=1)).sum())
        logger.warning(f"DS2: {bad} embeddings contain NaN/inf; those rows are set to 0")
        emb = np.where(np.isfinite(emb), emb, 0.0).astype(np.float32)
    n = emb.shape[0]
    k_pool = min(config.k_pool or 3 * config.k, n - 1)
    k_vote = min(config.k, k_pool)
    nb, sims = knn_cosine(l2_normalize(emb), k_pool, block_size=config.block_size, device=device,
                          progress=progress, index=config.knn_index, seed=config.seed,
                          **config.knn_params)
    uninformative = uninformative_neighbourhoods(sims, k_vote)
    if uninformative.any():
        logger.warning(f"DS2: {int(uninformative.sum())}/{n} samples have uninformative "
                       f"neighbourhoods (their {k_vote} nearest neighbours are tied or exact "
                       f"duplicates); their scores are not curated")
    return Neighbourhoods(neighbors=nb, sims=sims, k_vote=k_vote,
                          long_tail=long_tail_scores(sims, k=k_vote), uninformative=uninformative)


# --------------------------------------------------------------------------------------------------
# 3. HOC estimation of T and p


def consensus_vectors(labels: np.ndarray, neighbors: np.ndarray, num_classes: int,
                      rows: np.ndarray | None = None
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Empirical 1st/2nd/3rd-order consensus of each row and its two nearest neighbours (HOC).

    Under the HOC assumption (a sample and its 2-NN share the true class) the triple
    ``(y_i, y_n1, y_n2)`` has ``c1 = p T`` (one label), ``c2 = T' diag(p) T`` (two labels) and
    ``c3_jlm = sum_i p_i T_ij T_il T_im`` (three labels). As HOC, ``c1`` counts the sample's own
    label, ``c2`` the pair (own, 1st neighbour), ``c3`` the triple (own, 1st, 2nd) - every row
    counted once, so ``c1`` is exactly the observed score distribution (samples that are
    neighbours of many others, hubs, weigh no more than the rest). ``c2`` / ``c3`` are then
    symmetrised (:func:`symmetrised_consensus`).

    All N triples are used (DS2 averages the frequencies over random subsets, whose expectation
    this is). ``rows`` restricts the counts to those rows (as centre of the triple).

    :param neighbors: [N, >=2] indices of each row's nearest neighbours (most similar first).
    :returns: c1 [K], c2 [K, K], c3 [K, K, K] (float64, each summing to 1).
    """
    triple = consensus_triples(labels, neighbors, rows)
    k = num_classes
    c1 = np.bincount(triple[:, 0], minlength=k).astype(np.float64)
    c2 = np.zeros((k, k))
    c3 = np.zeros((k, k, k))
    np.add.at(c2, (triple[:, 0], triple[:, 1]), 1.0)
    np.add.at(c3, (triple[:, 0], triple[:, 1], triple[:, 2]), 1.0)
    return symmetrised_consensus(c1, c2, c3)


def consensus_triples(labels: np.ndarray, neighbors: np.ndarray, rows: np.ndarray | None = None
                      ) -> np.ndarray:
    """[N, 3] int64 observed classes of (row, 1st neighbour, 2nd neighbour), of ``rows`` only
    if given."""
    y = np.asarray(labels, dtype=np.int64)
    nb = np.asarray(neighbors)[:, :2]
    if nb.shape[1] < 2:
        raise ValueError("HOC needs 2 neighbours per row")
    centre = y
    if rows is not None:
        nb, centre = nb[rows], y[rows]
    return np.stack([centre, y[nb[:, 0]], y[nb[:, 1]]], axis=1)


def symmetrised_consensus(c1: np.ndarray, c2: np.ndarray, c3: np.ndarray
                          ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Counts -> distributions, ``c2`` and ``c3`` symmetrised over their positions (the model is
    symmetric; the fitted loss only sees the symmetric part plus a constant)."""
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


def noise_rates(transition: np.ndarray, prior: np.ndarray, observed_freq: np.ndarray
                ) -> np.ndarray:
    """Per observed class c: ``eta_c = 1 - T_cc p_c / P(observed = c)``, clipped to [0, 1].

    The clip only repairs impossible values (as the DS2 reference does): a negative estimate
    means HOC judged the class clean (nothing is flagged), one above 1 that it is all noise. A
    class never observed gets 0 (nothing to flag).
    """
    obs = np.asarray(observed_freq, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        eta = 1.0 - np.diag(transition) * prior / obs
    eta = np.where(obs > 0, eta, 0.0)
    return np.clip(np.nan_to_num(eta, nan=0.0), 0.0, 1.0)


def estimate_transition(labels: np.ndarray, hood: Neighbourhoods, config: DS2Config
                        ) -> tuple[np.ndarray, np.ndarray, float, np.ndarray]:
    """HOC over the informative rows: (T, p, final loss, c1)."""
    informative = np.flatnonzero(~hood.uninformative)
    rows = None if informative.size == len(labels) else informative
    c1, c2, c3 = consensus_vectors(labels, hood.neighbors, config.num_classes, rows=rows)
    transition, prior, loss = fit_transition_matrix(c1, c2, c3, steps=config.hoc_steps,
                                                    lr=config.hoc_lr)
    return transition, prior, loss, c1


def observed_frequencies(labels: np.ndarray, hood: Neighbourhoods, num_classes: int
                         ) -> np.ndarray:
    """Observed class distribution over the informative rows (the denominator of the noise
    rates)."""
    informative = labels[~hood.uninformative]
    return np.bincount(informative, minlength=num_classes) / informative.size


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


@dataclass
class DetectionRound:
    """One random subset of the detection: who was drawn, the tie-break key and the votes."""

    kept: np.ndarray  # bool [N]: drawn this round
    tie: np.ndarray  # [N] seeded random key breaking ties among equally suspicious rows
    votes: np.ndarray  # [N, K] similarity-weighted votes of the drawn neighbours (soft label)
    has_vote: np.ndarray  # bool [N]: a positive vote exists and the row may be flagged


def detection_draws(labels: np.ndarray, neighbors: np.ndarray, sims: np.ndarray,
                    num_classes: int, k: int, rounds: int, subset_fraction: float, seed: int,
                    informative: np.ndarray | None = None, progress: bool = False
                    ) -> Iterator[DetectionRound]:
    """The ``rounds`` random subsets of SimiFeat-rank and their kNN votes.

    Each row is drawn with probability ``subset_fraction``. A drawn row's voters are its ``k``
    nearest *drawn* rows, read from its precomputed sorted list (``neighbors`` [N, k_pool]):
    exact as long as ``k`` of the ``k_pool`` listed were drawn (with k_pool = 3k and fraction 0.8
    essentially always; otherwise the drawn ones among them vote), with weight ``1 - cosine
    distance`` (the similarity, floored at 0). A row without a positive vote, or where
    ``informative`` is False, cannot be flagged that round (it still counts as drawn).
    """
    y = np.asarray(labels, dtype=np.int64)
    n = y.shape[0]
    nb, w_all = np.asarray(neighbors), np.maximum(np.asarray(sims, dtype=np.float64), 0.0)
    nb_labels = y[nb]
    usable = np.ones(n, dtype=bool) if informative is None else np.asarray(informative, bool)
    rng = np.random.default_rng(seed)
    for _ in tqdm(range(rounds), desc="DS2 detection", disable=not progress):
        kept = rng.random(n) < subset_fraction
        tie = rng.random(n)
        first_k = kept[nb] & (np.cumsum(kept[nb], axis=1) <= k)
        w = np.where(first_k & kept[:, None], w_all, 0.0)
        votes = np.stack([(w * (nb_labels == c)).sum(axis=1) for c in range(num_classes)], axis=1)
        yield DetectionRound(kept=kept, tie=tie, votes=votes,
                             has_vote=(votes.sum(axis=1) > 0) & usable)


def flag_lowest(agreement: np.ndarray, labels: np.ndarray, draw: DetectionRound,
                eta: np.ndarray) -> np.ndarray:
    """Bool [N]: per observed class c, the ``round(eta_c * n_c)`` drawn rows (with a vote) whose
    ``agreement`` with their own score is lowest (ties broken by the round's random key)."""
    suspicion = np.where(draw.has_vote, -np.log(agreement + 1e-12), -np.inf)
    flagged = np.zeros(labels.shape[0], dtype=bool)
    for c in range(eta.shape[0]):
        members = np.flatnonzero(draw.kept & (labels == c) & draw.has_vote)
        n_flag = int(math.floor(eta[c] * members.size + 0.5))
        if n_flag == 0:
            continue
        order = np.lexsort((draw.tie[members], -suspicion[members]))  # most suspicious first
        flagged[members[order[:n_flag]]] = True
    return flagged


def own_agreement(votes: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """SimiFeat's rank score: the cosine ``v_y / ||v||_2`` between the soft label and the one-hot
    observed score."""
    norm = np.sqrt((votes ** 2).sum(axis=1))
    return votes[np.arange(labels.shape[0]), labels] / np.maximum(norm, 1e-300)


def detect_corrupted(labels: np.ndarray, neighbors: np.ndarray, sims: np.ndarray,
                     eta: np.ndarray, num_classes: int, k: int = 10, rounds: int = 10,
                     subset_fraction: float = 0.8, seed: int = 0, progress: bool = False,
                     informative: np.ndarray | None = None) -> Detection:
    """SimiFeat-rank detection over ``rounds`` random subsets (:func:`detection_draws`).

    The detection score of a drawn row with observed score y is SimiFeat's rank score
    ``v_y / ||v||_2`` (:func:`own_agreement`), the cosine between its soft label ``v`` and the
    one-hot observed score: at an equal own share, a row whose other votes agree on one
    alternative is more suspicious than one whose other votes scatter. Per observed class the
    ``round(eta_c * n_c)`` lowest are flagged (:func:`flag_lowest`). In each round where a row
    is flagged its soft label's majority score is recorded; over the F flagged rounds the most
    frequent one is the suggestion, with share ``(count + 1) / (F + K)`` (add-one smoothing over
    the K classes, so a row flagged once cannot be fully confident); a row never flagged keeps
    its score. ``confidence = share * noisy_rate`` with ``noisy_rate = (flagged + 1) /
    (drawn + 2)``.
    """
    y = np.asarray(labels, dtype=np.int64)
    n = y.shape[0]
    drawn = np.zeros(n, dtype=np.int64)
    flagged = np.zeros(n, dtype=np.int64)
    counts = np.zeros((n, num_classes), dtype=np.int64)
    for draw in detection_draws(y, neighbors, sims, num_classes, k, rounds, subset_fraction,
                                seed, informative, progress):
        flagged_now = flag_lowest(own_agreement(draw.votes, y), y, draw, eta)
        flagged += flagged_now
        drawn[draw.kept] += 1
        majority = np.argmax(draw.votes, axis=1)  # lowest class among ties: deterministic
        counts[np.flatnonzero(flagged_now), majority[flagged_now]] += 1
    suggested = np.where(flagged > 0, np.argmax(counts, axis=1), y)
    share = np.where(flagged > 0, (counts[np.arange(n), suggested] + 1.0)
                     / (flagged + num_classes), 0.0)
    return detection(drawn, flagged, suggested, share)


def detection(drawn: np.ndarray, flagged: np.ndarray, suggested: np.ndarray, share: np.ndarray
              ) -> Detection:
    """A :class:`Detection` from the round counts and the suggestions."""
    noisy_rate = (flagged + 1.0) / (drawn + 2.0)
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


def checked_labels(labels: np.ndarray, n_embeddings: int, num_classes: int) -> np.ndarray:
    """The observed classes as int64, refused unless one per embedding, at least
    :data:`MIN_SAMPLES` and all in [0, K-1]."""
    y = np.asarray(labels, dtype=np.int64)
    n = y.shape[0]
    if n_embeddings != n:
        raise ValueError(f"{n_embeddings} embeddings for {n} labels")
    if n < MIN_SAMPLES:
        raise ValueError(f"DS2 curation needs at least {MIN_SAMPLES} samples (a sample and 2 "
                         f"neighbours), got {n}")
    if y.min() < 0 or y.max() >= num_classes:
        raise ValueError(f"labels must be in [0, {num_classes - 1}]")
    return y


def uncurated(labels: np.ndarray, long_tail: np.ndarray, num_classes: int,
              info: dict[str, Any]) -> DS2Result:
    """The result that keeps every score: T the identity, the prior the observed distribution."""
    y = np.asarray(labels, dtype=np.int64)
    n = y.shape[0]
    zeros = np.zeros(n)
    observed = np.bincount(y, minlength=num_classes) / max(n, 1)
    info.update(hoc_loss=float("nan"), n_corrupted=0, c1=observed.tolist())
    return DS2Result(raw=y, curated=y.copy(), corrupted=np.zeros(n, dtype=bool),
                     confidence=zeros, suggested=y.copy(), noisy_rate=zeros.copy(),
                     long_tail=long_tail, transition=np.eye(num_classes), prior=observed,
                     eta=np.zeros(num_classes), info=info)


def curated_result(labels: np.ndarray, hood: Neighbourhoods, det: Detection,
                   estimate: tuple[np.ndarray, np.ndarray, float, np.ndarray], eta: np.ndarray,
                   confidence_threshold: float, info: dict[str, Any]) -> DS2Result:
    """Replace a score by its suggestion where the confidence reaches the threshold and the
    neighbourhood is informative."""
    transition, prior, loss, c1 = estimate
    corrupted = ((det.confidence >= confidence_threshold) & (det.suggested != labels)
                 & ~hood.uninformative)
    curated = np.where(corrupted, det.suggested, labels)
    info.update(hoc_loss=loss, n_corrupted=int(corrupted.sum()), c1=c1.tolist())
    logger.info(f"DS2: {int(corrupted.sum())}/{len(labels)} scores curated (HOC loss "
                f"{loss:.4f})")
    return DS2Result(raw=labels, curated=curated.astype(np.int64), corrupted=corrupted,
                     confidence=det.confidence, suggested=det.suggested,
                     noisy_rate=det.noisy_rate, long_tail=hood.long_tail, transition=transition,
                     prior=prior, eta=eta, info=info)


def run_info(config: DS2Config, n: int, hood: Neighbourhoods | None = None) -> dict[str, Any]:
    """The settings a result records in ``info``."""
    info = dict(n=n, **{k: v for k, v in config.to_dict().items() if k != "block_size"})
    if hood is not None:
        info.update(k_pool=int(hood.neighbors.shape[1]),
                    n_uninformative=int(hood.uninformative.sum()))
    return info


def curate_scores(embeddings: np.ndarray, labels: np.ndarray, config: DS2Config | None = None,
                  device: str = "cpu", progress: bool = False) -> DS2Result:
    """Estimate T and p, detect corrupted scores, curate them, and compute long-tail scores.

    :param embeddings: [N, d] sample embeddings (any scale; cosine geometry is used).
    :param labels: [N] observed classes in 0..K-1 (see :func:`scores_to_classes`), N >= 3.
    :param config: the settings (default ``DS2Config()``); the budget is not read here.
    :param device: the kNN's device (``cuda`` runs the exact torch search).

    Rows whose k-NN are tied or exact duplicates (:func:`uninformative_neighbourhoods`) are never
    curated and are left out of the HOC counts; if fewer than 3 rows are informative nothing is
    curated (T is then reported as the identity and the prior as the observed distribution, with
    ``info["curation_skipped"]``).
    """
    config = config or DS2Config()
    y = checked_labels(labels, np.asarray(embeddings).shape[0], config.num_classes)
    hood = neighbourhoods(embeddings, config, device, progress)
    info = run_info(config, len(y), hood)
    if (~hood.uninformative).sum() < MIN_SAMPLES:
        logger.warning("DS2: the embeddings carry no neighbourhood information (fewer than 3 "
                       "samples with an informative k-NN); no score is curated, T is reported as "
                       "the identity")
        return uncurated(y, hood.long_tail, config.num_classes,
                         dict(info, curation_skipped="uninformative neighbourhoods"))
    estimate = estimate_transition(y, hood, config)
    eta = noise_rates(estimate[0], estimate[1], observed_frequencies(y, hood, config.num_classes))
    det = detect_corrupted(y, hood.neighbors, hood.sims, eta, config.num_classes, k=hood.k_vote,
                           rounds=config.detection_rounds, subset_fraction=config.subset_fraction,
                           seed=config.seed, progress=progress, informative=~hood.uninformative)
    return curated_result(y, hood, det, estimate, eta, config.confidence_threshold, info)


def ds2_select(embeddings: np.ndarray | None, labels: np.ndarray,
               config: DS2Config | None = None, device: str = "cpu", progress: bool = False
               ) -> DS2Result:
    """:func:`curate_scores`, then :func:`lexicographic_select` of the config's budget (every
    sample without one). Fewer than :data:`MIN_SAMPLES` samples are selected on their raw scores
    (logged; ``embeddings`` is then not read and may be None)."""
    config = config or DS2Config()
    y = np.asarray(labels, dtype=np.int64)
    n = y.shape[0]
    if config.select_num is not None and config.select_num > n:
        logger.warning(f"DS2: select_num {config.select_num} > {n} samples; keeping all")
    if n < MIN_SAMPLES:
        logger.warning(f"DS2: {n} samples are too few to curate (need {MIN_SAMPLES}); scores are "
                       "kept as they are")
        result = uncurated(y, np.zeros(n), config.num_classes,
                           dict(run_info(config, n), curation_skipped="too few samples"))
    else:
        result = curate_scores(embeddings, y, config, device, progress)
    keep_n = config.keep(n)
    result.selected = lexicographic_select(result.curated, result.long_tail, keep_n)
    result.info["budget"] = keep_n
    return result
