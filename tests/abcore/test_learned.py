"""Learned prediction weights (`abcore.fit_weights`, the opt-in of issue 20): exact on polynomials, the
correction on top matches the rule's, and they beat Lagrange where the outputs are not polynomial."""

from __future__ import annotations

import abcore
import numpy as np
import pytest

N = 14
GRID = np.linspace(1.0, 0.0, N + 1) ** 1.5
STEPS = abcore.LinearSteps.euler(GRID)
CONFIG = abcore.ABConfig(calls=6, order=2)


def polynomial_runs(count: int, seed: int) -> np.ndarray:
    """(count, N, 3) outputs c0 + c1 t at the step times, random c per run: degree 1, order-2 extrapolation is exact."""
    c0, c1 = np.random.default_rng(seed).normal(size=(2, count, 1, 3))
    return c0 + c1 * GRID[:-1, None]


def exponential_runs(count: int, seed: int) -> np.ndarray:
    """(count, N, 3) outputs v e^{4t}, random v per run: f_j / f_m is the same in every run, Lagrange is not exact."""
    v = np.random.default_rng(seed).normal(size=(count, 1, 3))
    return v * np.exp(4.0 * GRID[:-1, None])


def exponential(x: np.ndarray, t: float) -> np.ndarray:
    return np.array([1.0, -0.5, 2.0]) * np.exp(4.0 * t) + 0.0 * x


def test_fit_on_polynomial_outputs_gives_the_lagrange_weights() -> None:
    sched = abcore.schedule(CONFIG, GRID[:-1], STEPS)
    weights = abcore.fit_weights(sched, polynomial_runs(3, 0))
    state = abcore.begin(sched)
    for i in range(N):
        decision = abcore.decide(sched, state, i)
        if not sched.forced[i]:
            np.testing.assert_allclose(weights[i], decision.weights, rtol=1e-9, atol=1e-9)
        else:
            assert not weights[i].any()
        state = abcore.complete(sched, state, i, sched.forced[i])


def test_lagrange_weights_as_learned_weights_run_exactly_like_the_rule() -> None:
    """The precomputed correction with the fitted weights equals the rule's own correction."""
    sched = abcore.schedule(CONFIG, GRID[:-1], STEPS)
    assert sched.correct
    weights = abcore.fit_weights(sched, polynomial_runs(3, 0))
    x0 = np.array([0.5, -1.0, 2.0])
    plain = abcore.sample(exponential, x0, GRID, None, CONFIG, steps=STEPS)
    learned = abcore.sample(exponential, x0, GRID, None, CONFIG, steps=STEPS, weights=weights)
    np.testing.assert_array_equal(plain.computed, learned.computed)
    np.testing.assert_allclose(np.stack(learned.outputs), np.stack(plain.outputs), rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(learned.x, plain.x, rtol=1e-10, atol=1e-10)


def test_learned_weights_beat_lagrange_on_held_out_runs() -> None:
    config = abcore.ABConfig(calls=6, order=2, correct=False)
    sched = abcore.schedule(config, GRID[:-1], STEPS)
    weights = abcore.fit_weights(sched, exponential_runs(4, 1))
    x0 = np.zeros(3)
    full = abcore.sample(exponential, x0, GRID, None, abcore.ABConfig(interval=1, cooldown=0), steps=STEPS).x
    plain = abcore.sample(exponential, x0, GRID, None, config, steps=STEPS).x
    learned = abcore.sample(exponential, x0, GRID, None, config, steps=STEPS, weights=weights).x
    assert np.abs(learned - full).max() < 1e-9 * np.abs(plain - full).max()


def test_learned_weights_validate() -> None:
    sched = abcore.schedule(CONFIG, GRID[:-1], STEPS)
    with pytest.raises(ValueError, match="shape"):
        abcore.schedule(CONFIG, GRID[:-1], STEPS, weights=np.zeros((N, 3)))
    with pytest.raises(ValueError, match="fixed schedule"):
        abcore.schedule(abcore.ABConfig(tolerance=0.01), GRID[:-1], STEPS, weights=np.zeros((N, 2)))
    with pytest.raises(ValueError, match="fixed schedule"):
        abcore.fit_weights(abcore.schedule(abcore.ABConfig(tolerance=0.01), GRID[:-1], STEPS), np.zeros((N, 2)))
    with pytest.raises(ValueError, match="outputs must have shape"):
        abcore.fit_weights(sched, np.zeros((2, N + 1, 3)))
