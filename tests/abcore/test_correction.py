"""The correction of predicted steps: exactness, an independent re-derivation, the order it adds, LinearSteps."""

from __future__ import annotations

import abcore
import numpy as np
import pytest
from abcore import testing

GRID = testing.make_grid("shifted", 30)


def polynomial_model(degree: int, seed: int):
    coef = np.random.default_rng(seed).normal(size=degree + 1)
    return lambda x, t: np.full(x.shape, np.polyval(coef, t))


@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize("interval", [2, 3, 5])
def test_correction_is_exact_on_polynomials_of_degree_order(order: int, interval: int) -> None:
    steps = abcore.LinearSteps.euler(GRID)
    model = polynomial_model(order, seed=order * 10 + interval)
    full = abcore.sample(model, np.zeros(3), GRID, None, abcore.ABConfig(interval=1, cooldown=0), steps=steps).x
    config = abcore.ABConfig(order=order, interval=interval, warmup=order, cooldown=1)
    corrected = abcore.sample(model, np.zeros(3), GRID, None, config, steps=steps)
    plain = abcore.sample(
        model, np.zeros(3), GRID, None, abcore.ABConfig(**{**config.__dict__, "correct": False}), steps=steps
    )
    assert corrected.computed.sum() < 30
    np.testing.assert_allclose(corrected.x, full, rtol=0, atol=1e-13)
    assert np.abs(plain.x - full).max() > 1e-5  # the plain prediction is not exact at degree = order


def test_correction_weights_match_a_direct_derivation() -> None:
    config = abcore.ABConfig(order=2, interval=4, warmup=2, cooldown=0)
    steps = abcore.LinearSteps.ddim(np.linspace(0.3, 1.0, 11), np.sqrt(1 - np.linspace(0.3, 1.0, 11) ** 2))
    plan = abcore.make_plan(config, GRID[:10], steps)
    n = 4  # computes 0, 1, 4, 8: steps 2 and 3 are corrected at step 4
    assert np.flatnonzero(plan.compute).tolist() == [0, 1, 4, 8]
    t, a, b = GRID[:10], steps.a, steps.b
    expected = np.zeros(3)  # over [f_4, f_1, f_0]
    for j, propagate in ((2, a[3]), (3, 1.0)):
        interpolated = abcore.theory.extrapolation_weights([t[4], t[1], t[0]], t[j])
        predicted = np.concatenate([[0.0], abcore.theory.extrapolation_weights([t[1], t[0]], t[j])])
        expected += propagate * b[j] * (interpolated - predicted)
    np.testing.assert_allclose(plan.corrections[n], expected * a[n] / b[n], rtol=1e-12, atol=1e-15)
    assert not plan.corrections[[0, 1]].any() and not plan.corrections[~plan.compute].any()


@pytest.mark.parametrize("k", [1, 2, 3])
def test_correction_raises_the_order_of_the_cached_deviation_by_one(k: int) -> None:
    ode = testing.nonlinear_ode()
    grids = [testing.make_grid("shifted", n) for n in (40, 80, 160, 320)]
    h = [1.0 / (g.size - 1) for g in grids]
    plain = testing.fit_slope(h, [testing.cache_deviation(ode, g, k, 3, correct=False) for g in grids])
    corrected = testing.fit_slope(h, [testing.cache_deviation(ode, g, k, 3, correct=True) for g in grids])
    assert abs(plain - k) < 0.35
    assert abs(corrected - (k + 1)) < 0.35


def test_correct_true_needs_the_steps_and_auto_follows_them() -> None:
    f = testing.parity_model
    with pytest.raises(ValueError, match="LinearSteps"):
        abcore.sample(f, np.zeros(2), GRID, lambda x, o, t0, t1: x + (t1 - t0) * o, abcore.ABConfig(correct=True))
    with pytest.raises(ValueError, match="'steps': 5"):
        abcore.make_plan(abcore.ABConfig(), GRID[:-1], abcore.LinearSteps.euler(GRID[:6]))
    assert abcore.make_plan(abcore.ABConfig(), GRID[:-1], abcore.LinearSteps.euler(GRID)).corrections.any()
    assert not abcore.make_plan(
        abcore.ABConfig(correct=False), GRID[:-1], abcore.LinearSteps.euler(GRID)
    ).corrections.any()


@pytest.mark.parametrize("prediction", ["epsilon", "sample", "v_prediction"])
def test_ddim_steps_are_the_ddim_update(prediction: str) -> None:
    abar = np.linspace(0.05, 0.999, 8)
    alphas, sigmas = np.sqrt(abar), np.sqrt(1.0 - abar)
    steps = abcore.LinearSteps.ddim(alphas, sigmas, prediction)
    rng = np.random.default_rng(0)
    for j in range(7):
        x, out = rng.normal(size=4), rng.normal(size=4)
        if prediction == "epsilon":
            x0, eps = (x - sigmas[j] * out) / alphas[j], out
        elif prediction == "sample":
            x0, eps = out, (x - alphas[j] * out) / sigmas[j]
        else:
            x0, eps = alphas[j] * x - sigmas[j] * out, sigmas[j] * x + alphas[j] * out
        np.testing.assert_allclose(steps.apply(j, x, out), alphas[j + 1] * x0 + sigmas[j + 1] * eps, rtol=1e-12)


def test_linear_steps_validate() -> None:
    with pytest.raises(ValueError, match="b must be non-zero"):
        abcore.LinearSteps(np.ones(3), np.array([1.0, 0.0, 1.0]))
    with pytest.raises(ValueError, match="shapes"):
        abcore.LinearSteps(np.ones(3), np.ones(2))
    with pytest.raises(ValueError, match="prediction"):
        abcore.LinearSteps.ddim([1.0, 0.9], [0.1, 0.4], "flow")
    np.testing.assert_array_equal(abcore.LinearSteps.euler([1.0, 0.5, 0.0]).b, [-0.5, -0.5])
