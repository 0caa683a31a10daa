"""Statistics of the downstream evaluation: paired deltas, record bootstrap, MDE, Holm.

Plain functions over arrays (no files, no models). The unit of one fine-tuned run is a vector of
per-record sums: ``nll[r]`` = summed negative log-likelihood of record r's scored tokens and
``tokens[r]`` = how many tokens were scored (the same for every run on one evaluation set, since
the tokenisation does not depend on the weights). A domain's loss is token-weighted,
``sum(nll[g]) / sum(tokens[g])``; the average loss is the unweighted mean over domains.

A comparison of a method with a reference pairs runs by training seed (same seed, same data-order
rule, same initialisation) and has two independent sources of noise:

* training noise: the spread of the per-seed deltas, ``seed_se = sd(delta_s) / sqrt(S)``;
* evaluation-set noise: a paired bootstrap over the evaluation records (resampled within each
  domain, the same draw for method and reference) of the seed-averaged delta, ``record_se``.

``se = sqrt(seed_se^2 + record_se^2)``, the 95% interval is ``t(0.975, S-1) * se`` and the minimum
detectable effect (two-sided alpha, power) is ``(t(1-alpha/2, S-1) + t(power, S-1)) * se``. A
delta below its MDE, or whose interval includes 0, is "not detectable". Per-domain p-values are
Holm-adjusted over the domains of one comparison.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np

NOT_DETECTABLE = "not detectable"
PENDING = "pending"


def group_losses(nll: np.ndarray, tokens: np.ndarray, groups: np.ndarray,
                 n_groups: int) -> np.ndarray:
    """(S, G) token-weighted loss per group of ``nll`` (S, R) with ``tokens`` (R,) and
    ``groups`` (R,) integer labels in [0, n_groups)."""
    nll = np.atleast_2d(np.asarray(nll, dtype=float))
    tokens = np.asarray(tokens, dtype=float)
    groups = np.asarray(groups, dtype=int)
    num = np.zeros((nll.shape[0], n_groups))
    den = np.zeros(n_groups)
    for g in range(n_groups):
        mask = groups == g
        num[:, g] = nll[:, mask].sum(axis=1)
        den[g] = tokens[mask].sum()
    with np.errstate(invalid="ignore", divide="ignore"):
        return num / den


def holm(pvalues: Sequence[float]) -> np.ndarray:
    """Holm-Bonferroni adjusted p-values (monotone, capped at 1); nan stays nan."""
    p = np.asarray(pvalues, dtype=float)
    out = np.full_like(p, np.nan)
    ok = np.flatnonzero(~np.isnan(p))
    if ok.size == 0:
        return out
    order = ok[np.argsort(p[ok], kind="stable")]
    m = order.size
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p[i]))
        out[i] = running
    return out


def _quantile(q: float, df: float) -> float:
    from scipy import stats

    return float(stats.norm.ppf(q) if not np.isfinite(df) else stats.t.ppf(q, df))


def minimum_detectable_effect(se: float, df: float, alpha: float = 0.05,
                              power: float = 0.8) -> float:
    """Smallest true |delta| a two-sided level-``alpha`` test detects with probability ``power``
    given the standard error ``se`` of the estimate (t with ``df`` degrees; inf = normal)."""
    if not (np.isfinite(se) and df > 0):
        return float("nan")
    return (_quantile(1 - alpha / 2, df) + _quantile(power, df)) * float(se)


def two_sided_p(delta: float, se: float, df: float) -> float:
    from scipy import stats

    if not (np.isfinite(se) and se > 0 and df > 0):
        return float("nan") if not (np.isfinite(se) and se == 0 and delta != 0) else 0.0
    z = abs(delta) / se
    return float(2 * (stats.norm.sf(z) if not np.isfinite(df) else stats.t.sf(z, df)))


def record_bootstrap(record_delta: np.ndarray, tokens: np.ndarray, groups: np.ndarray,
                     n_groups: int, n_boot: int = 2000,
                     seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Bootstrap replicates over records, resampled within each group (the same draw applies to
    method and reference: ``record_delta`` is already their per-record difference).

    Returns ((n_boot,) replicates of the mean-over-groups delta, (n_boot, G) per-group deltas).
    """
    rng = np.random.default_rng(seed)
    record_delta = np.asarray(record_delta, dtype=float)
    tokens = np.asarray(tokens, dtype=float)
    groups = np.asarray(groups, dtype=int)
    per_group = np.full((n_boot, n_groups), np.nan)
    for g in range(n_groups):
        idx_g = np.flatnonzero(groups == g)
        if idx_g.size == 0:
            continue
        draw = idx_g[rng.integers(0, idx_g.size, size=(n_boot, idx_g.size))]
        with np.errstate(invalid="ignore", divide="ignore"):
            per_group[:, g] = record_delta[draw].sum(axis=1) / tokens[draw].sum(axis=1)
    return np.nanmean(per_group, axis=1), per_group


@dataclass(frozen=True)
class Effect:
    """One paired comparison (method - reference, nats; negative = the method's loss is lower)."""

    delta: float
    ci95: float  # half-width of the 95% interval
    se: float
    seed_se: float  # training noise (over seeds)
    record_se: float  # evaluation-set noise (record bootstrap)
    df: float
    mde: float  # minimum detectable effect at (alpha, power)
    p: float
    p_holm: float  # Holm-adjusted over the domains (= p for the average)
    n_seeds: int
    verdict: str  # "lower", "higher", "not detectable" or "pending"

    @property
    def excludes_zero(self) -> bool:
        return bool(np.isfinite(self.ci95) and abs(self.delta) > self.ci95)

    def to_dict(self) -> dict:
        return {k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                for k, v in asdict(self).items()}


def verdict(delta: float, ci95: float, mde: float, p_adjusted: float,
            alpha: float = 0.05) -> str:
    """"lower"/"higher" only when the interval excludes 0, the (adjusted) p is below alpha and
    |delta| reaches the minimum detectable effect; otherwise "not detectable"."""
    if not (np.isfinite(ci95) and np.isfinite(mde)):
        return PENDING
    if abs(delta) < mde or abs(delta) <= ci95 or not p_adjusted < alpha:
        return NOT_DETECTABLE
    return "lower" if delta < 0 else "higher"


def paired_comparison(method: np.ndarray, reference: np.ndarray, tokens: np.ndarray,
                      groups: np.ndarray, group_names: Sequence[str], n_boot: int = 2000,
                      seed: int = 0, alpha: float = 0.05,
                      power: float = 0.8) -> dict[str, object]:
    """The average-loss effect and every group's effect of ``method`` vs ``reference``.

    ``method``: (S, R) per-record nll sums, row s = training seed s; ``reference``: (S, R) paired
    row by row, or (1, R) for a reference without seeds (the untuned model). Returns
    ``{"average": Effect, "domains": {name: Effect}}``. With fewer than 2 seeds the training
    noise is unknown and every effect is "pending".
    """
    method = np.atleast_2d(np.asarray(method, dtype=float))
    reference = np.atleast_2d(np.asarray(reference, dtype=float))
    if reference.shape[0] == 1 and method.shape[0] > 1:
        reference = np.repeat(reference, method.shape[0], axis=0)
    if method.shape != reference.shape:
        raise ValueError(f"method {method.shape} and reference {reference.shape} do not pair")
    n_groups = len(group_names)
    n_seeds = method.shape[0]
    seed_deltas = (group_losses(method, tokens, groups, n_groups)
                   - group_losses(reference, tokens, groups, n_groups))  # (S, G)
    avg_deltas = np.nanmean(seed_deltas, axis=1)
    boot_avg, boot_groups = record_bootstrap(method.mean(axis=0) - reference.mean(axis=0),
                                             tokens, groups, n_groups, n_boot, seed)
    df = float(n_seeds - 1)

    def effect(deltas: np.ndarray, boot: np.ndarray) -> tuple:
        mean = float(np.mean(deltas))
        seed_se = float(np.std(deltas, ddof=1) / math.sqrt(n_seeds)) if n_seeds > 1 else math.nan
        record_se = float(np.std(boot, ddof=1)) if boot.size > 1 else math.nan
        se = math.sqrt(seed_se ** 2 + record_se ** 2)
        ci = _quantile(0.975, df) * se if df > 0 and math.isfinite(se) else math.nan
        return mean, ci, se, seed_se, record_se, minimum_detectable_effect(se, df, alpha, power)

    parts = [effect(seed_deltas[:, g], boot_groups[:, g]) for g in range(n_groups)]
    p_groups = [two_sided_p(pt[0], pt[2], df) for pt in parts]
    p_adj = holm(p_groups)
    domains = {}
    for name, pt, p, pa in zip(group_names, parts, p_groups, p_adj):
        domains[name] = _effect(pt, df, p, float(pa), n_seeds,
                                verdict(pt[0], pt[1], pt[5], pa, alpha))
    avg = effect(avg_deltas, boot_avg)
    p_avg = two_sided_p(avg[0], avg[2], df)
    average = _effect(avg, df, p_avg, p_avg, n_seeds, verdict(avg[0], avg[1], avg[5], p_avg, alpha))
    return {"average": average, "domains": domains}


def _effect(parts: tuple, df: float, p: float, p_holm: float, n_seeds: int, label: str) -> Effect:
    delta, ci, se, seed_se, record_se, mde = parts
    return Effect(delta=delta, ci95=ci, se=se, seed_se=seed_se, record_se=record_se, df=df,
                  mde=mde, p=p, p_holm=p_holm, n_seeds=n_seeds, verdict=label)
