"""Exact Adams-Bashforth weights, Proposition 2, and the extrapolation / multistep weights."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from fractions import Fraction
from math import comb
from typing import Any

import abcore
import numpy as np
import pytest
from abcore import theory
from abcore.testing import exact_multistep_weights
from hypothesis import given, settings
from hypothesis import strategies as st

# Standard tables (e.g. Hairer, Norsett & Wanner, Table III.1.1), numerators over a common denominator.
KNOWN_AB = {
    1: ((1,), 1),
    2: ((3, -1), 2),
    3: ((23, -16, 5), 12),
    4: ((55, -59, 37, -9), 24),
    5: ((1901, -2774, 2616, -1274, 251), 720),
    6: ((4277, -7923, 9982, -7298, 2877, -475), 1440),
    7: ((198721, -447288, 705549, -688256, 407139, -134472, 19087), 60480),
    8: ((434241, -1152169, 2183877, -2664477, 2102243, -1041723, 295767, -36799), 120960),
}
KNOWN_GAMMA = (Fraction(1), Fraction(1, 2), Fraction(5, 12), Fraction(3, 8), Fraction(251, 720), Fraction(95, 288))

SETTINGS = settings(max_examples=60, deadline=None)


def ab_from_order_conditions(k: int) -> tuple[Fraction, ...]:
    """sum_j b_j (-j)^q = 1/(q+1), q = 0..k-1: integral_0^1 s^q ds with nodes at s = -j."""
    return exact_multistep_weights(range(0, -k, -1), 0, 1)


@pytest.mark.parametrize("k", range(1, 9))
def test_adams_bashforth_weights_match_tables_and_order_conditions(k: int) -> None:
    numerators, denominator = KNOWN_AB[k]
    weights = theory.adams_bashforth_weights(k)
    assert all(isinstance(b, Fraction) for b in weights)
    assert weights == tuple(Fraction(p, denominator) for p in numerators)
    assert weights == ab_from_order_conditions(k)
    assert sum(weights) == 1


@pytest.mark.parametrize("k", range(1, 13))
def test_order_conditions_hold_exactly(k: int) -> None:
    weights = theory.adams_bashforth_weights(k)
    for q in range(k):
        assert sum(b * Fraction(-j) ** q for j, b in enumerate(weights)) == Fraction(1, q + 1)
    # ...and fail at q = k: the method is of order k, not more.
    assert sum(b * Fraction(-j) ** k for j, b in enumerate(weights)) != Fraction(1, k + 1)


def test_binomial_weights_are_eq_3_6() -> None:
    assert theory.binomial_weights(1) == (1,)
    assert theory.binomial_weights(2) == (2, -1)
    assert theory.binomial_weights(3) == (3, -3, 1)
    assert theory.binomial_weights(5) == (5, -10, 10, -5, 1)
    for k in range(1, 10):
        assert sum(theory.binomial_weights(k)) == 1


@pytest.mark.parametrize("k", range(1, 13))
def test_proposition_2_holds(k: int) -> None:
    report = theory.verify_proposition_2(k)
    assert report
    assert report.recursion == tuple(Fraction(w) for w in theory.binomial_weights(k))
    lower = (*theory.adams_bashforth_weights(k), Fraction(0))
    upper = theory.adams_bashforth_weights(k + 1)
    assert report.differences == tuple(u - v for u, v in zip(upper, lower, strict=True))
    assert report.differences == tuple(report.gamma * (-1) ** j * comb(k, j) for j in range(k + 1))


def test_backward_difference_coefficients() -> None:
    assert tuple(theory.backward_difference_coefficient(m) for m in range(6)) == KNOWN_GAMMA
    assert theory.verify_proposition_2(4).gamma == Fraction(251, 720)


def test_proposition_2_report_is_falsy_when_tampered() -> None:
    report = theory.verify_proposition_2(5)
    wrong_difference = (report.differences[0] + Fraction(1, 1000), *report.differences[1:])
    assert not dataclasses.replace(report, differences=wrong_difference)
    wrong_recursion = (report.recursion[0], -report.recursion[1], *report.recursion[2:])
    assert not dataclasses.replace(report, recursion=wrong_recursion)
    assert not dataclasses.replace(report, gamma=Fraction(1, 3), expected=report.expected[:-1])
    assert "FAILS" in str(dataclasses.replace(report, differences=wrong_difference))
    assert "holds" in str(report)


@st.composite
def distinct_nodes(draw: st.DrawFn, min_size: int = 1, max_size: int = 6) -> np.ndarray:
    """Distinct nodes, well separated relative to their spread (integers + jitter, scaled, shifted)."""
    ints = draw(st.lists(st.integers(-12, 12), min_size=min_size, max_size=max_size, unique=True))
    jitter = draw(st.lists(st.floats(-0.3, 0.3), min_size=len(ints), max_size=len(ints)))
    scale = draw(st.floats(1e-3, 1e3))
    offset = draw(st.floats(-1e3, 1e3))
    return offset + scale * (np.array(ints, dtype=float) + np.array(jitter))


@dataclasses.dataclass(frozen=True)
class PolynomialCase:
    """A random polynomial of degree < len(nodes) in u = (t - center) / spread, so that values stay O(1)."""

    poly: np.polynomial.Polynomial
    center: float
    spread: float

    def local(self, t: Any) -> Any:
        return (t - self.center) / self.spread


def draw_case(data: st.DataObject, nodes: np.ndarray) -> tuple[PolynomialCase, Callable[[], float]]:
    """The polynomial case and a sampler of points within two spreads of the nodes' center."""
    center, spread = nodes.mean(), max(np.ptp(nodes), 1e-3 * (abs(nodes).max() + 1))
    degree = data.draw(st.integers(0, nodes.size - 1))
    coeffs = data.draw(st.lists(st.floats(-10, 10), min_size=degree + 1, max_size=degree + 1))
    case = PolynomialCase(np.polynomial.Polynomial(coeffs), center, spread)
    return case, lambda: center + spread * data.draw(st.floats(-2, 2))


@SETTINGS
@given(data=st.data(), nodes=distinct_nodes())
def test_multistep_weights_integrate_polynomials_exactly(data: st.DataObject, nodes: np.ndarray) -> None:
    case, point = draw_case(data, nodes)
    t_from, t_to = point(), point()
    w = theory.multistep_weights(nodes, t_from, t_to)
    values = case.poly(case.local(nodes))
    antiderivative = case.poly.integ()
    exact = case.spread * (antiderivative(case.local(t_to)) - antiderivative(case.local(t_from)))
    scale = np.sum(np.abs(w * values)) + abs(exact) + 1e-300
    # the reference's own rounding: u = (t - center) / spread is rounded before F(u_to) - F(u_from) cancels
    u_max = 1.0 + max(abs(case.local(t_to)), abs(case.local(t_from)))
    rounding = 1e-13 * case.spread * np.sum(np.abs(antiderivative.coef)) * u_max ** antiderivative.degree()
    assert abs(w @ values - exact) <= 1e-9 * scale + rounding


@SETTINGS
@given(k=st.integers(1, 8), t0=st.floats(-100, 100), h=st.floats(1e-3, 10))
def test_multistep_weights_on_equal_nodes_are_h_times_adams_bashforth(k: int, t0: float, h: float) -> None:
    nodes = t0 - h * np.arange(k)
    w = theory.multistep_weights(nodes, t0, t0 + h)
    expected = h * np.array([float(b) for b in theory.adams_bashforth_weights(k)])
    np.testing.assert_allclose(w, expected, rtol=1e-9, atol=1e-12 * h * 2**k)
    # Integrating backward (decreasing times, as samplers do) flips the sign only.
    np.testing.assert_allclose(theory.multistep_weights(-nodes, -t0, -t0 - h), -expected, rtol=1e-9, atol=1e-9 * h)


def test_multistep_weights_single_node_is_the_step() -> None:
    np.testing.assert_array_equal(theory.multistep_weights([0.5], 0.5, 0.25), [-0.25])


@SETTINGS
@given(data=st.data(), nodes=distinct_nodes())
def test_extrapolation_weights_reproduce_polynomials(data: st.DataObject, nodes: np.ndarray) -> None:
    case, point = draw_case(data, nodes)
    target = point()
    w = abcore.theory.extrapolation_weights(nodes, target)
    assert w.dtype == np.float64
    assert abs(w.sum() - 1.0) <= 1e-9 * np.abs(w).sum()
    values = case.poly(case.local(nodes))
    expected = case.poly(case.local(target))
    assert abs(w @ values - expected) <= 1e-9 * (np.sum(np.abs(w * values)) + abs(expected) + 1e-300)


@pytest.mark.parametrize("k", range(1, 9))
@pytest.mark.parametrize("target", [0.0, 7.25, -3.5])
def test_extrapolation_weights_on_unit_steps_are_binomial(k: int, target: float) -> None:
    w = abcore.theory.extrapolation_weights(target - np.arange(1, k + 1), target)
    np.testing.assert_allclose(w, theory.binomial_weights(k), rtol=1e-12, atol=1e-10)
    # The spacing does not matter, only the ratios: same weights on h-spaced decreasing nodes.
    w_h = abcore.theory.extrapolation_weights(target + 0.01 * np.arange(1, k + 1), target)
    np.testing.assert_allclose(w_h, theory.binomial_weights(k), rtol=1e-9, atol=1e-8)


def test_extrapolation_weights_at_a_node_are_its_unit_vector() -> None:
    np.testing.assert_array_equal(abcore.theory.extrapolation_weights([3.0, 2.0, 1.0], 2.0), [0.0, 1.0, 0.0])


@SETTINGS
@given(data=st.data(), nodes=distinct_nodes(min_size=2, max_size=6))
def test_barycentric_weights_with_a_mask_use_only_the_valid_nodes(data: st.DataObject, nodes: np.ndarray) -> None:
    mask = np.array(data.draw(st.lists(st.booleans(), min_size=nodes.size, max_size=nodes.size)))
    if not mask.any():
        mask[data.draw(st.integers(0, nodes.size - 1))] = True
    target = nodes.mean() + np.ptp(nodes) * data.draw(st.floats(-2, 2))
    # Masked entries may hold anything, even a copy of a valid node (the planner's filler).
    filled = np.where(mask, nodes, nodes[np.argmax(mask)])
    w = np.asarray(abcore.theory.barycentric_weights(filled, mask, target))
    assert np.all(w[~mask] == 0.0)
    np.testing.assert_allclose(w[mask], abcore.theory.extrapolation_weights(nodes[mask], target), rtol=1e-9, atol=1e-9)


@SETTINGS
@given(
    order=st.integers(1, 6),
    steps=st.lists(st.integers(1, 40), min_size=1, max_size=12),
    start=st.integers(-50, 50),
    decreasing=st.booleans(),
)
def test_multistep_table_equals_the_exact_rational_weights(
    order: int, steps: list[int], start: int, decreasing: bool
) -> None:
    # Grids of rationals with step ratios up to 40: exact in float64 (multiples of 1/8), then exact weights.
    sign = -1 if decreasing else 1
    grid = [Fraction(start, 8)]
    for s in steps:
        grid.append(grid[-1] + sign * Fraction(s, 8))
    table = abcore.multistep_table(np.array([float(t) for t in grid]), order)
    assert table.shape == (len(steps), order) and table.dtype == np.float64
    for i in range(len(steps)):
        m = min(order, i + 1)
        exact = exact_multistep_weights(grid[i - m + 1 : i + 1][::-1], grid[i], grid[i + 1])
        expected = np.array([float(w) for w in exact] + [0.0] * (order - m))
        scale = np.abs(expected).max()
        np.testing.assert_allclose(table[i], expected, rtol=0, atol=1e-12 * scale)
        assert np.all(table[i, m:] == 0.0)


@pytest.mark.parametrize("order", range(1, 9))
def test_multistep_table_on_equal_steps_is_h_times_adams_bashforth(order: int) -> None:
    h = -0.125  # decreasing, as sigmas are
    table = abcore.multistep_table(1.0 + h * np.arange(12), order)
    for i in range(12 - 1):
        m = min(order, i + 1)
        expected = [h * float(b) for b in theory.adams_bashforth_weights(m)] + [0.0] * (order - m)
        np.testing.assert_allclose(table[i], expected, rtol=1e-13, atol=1e-15)


@SETTINGS
@given(data=st.data(), order=st.integers(1, 6))
def test_multistep_table_rows_integrate_polynomials_exactly(data: st.DataObject, order: int) -> None:
    # A smooth non-uniform schedule (Karras-like, rho = 7) from 80 to 0.002, as diffusion samplers use.
    n = data.draw(st.integers(1, 30))
    ramp = np.linspace(0, 1, n + 1)
    grid = (80 ** (1 / 7) + ramp * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7
    table = abcore.multistep_table(grid, order)
    for i in range(n):
        m = min(order, i + 1)
        nodes = grid[i - m + 1 : i + 1][::-1]
        degree = data.draw(st.integers(0, m - 1))
        coeffs = data.draw(st.lists(st.floats(-10, 10), min_size=degree + 1, max_size=degree + 1))
        case = PolynomialCase(np.polynomial.Polynomial(coeffs), grid[i], abs(nodes[-1] - grid[i + 1]))
        antiderivative = case.poly.integ()
        exact = case.spread * (antiderivative(case.local(grid[i + 1])) - antiderivative(case.local(grid[i])))
        terms = table[i, :m] * case.poly(case.local(nodes))
        assert abs(terms.sum() - exact) <= 1e-10 * (np.abs(terms).sum() + abs(exact) + 1e-300)
        np.testing.assert_allclose(table[i, :m], theory.multistep_weights(nodes, grid[i], grid[i + 1]), rtol=1e-12)


def test_multistep_table_shorter_than_its_order_holds_only_start_up_rows() -> None:
    table = abcore.multistep_table([0.0, 1.0, 3.0], 4)
    np.testing.assert_allclose(table, [[1.0, 0, 0, 0], [4.0, -2.0, 0, 0]])  # Euler, then AB2 over a step twice as long


def test_multistep_table_docstring_example_runs() -> None:
    import doctest

    from abcore import _weights

    assert doctest.testmod(_weights, raise_on_error=True).attempted >= 2


def test_multistep_table_start_up_rows_make_lms_second_order() -> None:
    # The first rows are Euler, then AB2, ... (diffusers' and k-diffusion's LMS start-up), whose local errors
    # O(h^2), O(h^3) do not shrink with the step count: the table's integrator is globally second order for
    # every order >= 2 (and first order for order 1), on y' = -2 y over [0, 1].
    def error(n: int, order: int) -> float:
        grid = np.linspace(0.0, 1.0, n + 1)
        y, history = 1.0, []
        for row in abcore.multistep_table(grid, order):
            history = [-2.0 * y, *history][:order]
            y += sum(w * f for w, f in zip(row, history))
        return abs(y - math.exp(-2.0))

    for order, expected in [(1, 1), (2, 2), (3, 2), (4, 2)]:
        slopes = -np.diff(np.log2([error(n, order) for n in (40, 80, 160)]))
        np.testing.assert_allclose(slopes, expected, atol=0.1)


def test_a_target_at_a_node_closer_than_the_reciprocal_can_represent_is_that_node() -> None:
    """Found by hypothesis in CI: 1 / (target - x) overflowed to inf and the weights became nan."""
    np.testing.assert_array_equal(theory.extrapolation_weights([0.0], 1.9e-310), [1.0])
    np.testing.assert_array_equal(theory.extrapolation_weights([0.0, 1.0, 2.0], 1e-300), [1.0, 0.0, 0.0])
    w = theory.extrapolation_weights([0.0, 1.0, 2.0], 1e-20)  # resolvable: the interpolant, not a unit vector
    assert w[1] != 0.0 and np.sum(w) == pytest.approx(1.0)
