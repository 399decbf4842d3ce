"""The numpy reference executor: wiring, call counts, fallback, and the adaptive mode."""

from __future__ import annotations

import itertools

import abcore
import numpy as np
import pytest
from abcore import _convergence

ODE = _convergence.nonlinear_ode()


def euler(x: np.ndarray, out: np.ndarray, t0: float, t1: float) -> np.ndarray:
    return x + (t1 - t0) * out


class CountingModel:
    def __init__(self) -> None:
        self.calls: list[float] = []

    def __call__(self, x: np.ndarray, t: float) -> np.ndarray:
        self.calls.append(t)
        return ODE.f(x, t)


def run(config: abcore.ABConfig, times: np.ndarray) -> tuple[abcore.Trajectory, CountingModel]:
    model = CountingModel()
    return abcore.sample(model, ODE.exact(times[0]), times, euler, config), model


def test_interval_one_is_the_plain_sampler() -> None:
    times = _convergence.make_grid("shifted", 30)
    traj, model = run(abcore.ABConfig(order=3, interval=1), times)
    x = ODE.exact(times[0])
    for t0, t1 in itertools.pairwise(times):
        x = euler(x, ODE.f(x, t0), t0, t1)
    assert len(model.calls) == 30 and traj.computed.all()
    np.testing.assert_array_equal(traj.x, x)


def test_callback_sees_every_step() -> None:
    seen: list[int] = []
    times = _convergence.make_grid("equal", 12)
    abcore.sample(ODE.f, ODE.exact(1.0), times, euler, abcore.ABConfig(), callback=lambda i, x, out: seen.append(i))
    assert seen == list(range(12))


@pytest.mark.filterwarnings("ignore:overflow encountered")
def test_non_finite_prediction_falls_back_to_the_model() -> None:
    times = np.linspace(1.0, 0.0, 9)
    config = abcore.ABConfig(order=2, interval=3, warmup=2)
    traj = abcore.sample(lambda x, t: np.array([1e308]), np.zeros(1), times, lambda x, out, t0, t1: x, config)
    # Step 2 is planned as 2 * out_1 - out_0, and 2 * 1e308 overflows to inf: the model runs instead.
    assert not abcore.make_plan(config, times[:-1]).compute[2]
    assert traj.computed[2]
    assert all(np.all(np.isfinite(out)) for out in traj.outputs)


def adaptive_run(tolerance: float, max_predicted: int | None = None) -> abcore.Trajectory:
    config = abcore.ABConfig(order=3, interval=8, warmup=3, tolerance=tolerance, max_predicted=max_predicted)
    return run(config, _convergence.make_grid("shifted", 60))[0]


def test_adaptive_loose_tolerance_computes_fewer_steps() -> None:
    loose, tight = adaptive_run(1e-2), adaptive_run(1e-7)
    assert loose.computed.sum() < tight.computed.sum()
    assert tight.computed.sum() == 60  # nothing meets 1e-7 at 60 steps
    assert loose.computed.sum() < 40


def longest_run_of_predictions(computed: np.ndarray) -> int:
    longest = current = 0
    for c in computed:
        current = 0 if c else current + 1
        longest = max(longest, current)
    return longest


@pytest.mark.parametrize("max_predicted", [None, 1, 2, 4])
def test_adaptive_respects_max_predicted(max_predicted: int | None) -> None:
    traj = adaptive_run(1.0, max_predicted)  # a tolerance that accepts every prediction
    limit = 7 if max_predicted is None else max_predicted
    assert longest_run_of_predictions(traj.computed) == limit
    assert traj.computed[:3].all()


@pytest.mark.parametrize("tolerance", [1e-1, 1e-2, 3e-3, 1e-3])
def test_adaptive_decisions_follow_accept_prediction(tolerance: float) -> None:
    config = abcore.ABConfig(order=3, interval=8, warmup=3, tolerance=tolerance)
    times = _convergence.make_grid("shifted", 60)
    traj = run(config, times)[0]
    sched = abcore.schedule(config, times[:-1])
    state, history, x, accepted, rejected = abcore.begin(sched), [], ODE.exact(times[0]), 0, 0
    for i in range(60):
        decision = abcore.decide(sched, state, i)
        compute = bool(decision.compute)
        if not compute:
            pred = sum(w * h for w, h in zip(decision.weights, history, strict=False))
            delta = sum(e * h for e, h in zip(decision.error_weights, history, strict=False))
            error = np.linalg.norm(delta) / np.linalg.norm(pred)
            compute = not abcore.joint(np.sum(delta**2), np.sum(pred**2), tolerance)
            assert compute == (error > tolerance)
            accepted += not compute
            rejected += compute
        assert traj.computed[i] == compute
        out = ODE.f(x, times[i]) if compute else pred
        np.testing.assert_allclose(traj.outputs[i], out, rtol=1e-13, atol=1e-15)
        if compute:
            history = [out, *history][:3]
        state = abcore.complete(sched, state, i, compute)
        x = euler(x, out, times[i], times[i + 1])
    assert accepted > 0  # the test exercises both branches
    if tolerance <= 3e-3:
        assert rejected > 0
