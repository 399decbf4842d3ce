"""Call budgets (`calls`, `speedup`) and the adaptive test on the state (`error="state"`)."""

from __future__ import annotations

import math

import abcore
import numpy as np
import pytest
from abcore._config import budget_mask, budget_split
from abcore._rule import sensitivities


def flow_steps(n: int, shift: float = 3.0) -> abcore.LinearSteps:
    t = np.linspace(1.0, 0.0, n + 1)
    return abcore.LinearSteps.euler(shift * t / (1 + (shift - 1) * t))


def ddim_steps(n: int) -> abcore.LinearSteps:
    abar = np.cumprod(1 - np.linspace(1e-4, 0.02, 1000))[:: -(1000 // n)][:n]
    abar = np.append(abar, 0.9999)
    return abcore.LinearSteps.ddim(np.sqrt(abar), np.sqrt(1 - abar), "epsilon")


@pytest.mark.parametrize("n", [1, 2, 7, 20, 28, 50])
def test_budget_mask_computes_exactly_the_budget_spaced_evenly(n: int) -> None:
    for calls in range(1, n + 1):
        for warmup, cooldown in ((None, None), (1, 0), (2, 1)):
            if warmup is not None and warmup + cooldown > calls:
                with pytest.raises(ValueError, match="warmup"):
                    budget_mask(n, calls, warmup, cooldown)
                continue
            mask = budget_mask(n, calls, warmup, cooldown)
            assert mask.sum() == calls and mask[0]
    # w = 1, c = 3, m = 6 evenly in steps 1..46: the centres nearest the quantiles (q + 1/2) / 6 of 46 steps
    assert budget_mask(6, 3, cooldown=2).tolist() == [True, False, False, False, True, True]  # warm-up yields
    mask = budget_mask(50, 10, 1, 3)
    assert np.flatnonzero(mask).tolist() == [0, 4, 12, 20, 27, 35, 43, 47, 48, 49]


def test_budget_mask_places_the_middle_by_the_sensitivity() -> None:
    """Density |s_j|^p: with s growing 10x over the middle and p = 1, calls crowd where s is large."""
    s = np.linspace(0.1, 1.0, 30)
    mask = budget_mask(30, 8, 1, 1, s)  # late, under 9 calls: p = 1
    middle = np.flatnonzero(mask[1:29]) + 1
    mass = np.cumsum(s[1:29]) - s[1:29] / 2
    np.testing.assert_allclose(mass[middle - 1] / s[1:29].sum(), (np.arange(6) + 0.5) / 6, atol=s.max() / s[1:29].sum())
    assert np.all(np.diff(middle)[1:] <= np.diff(middle)[:-1])  # the gaps shrink towards the end


def test_budget_split_follows_the_sensitivity() -> None:
    late, early = sensitivities(flow_steps(20)), sensitivities(ddim_steps(20))
    assert abs(late[-2]) > abs(late[0]) and abs(early[0]) > abs(early[-2])
    assert budget_split(20, 9, late) == (1, 3, 0.0) and budget_split(20, 5, late) == (1, 0, 1.0)
    assert budget_split(20, 7, early) == (2, 0, 0.0) and budget_split(50, 15, early) == (2, 3, 0.5)
    assert budget_split(20, 9) == (2, 2, 0.0) and budget_split(20, 1, late) == (1, 0, 1.0)


def test_config_budget_and_speedup() -> None:
    assert abcore.ABConfig(calls=10).num_computed(50) == 10
    assert abcore.ABConfig(calls=80).num_computed(50) == 50
    for n, s in ((50, 3), (28, 2.8), (20, 2.2), (20, 5), (3, 4)):
        assert abcore.ABConfig(speedup=s).num_computed(n) == max(1, math.floor(n / s + 1e-9))
    sched = abcore.schedule(abcore.ABConfig(calls=9), steps=flow_steps(20))
    assert sched.forced.sum() == 9 and sched.forced[-3:].all() and not sched.forced[1]
    np.testing.assert_array_equal(sched.forced, budget_mask(20, 9, sensitivity=sensitivities(flow_steps(20))))
    assert sched.max_run == max(len(r) for r in "".join("x" if f else "." for f in sched.forced).split("x"))
    plan = abcore.make_plan(abcore.ABConfig(calls=9, warmup=2, cooldown=2), np.linspace(1, 0.05, 20))
    assert np.flatnonzero(plan.compute).tolist() == np.flatnonzero(budget_mask(20, 9, 2, 2)).tolist()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"calls": 0}, "calls"),
        ({"calls": 2.5}, "calls"),
        ({"speedup": 0.5}, "speedup"),
        ({"speedup": float("inf")}, "speedup"),
        ({"calls": 5, "speedup": 2}, "calls or speedup"),
        ({"calls": 5, "interval": 3}, "interval"),
        ({"speedup": 2, "tolerance": 0.1}, "tolerance"),
        ({"calls": 5, "compute_mask": (True, False)}, "compute_mask"),
        ({"error": "state"}, "tolerance"),
        ({"tolerance": 0.1, "error": "solution"}, "error"),
    ],
)
def test_budget_and_error_validate(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        abcore.ABConfig(**kwargs)


def test_fit_shrinks_a_budgets_warmup_and_tail_into_its_calls() -> None:
    with pytest.raises(ValueError, match="more than the budget"):
        abcore.schedule(abcore.ABConfig(calls=3, cooldown=4), num_steps=10)
    fitted = abcore.schedule(abcore.ABConfig(calls=3, cooldown=4), num_steps=10, fit=True)
    assert fitted.config.cooldown == 2 and np.flatnonzero(fitted.forced).tolist() == [0, 8, 9]
    fitted = abcore.schedule(abcore.ABConfig(calls=3, warmup=5, cooldown=4), num_steps=10, fit=True)
    assert (fitted.config.warmup, fitted.config.cooldown) == (3, 0) and fitted.forced.sum() == 3


def test_budget_needs_the_number_of_steps() -> None:
    with pytest.raises(ValueError, match="number of steps"):
        abcore.schedule(abcore.ABConfig(calls=5))
    with pytest.raises(ValueError, match="schedule"):
        abcore.begin(abcore.ABConfig(calls=5))


@pytest.mark.parametrize("steps", [flow_steps(12), ddim_steps(12)])
def test_sensitivity_is_the_final_states_derivative(steps: abcore.LinearSteps) -> None:
    """s_j = b_j prod_{l>j} a_l: perturbing out_j by d moves the final state by s_j d (the sampler is affine)."""
    rng = np.random.default_rng(0)
    outs, x0 = rng.normal(size=steps.num_steps), 0.3

    def final(outputs: np.ndarray) -> float:
        x = x0
        for j, out in enumerate(outputs):
            x = steps.apply(j, x, out)
        return x

    for j in range(steps.num_steps):
        bumped = outs.copy()
        bumped[j] += 1.0
        assert final(bumped) - final(outs) == pytest.approx(sensitivities(steps)[j], rel=1e-9, abs=1e-12)


def test_state_error_scales_the_estimate_by_the_sensitivity() -> None:
    steps = ddim_steps(16)
    times = np.linspace(-3, 3, 16)
    state_rule = abcore.schedule(abcore.ABConfig(tolerance=0.01), times, steps)
    output_rule = abcore.schedule(abcore.ABConfig(tolerance=0.01, error="output"), times, steps)
    assert state_rule.error == "state" and output_rule.error == "output"
    assert abcore.schedule(abcore.ABConfig(tolerance=0.01), times).error == "output"
    with pytest.raises(ValueError, match="LinearSteps"):
        abcore.schedule(abcore.ABConfig(tolerance=0.01, error="state"), times)
    s = sensitivities(steps)
    a, b = abcore.begin(state_rule), abcore.begin(output_rule)
    for i in range(6):
        da, db = abcore.decide(state_rule, a, i), abcore.decide(output_rule, b, i)
        np.testing.assert_allclose(da.error_weights, abs(s[i]) * db.error_weights, rtol=1e-12)
        np.testing.assert_array_equal(da.weights, db.weights)
        a, b = abcore.complete(state_rule, a, i, i < 3), abcore.complete(output_rule, b, i, i < 3)


def test_state_error_predicts_where_the_result_is_insensitive() -> None:
    """On DDIM the late steps barely move the result: the state test predicts there, the output test does not."""
    steps = ddim_steps(30)
    grid = np.linspace(-4.0, 5.0, 31)

    def model(x: np.ndarray, t: float) -> np.ndarray:
        return np.sin(3.0 * t) + 0.1 * x  # an output that keeps changing: its relative error stays large

    runs = {}
    for error in ("state", "output"):
        config = abcore.ABConfig(tolerance=0.02, error=error, cooldown=0, correct=False)
        runs[error] = abcore.sample(model, np.ones(4), grid, None, config, steps=steps).computed
    late = slice(20, 30)
    assert runs["state"][late].sum() < runs["output"][late].sum()
