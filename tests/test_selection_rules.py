"""Uncertainty rewards from logits and their temperature (daar_ops.algorithms.selection)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from daar_ops.algorithms.selection import fit_temperature, softmax_uncertainty


def _sampled_labels(logits: np.ndarray, temperature: float, seed: int) -> np.ndarray:
    z = logits / temperature
    p = np.exp(z - z.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    u = np.random.default_rng(seed).random((len(p), 1))
    return (u > np.cumsum(p, axis=1)).sum(axis=1)


@pytest.mark.parametrize("true_t", [0.5, 1.0, 4.0])
def test_fit_temperature_recovers_the_temperature_the_labels_were_drawn_at(true_t):
    logits = np.random.default_rng(0).normal(0, 3, size=(20000, 4))
    labels = _sampled_labels(logits, true_t, seed=1)
    assert fit_temperature(logits, labels) == pytest.approx(true_t, rel=0.08)


def test_fit_temperature_is_deterministic_and_shift_invariant():
    logits = np.random.default_rng(2).normal(0, 2, size=(500, 3))
    labels = _sampled_labels(logits, 2.0, seed=3)
    t = fit_temperature(logits, labels)
    assert fit_temperature(logits, labels) == t
    assert fit_temperature(logits + 7.0, labels) == pytest.approx(t, rel=1e-5)


def test_fit_temperature_stays_inside_its_bounds():
    # labels always the arg max: the NLL keeps falling as T -> 0, so the lower bound is hit
    logits = np.random.default_rng(4).normal(0, 1, size=(200, 4))
    t = fit_temperature(logits, logits.argmax(1), bounds=(0.1, 10.0))
    assert 0.1 <= t < 0.11


@pytest.mark.parametrize("bad", [
    dict(logits=np.zeros((3, 2)), labels=[0, 1]),
    dict(logits=np.zeros((2, 2)), labels=[0, 2]),
    dict(logits=np.zeros((0, 2)), labels=[]),
    dict(logits=np.zeros((2, 2)), labels=[0, 1], bounds=(0.0, 1.0)),
])
def test_fit_temperature_refuses_bad_input(bad):
    with pytest.raises(ValueError):
        fit_temperature(**bad)


def test_softmax_uncertainty_bounds():
    k = 4
    uniform = np.zeros((1, k))
    sure = np.array([[50.0, 0.0, 0.0, 0.0]])
    assert softmax_uncertainty(uniform, "entropy")[0] == pytest.approx(math.log(k))
    assert softmax_uncertainty(uniform, "one_minus_max")[0] == pytest.approx(1 - 1 / k)
    assert softmax_uncertainty(sure, "entropy")[0] == pytest.approx(0.0, abs=1e-12)
    assert softmax_uncertainty(sure, "one_minus_max")[0] == pytest.approx(0.0, abs=1e-12)


def test_a_higher_temperature_makes_every_row_less_sure():
    logits = np.random.default_rng(5).normal(0, 3, size=(100, 4))
    for kind in ("entropy", "one_minus_max"):
        cold = softmax_uncertainty(logits, kind, temperature=0.5)
        base = softmax_uncertainty(logits, kind)
        hot = softmax_uncertainty(logits, kind, temperature=3.0)
        assert (cold <= base + 1e-12).all() and (base <= hot + 1e-12).all()
        assert (hot > cold).any()


def test_two_classes_entropy_and_max_probability_rank_alike():
    logits = np.random.default_rng(6).normal(0, 2, size=(300, 2))
    a = np.argsort(softmax_uncertainty(logits, "entropy"), kind="stable")
    b = np.argsort(softmax_uncertainty(logits, "one_minus_max"), kind="stable")
    assert (a == b).all()


def test_temperature_can_reorder_entropy_with_more_than_two_classes():
    # a row split between two classes vs a row spread thinly over four: T decides which is "less sure"
    rows = np.array([[3.0, 3.0, -6.0, -6.0], [4.0, 1.5, 1.5, 1.5]])
    cold = softmax_uncertainty(rows, "entropy", temperature=0.5)
    hot = softmax_uncertainty(rows, "entropy", temperature=5.0)
    assert (cold[0] > cold[1]) != (hot[0] > hot[1])


def test_softmax_uncertainty_refuses_bad_input():
    with pytest.raises(ValueError):
        softmax_uncertainty(np.zeros((1, 2)), "margin")
    with pytest.raises(ValueError):
        softmax_uncertainty(np.zeros((1, 2)), temperature=0.0)


# -- tools/eval_daar.py's rule study on tiny probes ---------------------------------------------

def test_eval_daar_rules_on_tiny_probes():
    import importlib.util
    from pathlib import Path

    import torch

    from daar_ops.algorithms.probes import DaarProbes, ProbeMLP, entropy_nats

    spec = importlib.util.spec_from_file_location(
        "eval_daar", Path(__file__).resolve().parents[1] / "tools" / "eval_daar.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    torch.manual_seed(0)
    probes = DaarProbes(ProbeMLP(8, 3, [16]), ProbeMLP(8, 1, [16]), ["a", "b", "c"])
    rng = np.random.default_rng(0)
    x, x_val = rng.normal(size=(50, 8)).astype(np.float32), rng.normal(size=(20, 8))
    y_val = rng.integers(0, 3, size=20)
    rewards, fit = tool.rule_rewards(probes, x, x_val.astype(np.float32), y_val, list(tool.RULES))
    div, probs = probes.score(x)
    np.testing.assert_allclose(rewards["div"], div, rtol=1e-6)
    np.testing.assert_allclose(rewards["dom_entropy"], entropy_nats(probs), atol=1e-5)
    np.testing.assert_allclose(rewards["one_minus_max"], 1 - probs.max(1), atol=1e-6)
    assert fit["temperature"] > 0 and fit["val_nll_scaled"] <= fit["val_nll"] + 1e-9
    assert fit["n_val"] == 20
    np.testing.assert_array_equal(tool.top_rows(np.array([1.0, 3.0, 3.0, 2.0]), 2), [1, 2])
    with pytest.raises(ValueError):
        tool.rule_rewards(probes, x, x_val.astype(np.float32), y_val, ["margin"])
