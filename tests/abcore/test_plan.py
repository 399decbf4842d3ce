"""Cache plans: schedule, sources, weights at the real times, step-by-step fold, execution, weighting."""

from __future__ import annotations

from math import comb

import abcore
import numpy as np
import pytest
from abcore import _convergence, theory
from hypothesis import assume, given, settings
from hypothesis import strategies as st

SETTINGS = settings(max_examples=60, deadline=None)


def shifted_times(n: int, shift: float = 3.0) -> np.ndarray:
    s = np.linspace(1.0, 1.0 / n, n)
    return shift * s / (1.0 + (shift - 1.0) * s)


configs = st.builds(
    abcore.ABConfig,
    order=st.integers(1, 4),
    interval=st.integers(1, 5),
    warmup=st.integers(0, 6),
    cooldown=st.integers(0, 4),
)


def test_default_is_a_budget_that_scales_with_the_steps() -> None:
    """5 + n // 5 calls (9 of 20, 10 of 28, 15 of 50); without the sampler's steps: warm-up 2, tail 2, even spacing."""
    plan = abcore.make_plan(abcore.ABConfig(), shifted_times(50))
    assert np.flatnonzero(plan.compute).tolist() == [0, 1, 4, 8, 12, 16, 20, 25, 29, 33, 37, 41, 45, 48, 49]
    assert plan.num_computed == 15 == abcore.ABConfig().num_computed(50)
    assert [abcore.ABConfig().num_computed(n) for n in (1, 4, 20, 28, 50, 100)] == [1, 4, 9, 10, 15, 25]


def test_interval_schedule_on_50_steps_computes_the_tail() -> None:
    plan = abcore.make_plan(abcore.ABConfig(interval=5), shifted_times(50))
    assert np.flatnonzero(plan.compute).tolist() == [0, 1, *range(5, 50, 5), 46, 47, 48, 49]
    assert plan.num_computed == 15 == abcore.ABConfig(interval=5).num_computed(50)


def test_paper_default_schedule_on_50_steps() -> None:
    config = abcore.ABConfig(order=2, interval=3, warmup=2, cooldown=0)
    plan = abcore.make_plan(config, shifted_times(50))
    expected = [0, 1, *range(3, 50, 3)]
    assert expected[-1] == 48
    assert np.flatnonzero(plan.compute).tolist() == expected
    assert plan.num_computed == 18 == config.num_computed(50)
    assert plan.num_predicted == 32


@SETTINGS
@given(config=configs, n=st.integers(1, 60))
def test_schedule_invariants(config: abcore.ABConfig, n: int) -> None:
    assume(n >= max(config.warmup, config.cooldown))
    plan = abcore.make_plan(config, shifted_times(n))
    first = max(config.warmup, 1)
    assert plan.compute[:first].all()
    assert plan.compute[max(n - config.cooldown, 0) :].all()
    assert plan.num_computed == config.num_computed(n)
    # After the warm-up, outside the cool-down: the multiples of `interval` compute.
    middle = np.arange(first, max(n - config.cooldown, first))
    scheduled = middle % config.interval == 0
    np.testing.assert_array_equal(plan.compute[middle], scheduled)
    # Same inputs, same plan.
    again = abcore.make_plan(config, shifted_times(n))
    np.testing.assert_array_equal(plan.compute, again.compute)
    np.testing.assert_array_equal(plan.weights, again.weights)
    np.testing.assert_array_equal(plan.sources, again.sources)


@SETTINGS
@given(config=configs, n=st.integers(1, 60), increasing=st.booleans())
def test_predictions_use_the_last_computed_outputs_at_their_real_times(
    config: abcore.ABConfig, n: int, increasing: bool
) -> None:
    assume(n >= max(config.warmup, config.cooldown))
    times = shifted_times(n)
    times = -times if increasing else times
    plan = abcore.make_plan(config, times)
    for i in range(n):
        computed_before = np.flatnonzero(plan.compute[:i])[::-1][: config.order]
        sources = plan.sources[i][plan.sources[i] >= 0]
        np.testing.assert_array_equal(sources, computed_before)
        if plan.compute[i]:
            assert np.all(plan.weights[i] == 0.0)
        else:
            assert plan.compute[sources].all()
            m = sources.size  # fewer than `order` early on: the order is capped at m
            expected = abcore.theory.extrapolation_weights(times[sources], times[i])
            np.testing.assert_allclose(plan.weights[i, :m], expected, rtol=1e-12, atol=1e-12)
            assert np.all(plan.weights[i, m:] == 0.0)


@SETTINGS
@given(config=configs, n=st.integers(1, 40))
def test_make_plan_is_the_fold_of_the_rule(config: abcore.ABConfig, n: int) -> None:
    assume(n >= max(config.warmup, config.cooldown))
    times = shifted_times(n)
    plan = abcore.make_plan(config, times)
    sched = abcore.schedule(config, times)
    state = abcore.begin(sched)
    for i in range(n):
        decision = abcore.decide(sched, state, i)
        assert decision.compute == plan.compute[i]
        assert decision.compute == (config.forced_compute(i, n) or i == 0)  # fixed mode: the schedule decides
        if not decision.compute:
            np.testing.assert_array_equal(decision.weights, plan.weights[i])
        state = abcore.complete(sched, state, i, bool(decision.compute))
    assert not plan.corrections.any()  # no steps given: no correction


@SETTINGS
@given(config=configs, n=st.integers(1, 40))
def test_sample_executes_the_plan(config: abcore.ABConfig, n: int) -> None:
    assume(n >= max(config.warmup, config.cooldown))
    ode, euler = _convergence.nonlinear_ode(), _convergence._euler
    times = _convergence.make_grid("shifted", n)
    calls: list[float] = []

    def model(x: np.ndarray, t: float) -> np.ndarray:
        calls.append(t)
        return ode.f(x, t)

    traj = abcore.sample(model, ode.exact(times[0]), times, euler, config)
    plan = abcore.make_plan(config, times[:-1])
    np.testing.assert_array_equal(traj.computed, plan.compute)
    assert calls == times[:-1][plan.compute].tolist()  # the model never runs at the final time
    assert len(traj.outputs) == n
    # Replay: each predicted output is the plan's combination of the computed outputs.
    x = ode.exact(times[0])
    for i in range(n):
        if plan.compute[i]:
            expected = ode.f(x, times[i])
        else:
            sources = plan.sources[i][plan.sources[i] >= 0]
            expected = sum(w * traj.outputs[s] for w, s in zip(plan.weights[i], sources, strict=False))
        np.testing.assert_allclose(traj.outputs[i], expected, rtol=1e-13, atol=1e-15)
        x = euler(x, expected, times[i], times[i + 1])
    np.testing.assert_allclose(traj.x, x, rtol=1e-13, atol=1e-15)


def test_early_prediction_from_fewer_outputs_caps_the_order() -> None:
    config = abcore.ABConfig(order=3, compute_mask=(True, False, True, False, True, False))
    times = np.array([1.0, 0.8, 0.6, 0.4, 0.2, 0.1])
    plan = abcore.make_plan(config, times)
    np.testing.assert_array_equal(plan.compute, config.compute_mask)
    np.testing.assert_array_equal(plan.weights[1], [1.0, 0.0, 0.0])  # one output: plain reuse
    np.testing.assert_allclose(plan.weights[3, :2], abcore.theory.extrapolation_weights([0.6, 1.0], 0.4))
    np.testing.assert_allclose(plan.weights[5], abcore.theory.extrapolation_weights([0.2, 0.6, 1.0], 0.1))


@pytest.mark.parametrize("k", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("h", [0.05, 0.3])
def test_exp_eps_weighting_on_equal_lambda_grid_is_eq_3_6(k: int, h: float) -> None:
    lambdas = -2.0 + h * np.arange(k + 3)  # lambda increases during sampling
    config = abcore.ABConfig(order=k, interval=k + 2, warmup=k, cooldown=0, weighting="exp-eps")
    plan = abcore.make_plan(config, lambdas)
    assert not plan.compute[k]
    expected = [comb(k, i) * (-1) ** (i + 1) * np.exp(i * h) for i in range(1, k + 1)]
    np.testing.assert_allclose(plan.weights[k], expected, rtol=1e-12)
    w, _ = abcore.theory.history_weights(lambdas[k - 1 :: -1][:k], np.ones(k, bool), lambdas[k], k, "exp-x0")
    np.testing.assert_allclose(w, [b * np.exp(-i * h) for i, b in enumerate(theory.binomial_weights(k), 1)])


@SETTINGS
@given(order=st.integers(2, 5), filled=st.integers(1, 5), data=st.data())
def test_history_weights_embedded_error_pair(order: int, filled: int, data: st.DataObject) -> None:
    m = min(order, filled)
    times = np.cumsum(data.draw(st.lists(st.floats(0.2, 1.0), min_size=order, max_size=order)))
    target = -data.draw(st.floats(0.1, 2.0))  # newest first, so extrapolate below times[0]
    times = times - times[0]
    valid = np.arange(order) < m
    w, e = abcore.theory.history_weights(times, valid, target, order)
    np.testing.assert_allclose(w[:m], abcore.theory.extrapolation_weights(times[:m], target), rtol=1e-9, atol=1e-12)
    assert np.all(w[m:] == 0) and np.all(e[m:] == 0)
    if m < 2:
        assert np.all(e == 0)
        return
    lower = abcore.theory.extrapolation_weights(times[: m - 1], target)
    np.testing.assert_allclose(e[:m], w[:m] - np.append(lower, 0.0), rtol=1e-9, atol=1e-9)
    # e annihilates polynomials of degree < m - 1 (both predictions are exact there).
    for degree in range(m - 1):
        assert abs(e[:m] @ times[:m] ** degree) <= 1e-9 * np.sum(np.abs(e[:m] * times[:m] ** degree)) + 1e-12


def test_adaptive_mode_cannot_be_planned_ahead() -> None:
    with pytest.raises(ValueError, match="tolerance"):
        abcore.make_plan(abcore.ABConfig(tolerance=1e-3), shifted_times(10))


@pytest.mark.parametrize("order", [1, 2, 3, 4])
def test_binomial_predictor_gives_eq_3_6_weights_at_every_predicted_step(order):
    plan = abcore.make_plan(
        abcore.ABConfig(order=order, interval=4, warmup=order, predictor="binomial"), shifted_times(40)
    )
    expected = np.array(theory.binomial_weights(order), dtype=float)
    predicted = ~plan.compute
    assert predicted.sum() > 10
    np.testing.assert_array_equal(plan.weights[predicted], np.broadcast_to(expected, (predicted.sum(), order)))


@pytest.mark.parametrize("order", [2, 3])
def test_index_abscissa_uses_step_indices_and_time_uses_real_times(order):
    times = shifted_times(40)
    config = abcore.ABConfig(order=order, interval=3, warmup=order)
    by_index = abcore.make_plan(abcore.ABConfig(order=order, interval=3, warmup=order, abscissa="index"), times)
    by_time = abcore.make_plan(config, times)
    np.testing.assert_array_equal(by_index.compute, by_time.compute)
    for i in np.flatnonzero(~by_time.compute):
        src = by_time.sources[i][by_time.sources[i] >= 0]
        np.testing.assert_allclose(
            by_index.weights[i], abcore.theory.extrapolation_weights(src.astype(float), float(i))
        )
        np.testing.assert_allclose(by_time.weights[i], abcore.theory.extrapolation_weights(times[src], times[i]))
    # on a non-uniform grid the two differ
    assert not np.allclose(by_index.weights, by_time.weights)


def test_config_refuses_what_it_cannot_do():
    with pytest.raises(ValueError, match="predictor"):
        abcore.ABConfig(order=2, tolerance=0.1, predictor="binomial")
    with pytest.raises(ValueError, match="abscissa"):
        abcore.ABConfig(weighting="exp-eps", abscissa="index")  # accepted before: weights [5.44, -7.39]
    with pytest.raises(ValueError, match="predictor"):
        abcore.ABConfig(predictor="binomial", correct=True)
    with pytest.raises(ValueError, match="tolerance"):
        abcore.ABConfig(max_predicted=3)  # a bound of the adaptive mode, silently ignored before


def test_equal_grids_share_one_read_only_plan_and_the_callers_times_stay_writable() -> None:
    times = np.linspace(1.0, 0.02, 30)
    steps = abcore.LinearSteps.euler(np.append(times, 0.0))
    first = abcore.make_plan(abcore.ABConfig(), times, steps)
    assert abcore.make_plan(abcore.ABConfig(), times.copy(), steps) is first  # a pipeline's every generation
    assert abcore.make_plan(abcore.ABConfig(), times) is not first  # no steps: no correction, another plan
    assert abcore.make_plan(abcore.ABConfig(interval=4), times, steps) is not first
    assert not first.weights.flags.writeable and not first.corrections.flags.writeable
    times[0] = 1.5  # the caller's array is not frozen
