"""Positive controls: selections built from the ground-truth domain (evaluation only; no
selection method ever reads it), fixed for every training seed, that show what the instrument can
and cannot see before any method is judged (docs/evaluation.md)."""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import numpy as np

from daar_ops.evaluation.runs import BASE
from daar_ops.evaluation.split import text_hash

CONTROL_RANDOM = "ctl_random"  # a fixed random budget: the controls' reference
CONTROL_DOUBLE = "ctl_random_2x"  # twice the budget, a superset of ctl_random
CONTROL_SINGLE = "ctl_mathematics"  # the budget from one domain only
CONTROL_SKEW = "ctl_skew"  # 70% of one domain, 10% of each other
CONTROL_NAMES = (CONTROL_RANDOM, CONTROL_DOUBLE, CONTROL_SINGLE, CONTROL_SKEW)
SINGLE_DOMAIN = "mathematics"
SKEW_DOMAIN = "common_sense"  # the mix DaaR and DS2 produced on this pool
SKEW_SHARE = 0.7
# id -> (selection, reference, what must hold); "base" is the untuned model.
CONTROLS = {
    "P0": (CONTROL_RANDOM, BASE, "movement: the average loss falls (random vs untuned)"),
    "P1": (CONTROL_DOUBLE, CONTROL_RANDOM, "quantity: twice the budget lowers the average loss"),
    "P2": (CONTROL_SINGLE, CONTROL_RANDOM,
           f"composition: {SINGLE_DOMAIN} only lowers {SINGLE_DOMAIN}'s loss (Holm-adjusted) and "
           f"raises each other domain's"),
    "P3": (CONTROL_SKEW, CONTROL_RANDOM,
           f"skew: {SKEW_SHARE:.0%} {SKEW_DOMAIN} / 10 / 10 / 10 raises the average loss with a "
           f"95% interval excluding 0"),
}


def control_selections(slice_records: Sequence[Mapping[str, Any]], truth: Mapping[str, str],
                       k: int, seed: int = 0) -> dict[str, list[dict[str, Any]]]:
    """The positive controls' selections of ``k`` records (``2k`` for the double budget), FIXED
    for every training seed (one permutation of the slice drawn with ``seed``), so that their
    comparisons carry training noise only, not selection noise.

    ``truth``: text hash -> ground-truth domain. ctl_random = the permutation's first k;
    ctl_random_2x its first 2k (a superset); ctl_mathematics the first k of one domain; ctl_skew
    70% of one domain and the rest split evenly over the others (largest remainder).
    """
    order = np.random.default_rng(seed).permutation(len(slice_records))
    recs = [dict(slice_records[i]) for i in order]
    domain_of = [truth.get(text_hash(r)) for r in recs]
    domains = sorted({d for d in domain_of if d is not None})
    if 2 * k > len(recs):
        raise ValueError(f"the double-budget control needs {2 * k} records; the slice has "
                         f"{len(recs)}")
    if SINGLE_DOMAIN not in domains or SKEW_DOMAIN not in domains:
        raise ValueError(f"the controls need {SINGLE_DOMAIN} and {SKEW_DOMAIN} records in the "
                         f"slice (ground truth found: {domains})")
    by_domain = {d: [r for r, dd in zip(recs, domain_of) if dd == d] for d in domains}
    others = [d for d in domains if d != SKEW_DOMAIN]
    shares = {SKEW_DOMAIN: SKEW_SHARE, **{d: (1 - SKEW_SHARE) / len(others) for d in others}}
    quota = {d: int(math.floor(shares[d] * k + 1e-9)) for d in domains}
    leftover = k - sum(quota.values())
    for d in sorted(domains, key=lambda d: -(shares[d] * k - quota[d]))[:leftover]:
        quota[d] += 1
    for d, q in list(quota.items()) + [(SINGLE_DOMAIN, k)]:
        if len(by_domain[d]) < q:
            raise ValueError(f"the controls need {q} {d} records; the slice has "
                             f"{len(by_domain[d])}")
    skew = [r for d in domains for r in by_domain[d][:quota[d]]]
    return {CONTROL_RANDOM: recs[:k], CONTROL_DOUBLE: recs[:2 * k],
            CONTROL_SINGLE: by_domain[SINGLE_DOMAIN][:k], CONTROL_SKEW: skew}
