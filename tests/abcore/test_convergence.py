"""Measured convergence orders on synthetic ODEs with known solutions (abcore._convergence).

For k = 1..4, on equal, random (smooth warp) and FLUX-shifted grids, each slope of
log(error) against log(h), fitted on the finest refinements, is within 0.35 of k:
(a) the variable-step Adams-Bashforth integrator built from multistep_weights,
(b) the order-k prediction of the right-hand side along the exact solution,
(c) the deviation of the order-k cached Euler sampler from the uncached one.
"""

from __future__ import annotations

import numpy as np
import pytest
from abcore import _convergence as conv

ORDERS = (1, 2, 3, 4)
TOLERANCE = 0.35


def check(kind: str, grid: str, ode: str) -> None:
    slopes = []
    for k in ORDERS:
        result = conv.measure_order(kind, k, grid, ode)
        assert all(e > conv.ERROR_FLOOR for e in result.errors), result
        assert all(np.diff(result.errors) < 0), result  # refining reduces the error
        slopes.append(result.slope)
    assert np.all(np.abs(np.array(slopes) - ORDERS) <= TOLERANCE), f"{kind} {ode} {grid}: slopes {slopes}"


@pytest.mark.parametrize("ode", ["linear", "nonlinear"])
@pytest.mark.parametrize("grid", ["equal", "random", "shifted", "jitter"])
def test_adams_bashforth_integrator_has_global_order_k(grid: str, ode: str) -> None:
    check("integrator", grid, ode)


@pytest.mark.parametrize("ode", ["linear", "nonlinear"])
@pytest.mark.parametrize("grid", ["equal", "random", "shifted", "jitter"])
def test_prediction_of_the_right_hand_side_is_order_k(grid: str, ode: str) -> None:
    check("prediction", grid, ode)


@pytest.mark.parametrize("ode", ["linear", "nonlinear"])
@pytest.mark.parametrize("grid", ["equal", "random", "shifted"])
def test_cached_sampler_deviates_from_the_uncached_one_as_h_to_the_k(grid: str, ode: str) -> None:
    check("cache", grid, ode)


def test_synthetic_solutions_solve_their_odes() -> None:
    for ode in (conv.linear_ode(), conv.nonlinear_ode()):
        for t in (0.0, 0.3, 1.0):
            d = 1e-5
            derivative = (ode.exact(t + d) - ode.exact(t - d)) / (2 * d)
            np.testing.assert_allclose(derivative, ode.f(ode.exact(t), t), rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("grid", conv.GRIDS)
def test_grids_run_from_one_to_zero(grid: str) -> None:
    times = conv.make_grid(grid, 37)
    assert times.shape == (38,) and times[0] == 1.0 and times[-1] == 0.0
    assert np.all(np.diff(times) < 0)
    np.testing.assert_array_equal(times, conv.make_grid(grid, 37))  # fixed seed


def test_shifted_grid_is_flux_like() -> None:
    s = np.linspace(1, 0, 11)
    np.testing.assert_allclose(conv.make_grid("shifted", 10), 3 * s / (1 + 2 * s))


def test_fit_slope_recovers_a_power_law() -> None:
    h = np.array([0.1, 0.05, 0.025])
    assert conv.fit_slope(h, 3.0 * h**2.5) == pytest.approx(2.5)
    with pytest.raises(ValueError, match="refinements"):
        conv.fit_slope([0.1], [1.0])
