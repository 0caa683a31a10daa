"""DS2's earlier variants and synthetic data with known truth (research; never imported by
``daar_ops``).

The product (:mod:`daar_ops.algorithms.ds2`) runs the papers' procedure. Before issue 16 this
package ran other rules, which ``tools/bench_ds2.py`` still measures side by side
(docs/ds2.md, "Proof against known truth"); they are here, built from the product's kernels:

* ``consensus_positions="all"``: HOC's counts over every position / pair of the triple (hubs of
  the kNN graph then weigh more and ``c1`` drifts from the observed distribution);
* ``detection_score="share"``: the own score's share of the votes ``v_y / sum(v)`` instead of
  SimiFeat's cosine;
* ``suggestion="all"``: the most voted *other* score of every round, share = count / drawn,
  instead of the majority of the flagged rounds with add-one smoothing;
* ``self_weight``: the sample's own score added to its votes (the DS2 reference code does, down
  weighted; SimiFeat's vote is over the neighbours);
* ``noise_rate_clip=(0.05, 0.95)``: at least 5% of every class flagged in every round.

:meth:`DS2Variant.former` is the package's behaviour before issue 16; ``DS2Variant()`` gives the
product's result (tested). :func:`make_synthetic_ds2` builds clusterable embeddings whose scores
are observed through a known transition matrix (tests and benchmarks).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Sequence

import numpy as np

from daar_ops.algorithms.ds2 import (MIN_SAMPLES, DS2Config, DS2Result, checked_labels,
                                     consensus_triples, consensus_vectors, curated_result,
                                     detection, detection_draws, fit_transition_matrix,
                                     flag_lowest, neighbourhoods, noise_rates,
                                     observed_frequencies, own_agreement, run_info,
                                     symmetrised_consensus, uncurated)
from daar_ops.algorithms.knn import l2_normalize

CONSENSUS_POSITIONS = ("own", "all")
DETECTION_SCORES = ("cosine", "share")
SUGGESTIONS = ("flagged", "all")


@dataclass(frozen=True)
class DS2Variant:
    """The rules the product fixes; the defaults are the product's."""

    consensus_positions: str = "own"
    detection_score: str = "cosine"
    suggestion: str = "flagged"
    self_weight: float = 0.0
    noise_rate_clip: tuple[float, float] = (0.0, 1.0)

    def __post_init__(self) -> None:
        object.__setattr__(self, "noise_rate_clip", tuple(float(c) for c in self.noise_rate_clip))
        for name, allowed in (("consensus_positions", CONSENSUS_POSITIONS),
                              ("detection_score", DETECTION_SCORES),
                              ("suggestion", SUGGESTIONS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if not (math.isfinite(self.self_weight) and self.self_weight >= 0):
            raise ValueError(f"self_weight must be a finite number >= 0, got {self.self_weight!r}")
        lo, hi = self.noise_rate_clip
        if not 0.0 <= lo <= hi <= 1.0:
            raise ValueError(f"noise_rate_clip must satisfy 0 <= low <= high <= 1, got "
                             f"{self.noise_rate_clip}")

    @classmethod
    def former(cls) -> "DS2Variant":
        """This package's rules before issue 16."""
        return cls(consensus_positions="all", detection_score="share", suggestion="all",
                   noise_rate_clip=(0.05, 0.95))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def consensus_vectors_variant(labels: np.ndarray, neighbors: np.ndarray, num_classes: int,
                              positions: str = "own", rows: np.ndarray | None = None
                              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """HOC's consensus; ``positions="all"`` counts every position of the triple in ``c1``, every
    pair in ``c2`` (then symmetrised as the product's)."""
    if positions not in CONSENSUS_POSITIONS:
        raise ValueError(f"positions must be one of {CONSENSUS_POSITIONS}, got {positions!r}")
    if positions == "own":
        return consensus_vectors(labels, neighbors, num_classes, rows=rows)
    triple = consensus_triples(labels, neighbors, rows)
    k = num_classes
    c1 = np.bincount(triple.ravel(), minlength=k).astype(np.float64)
    c2 = np.zeros((k, k))
    c3 = np.zeros((k, k, k))
    for a, b in ((0, 1), (0, 2), (1, 2)):
        np.add.at(c2, (triple[:, a], triple[:, b]), 1.0)
    np.add.at(c3, (triple[:, 0], triple[:, 1], triple[:, 2]), 1.0)
    return symmetrised_consensus(c1, c2, c3)


def detect_corrupted_variant(labels: np.ndarray, neighbors: np.ndarray, sims: np.ndarray,
                             eta: np.ndarray, num_classes: int, k: int = 10, rounds: int = 10,
                             subset_fraction: float = 0.8, seed: int = 0,
                             informative: np.ndarray | None = None,
                             variant: DS2Variant | None = None):
    """:func:`daar_ops.algorithms.ds2.detect_corrupted` with the variant's detection score,
    self vote and suggestion rule (same draws, same flagging)."""
    variant = variant or DS2Variant()
    y = np.asarray(labels, dtype=np.int64)
    n = y.shape[0]
    rows = np.arange(n)
    drawn = np.zeros(n, dtype=np.int64)
    flagged = np.zeros(n, dtype=np.int64)
    counts = np.zeros((n, num_classes), dtype=np.int64)
    for draw in detection_draws(y, neighbors, sims, num_classes, k, rounds, subset_fraction,
                                seed, informative):
        votes = draw.votes.copy()
        votes[rows, y] += variant.self_weight
        agreement = (own_agreement(votes, y) if variant.detection_score == "cosine"
                     else votes[rows, y] / np.maximum(votes.sum(axis=1), 1e-300))
        flagged_now = flag_lowest(agreement, y, draw, eta)
        flagged += flagged_now
        drawn[draw.kept] += 1
        if variant.suggestion == "flagged":
            counts[rows[flagged_now], np.argmax(votes, axis=1)[flagged_now]] += 1
        else:
            votes[rows, y] = -1.0  # the most voted *other* score, in every round with a vote
            voted = draw.kept & draw.has_vote
            counts[rows[voted], np.argmax(votes, axis=1)[voted]] += 1
    suggested = np.argmax(counts, axis=1)
    if variant.suggestion == "flagged":
        suggested = np.where(flagged > 0, suggested, y)
        share = np.where(flagged > 0, (counts[rows, suggested] + 1.0) / (flagged + num_classes),
                         0.0)
    else:
        share = counts[rows, suggested] / np.maximum(drawn, 1)
    return detection(drawn, flagged, suggested, share)


def curate_scores_variant(embeddings: np.ndarray, labels: np.ndarray,
                          config: DS2Config | None = None, variant: DS2Variant | None = None,
                          device: str = "cpu", progress: bool = False) -> DS2Result:
    """:func:`daar_ops.algorithms.ds2.curate_scores` under a :class:`DS2Variant` (recorded in
    ``info``)."""
    config, variant = config or DS2Config(), variant or DS2Variant()
    y = checked_labels(labels, np.asarray(embeddings).shape[0], config.num_classes)
    hood = neighbourhoods(embeddings, config, device, progress)
    info = dict(run_info(config, len(y), hood), **variant.to_dict())
    informative = np.flatnonzero(~hood.uninformative)
    if informative.size < MIN_SAMPLES:
        return uncurated(y, hood.long_tail, config.num_classes,
                         dict(info, curation_skipped="uninformative neighbourhoods"))
    c1, c2, c3 = consensus_vectors_variant(
        y, hood.neighbors, config.num_classes, variant.consensus_positions,
        rows=None if informative.size == len(y) else informative)
    transition, prior, loss = fit_transition_matrix(c1, c2, c3, steps=config.hoc_steps,
                                                    lr=config.hoc_lr)
    eta = np.clip(noise_rates(transition, prior,
                              observed_frequencies(y, hood, config.num_classes)),
                  *variant.noise_rate_clip)
    det = detect_corrupted_variant(y, hood.neighbors, hood.sims, eta, config.num_classes,
                                   k=hood.k_vote, rounds=config.detection_rounds,
                                   subset_fraction=config.subset_fraction, seed=config.seed,
                                   informative=~hood.uninformative, variant=variant)
    return curated_result(y, hood, det, (transition, prior, loss, c1), eta,
                          config.confidence_threshold, info)


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
