"""Global score-based selection: top ratio / top k, and per-group quotas. No Data-Juicer import.

Conventions shared by every function here:

* Higher score = better. Ties are broken by the lower index (earlier sample first), so the result
  is deterministic and independent of platform sort stability.
* Non-finite scores (NaN, +-inf) rank below every finite score (NaN and -inf last of all, +inf
  treated like NaN: it cannot come from a valid prediction).
* Counts follow the package's one budget rule, :func:`daar_ops.core.budget`: ``select_ratio``
  keeps ``floor(select_ratio * n)`` samples (as Data-Juicer's ``topk_specified_field_selector``
  does); ``select_num`` larger than ``n`` keeps all ``n``.
* Results are boolean masks over the input order; selection never reorders data.

:class:`SelectionRule` is DaaR's choice over the whole dataset (``diversity_reward_selector``):
a global budget, per-group quotas and score thresholds, checked once when built.

Uncertainty scores from a classifier's logits (:func:`softmax_uncertainty`, with the temperature
of :func:`fit_temperature`) are alternative rewards to DaaR's psi_div for studying the selection
rule (``tools/eval_daar.py --rules``); the pipeline's default stays psi_div.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Hashable, Mapping, Sequence

import numpy as np

from daar_ops.core import budget, is_number, rank_order

__all__ = ["budget", "rank_order", "top_mask", "quota_mask", "range_mask", "SelectionRule",
           "fit_temperature", "softmax_uncertainty", "UNCERTAINTY_KINDS"]

UNCERTAINTY_KINDS = ("entropy", "one_minus_max")


def top_mask(scores: Sequence[float] | np.ndarray, select_ratio: float | None = None,
             select_num: int | None = None) -> np.ndarray:
    """Boolean mask of the best ``select_num`` samples, or the best ``floor(select_ratio * n)``.

    Exactly one of ``select_ratio`` / ``select_num`` must be given.
    """
    s = np.asarray(scores, dtype=np.float64)
    if (select_ratio is None) == (select_num is None):
        raise ValueError("give exactly one of select_ratio and select_num")
    k = budget(len(s), ratio=select_ratio, num=select_num)
    mask = np.zeros(len(s), dtype=bool)
    mask[rank_order(s)[:k]] = True
    return mask


def quota_mask(scores: Sequence[float] | np.ndarray, groups: Sequence[Hashable],
               ratios: Mapping[Hashable, float], default_ratio: float | None = None
               ) -> np.ndarray:
    """Per-group top fraction: within each group g keep its best ``floor(ratios[g] * n_g)``.

    DaaR's "customized" selection, e.g. ``{"coding": 0.5}`` with ``default_ratio=0.1`` keeps the
    best half of the samples predicted as coding and the best 10% of every other group.
    Groups missing from ``ratios`` use ``default_ratio``; if that is None they must all be listed.
    """
    s = np.asarray(scores, dtype=np.float64)
    g = np.asarray(list(groups), dtype=object)
    if len(g) != len(s):
        raise ValueError(f"{len(s)} scores but {len(g)} group labels")
    for name, r in ratios.items():
        if not 0.0 <= float(r) <= 1.0:
            raise ValueError(f"ratio of group {name!r} must be in [0, 1], got {r}")
    mask = np.zeros(len(s), dtype=bool)
    present = list(dict.fromkeys(g.tolist()))
    unlisted = [x for x in present if x not in ratios]
    if unlisted and default_ratio is None:
        raise ValueError(f"no ratio for groups {unlisted}; list them or give a default ratio")
    for name in present:
        members = np.flatnonzero(g == name)
        ratio = float(ratios.get(name, default_ratio))
        keep = top_mask(s[members], select_ratio=ratio)
        mask[members[keep]] = True
    return mask


def range_mask(scores: Sequence[float] | np.ndarray, min_score: float | None = None,
               max_score: float | None = None) -> np.ndarray:
    """Closed-interval threshold mask; non-finite scores never pass a threshold."""
    s = np.asarray(scores, dtype=np.float64)
    mask = np.ones(len(s), dtype=bool)
    if min_score is not None:
        mask &= s >= min_score
    if max_score is not None:
        mask &= s <= max_score
    if min_score is not None or max_score is not None:
        mask &= np.isfinite(s)
    return mask


@dataclass(frozen=True)
class SelectionRule:
    """DaaR's choice over scored samples, checked once when built (a ValueError names the field).

    :param select_ratio: keep the best ``floor(select_ratio * N)`` samples (:func:`budget`), in
        [0, 1]; with ``domain_ratios``, the ratio of the groups not listed there.
    :param select_num: keep the best ``select_num`` samples (all if N is smaller), an integer
        >= 0; not together with ``select_ratio`` or ``domain_ratios``.
    :param domain_ratios: ``{group: fraction in [0, 1]}``: quota mode, the best fraction of each
        group's samples (DaaR's customized quotas; :func:`quota_mask`).
    :param per_domain: quota mode with ``select_ratio`` for every group not in
        ``domain_ratios`` (all of them when it is None): the best ``select_ratio`` inside each
        group, whatever the groups are called (DaaR's quota selection with equal ratios).
    :param min_score, max_score: closed-interval thresholds (finite; min <= max) every kept
        sample also meets; a non-finite score never passes one.
    """

    select_ratio: float | None = None
    select_num: int | None = None
    domain_ratios: Mapping[str, float] | None = None
    min_score: float | None = None
    max_score: float | None = None
    per_domain: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.per_domain, bool):
            raise ValueError(f"per_domain must be true or false, got {self.per_domain!r}")
        if self.per_domain and self.select_ratio is None:
            raise ValueError("per_domain needs select_ratio: the ratio kept inside each domain")
        if self.select_ratio is not None and not (is_number(self.select_ratio)
                                                  and 0.0 <= self.select_ratio <= 1.0):
            raise ValueError(f"select_ratio must be in [0, 1], got {self.select_ratio!r}")
        if self.select_num is not None and not (is_number(self.select_num)
                                                and self.select_num >= 0
                                                and int(self.select_num) == self.select_num):
            raise ValueError(f"select_num must be an integer >= 0, got {self.select_num!r}")
        if self.select_num is not None and (self.select_ratio is not None or self.domain_ratios):
            raise ValueError("select_num cannot be combined with select_ratio or domain_ratios; "
                             "pick one global rule")
        bad = {k: v for k, v in (self.domain_ratios or {}).items()
               if not (is_number(v) and 0.0 <= v <= 1.0)}
        if bad:
            raise ValueError(f"domain_ratios values must be in [0, 1], got {bad}")
        for name in ("min_score", "max_score"):
            value = getattr(self, name)
            if value is not None and not is_number(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
        if None not in (self.min_score, self.max_score) and self.min_score > self.max_score:
            raise ValueError(f"min_score {self.min_score} > max_score {self.max_score}")
        object.__setattr__(self, "domain_ratios",
                           {str(k): float(v) for k, v in self.domain_ratios.items()}
                           if self.domain_ratios else None)

    @property
    def mode(self) -> str | None:
        """``quota``, ``ratio``, ``num``, or None (thresholds only, no global choice)."""
        return ("quota" if self.domain_ratios or self.per_domain
                else "ratio" if self.select_ratio is not None
                else "num" if self.select_num is not None else None)

    def unknown_groups(self, groups: Sequence[str]) -> list[str]:
        """The groups ``domain_ratios`` names that are not among ``groups``."""
        return sorted(set(self.domain_ratios or ()) - set(groups))

    def uncovered_groups(self, groups: Sequence[str]) -> list[str]:
        """In quota mode, the ``groups`` with no ratio that no ``select_ratio`` covers."""
        if not self.domain_ratios or self.select_ratio is not None:
            return []
        return [g for g in groups if g not in self.domain_ratios]

    def mask(self, scores: Sequence[float] | np.ndarray, groups: Sequence[Hashable]
             ) -> np.ndarray:
        """The rule as a boolean mask over the input order (``groups``: one per score, read in
        quota mode only)."""
        keep = range_mask(scores, self.min_score, self.max_score)
        if self.mode == "quota":
            default = self.select_ratio if self.select_ratio is not None else 0.0
            keep &= quota_mask(scores, groups, self.domain_ratios or {}, default_ratio=default)
        elif self.mode is not None:
            keep &= top_mask(scores, select_ratio=self.select_ratio, select_num=self.select_num)
        return keep


def _scaled_log_softmax(logits: np.ndarray, temperature: float) -> np.ndarray:
    z = np.asarray(logits, dtype=np.float64) / float(temperature)
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def fit_temperature(logits: np.ndarray, labels: Sequence[int] | np.ndarray,
                    bounds: tuple[float, float] = (0.05, 20.0)) -> float:
    """Temperature scaling (Guo et al. 2017): the T in ``bounds`` that minimises the mean negative
    log-likelihood of ``softmax(logits / T)`` for ``labels``.

    Fit it on held-out rows (a classifier is over-confident on its own training rows, which would
    push T below 1). The NLL is convex in 1/T, so a bounded scalar search on log T finds the
    optimum; the result is deterministic.
    """
    from scipy.optimize import minimize_scalar

    z = np.asarray(logits, dtype=np.float64)
    y = np.asarray(labels, dtype=np.int64)
    if z.ndim != 2 or len(z) != len(y) or len(z) == 0:
        raise ValueError(f"need [N, K] logits with one label per row, got {z.shape} and {y.shape}")
    if y.min() < 0 or y.max() >= z.shape[1]:
        raise ValueError(f"labels must lie in [0, {z.shape[1]}), got [{y.min()}, {y.max()}]")
    lo, hi = bounds
    if not 0 < lo < hi:
        raise ValueError(f"bounds must satisfy 0 < low < high, got {bounds}")

    def nll(log_t: float) -> float:
        return float(-_scaled_log_softmax(z, np.exp(log_t))[np.arange(len(y)), y].mean())

    res = minimize_scalar(nll, bounds=(np.log(lo), np.log(hi)), method="bounded",
                          options={"xatol": 1e-6})
    return float(np.exp(res.x))


def softmax_uncertainty(logits: np.ndarray, kind: str = "entropy", temperature: float = 1.0
                        ) -> np.ndarray:
    """[N] uncertainty of ``softmax(logits / temperature)`` per row, higher = less sure.

    ``entropy``: Shannon entropy in nats (at most ln K; DaaR's reward target).
    ``one_minus_max``: 1 - the largest probability (at most 1 - 1/K).
    """
    if kind not in UNCERTAINTY_KINDS:
        raise ValueError(f"kind must be one of {UNCERTAINTY_KINDS}, got {kind!r}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    log_p = _scaled_log_softmax(logits, temperature)
    p = np.exp(log_p)
    if kind == "entropy":
        return -(p * log_p).sum(axis=1)
    return 1.0 - p.max(axis=1)
