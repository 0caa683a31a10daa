"""daar_ops.algorithms.downstream_stats: paired deltas, record bootstrap, MDE, Holm (arrays)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from daar_ops.algorithms import downstream_stats as ds


def test_holm_matches_the_step_down_rule():
    adj = ds.holm([0.01, 0.04, 0.03, 0.5])
    # sorted 0.01, 0.03, 0.04, 0.5 times 4, 3, 2, 1, made monotone
    assert adj == pytest.approx([0.04, 0.09, 0.09, 0.5])  # 2 * 0.04 < 3 * 0.03: monotone
    assert np.isnan(ds.holm([np.nan, 0.01])[0]) and ds.holm([np.nan, 0.01])[1] == 0.01


def test_mde_is_the_sum_of_the_two_quantiles_times_se():
    assert ds.minimum_detectable_effect(0.01, 4) == pytest.approx(
        (stats.t.ppf(0.975, 4) + stats.t.ppf(0.8, 4)) * 0.01)
    assert ds.minimum_detectable_effect(0.01, math.inf) == pytest.approx(2.8016 * 0.01, rel=1e-3)
    assert math.isnan(ds.minimum_detectable_effect(float("nan"), 4))


def _runs(rng, n_seeds, effect, noise=0.05, per_group=60, groups=4):
    """Per-record nll sums of a reference and a method whose loss differs by ``effect`` in group 0
    and by ``-effect / 3`` in the others (the average moves by 0)."""
    tokens = rng.integers(5, 30, size=per_group * groups).astype(float)
    grp = np.repeat(np.arange(groups), per_group)
    record_level = rng.normal(1.5, 0.4, size=tokens.size)  # records differ a lot in difficulty
    shift = np.where(grp == 0, effect, -effect / (groups - 1))
    ref = np.stack([(record_level + rng.normal(0, noise)) * tokens for _ in range(n_seeds)])
    met = np.stack([(record_level + shift + rng.normal(0, noise)) * tokens
                    for _ in range(n_seeds)])
    return met, ref, tokens, grp


def test_a_planted_domain_effect_is_found_and_the_balanced_average_is_not():
    rng = np.random.default_rng(0)
    met, ref, tokens, grp = _runs(rng, 5, effect=0.3)
    out = ds.paired_comparison(met, ref, tokens, grp, ["a", "b", "c", "d"], n_boot=500)
    a = out["domains"]["a"]
    assert a.delta == pytest.approx(0.3, abs=0.1) and a.verdict == "higher"
    assert a.p_holm >= a.p and a.excludes_zero
    avg = out["average"]
    assert abs(avg.delta) < avg.mde and avg.verdict == ds.NOT_DETECTABLE
    assert avg.se == pytest.approx(math.hypot(avg.seed_se, avg.record_se))


def test_noise_only_is_not_detectable_and_one_seed_is_pending():
    rng = np.random.default_rng(1)
    met, ref, tokens, grp = _runs(rng, 4, effect=0.0)
    out = ds.paired_comparison(met, ref, tokens, grp, list("abcd"), n_boot=300)
    assert out["average"].verdict == ds.NOT_DETECTABLE
    assert all(e.verdict == ds.NOT_DETECTABLE for e in out["domains"].values())
    one = ds.paired_comparison(met[:1], ref[:1], tokens, grp, list("abcd"), n_boot=100)
    assert one["average"].verdict == ds.PENDING and math.isnan(one["average"].mde)


def test_a_reference_without_seeds_pairs_with_every_seed():
    rng = np.random.default_rng(2)
    met, ref, tokens, grp = _runs(rng, 3, effect=0.0)
    lowered = met - 0.5 * tokens  # every record 0.5 nats per token lower
    out = ds.paired_comparison(lowered, ref[:1], tokens, grp, list("abcd"), n_boot=300)
    expected = (ds.group_losses(lowered, tokens, grp, 4).mean(axis=1)
                - ds.group_losses(ref[:1], tokens, grp, 4).mean(axis=1)[0]).mean()
    assert out["average"].delta == pytest.approx(expected)
    assert out["average"].verdict == "lower"
    with pytest.raises(ValueError, match="do not pair"):
        ds.paired_comparison(met[:2], ref, tokens, grp, list("abcd"))


def test_the_record_bootstrap_shrinks_with_more_records():
    rng = np.random.default_rng(3)
    ses = []
    for n in (25, 400):
        delta = rng.normal(0.1, 1.0, size=n) * 10
        tokens = np.full(n, 10.0)
        avg, _ = ds.record_bootstrap(delta, tokens, np.zeros(n, int), 1, n_boot=800, seed=0)
        ses.append(avg.std())
    assert ses[1] < ses[0] / 2.5  # ~ 1 / sqrt(16) = 1/4
