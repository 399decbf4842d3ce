"""Exact Adams-Bashforth and Lagrange weights (paper, Appendix A and Eq. 3.6).

Everything here is derived, not tabulated: the k-step Adams-Bashforth weights are
integrals of Lagrange basis polynomials, computed exactly with sympy over the
rationals, and the extrapolation weights come from the barycentric form of the
Lagrange interpolant at any distinct nodes.

Proposition 2 for every k (the paper's Remark 1 leaves k > 4 open). In
backward-difference form the k-step Adams-Bashforth method reads

    x_{n+1} - x_n = h * sum_{m=0}^{k-1} gamma_m (nabla^m f)_n,
    gamma_m = integral_0^1 binom(s + m - 1, m) ds,

because the interpolant through f_n, ..., f_{n-k+1} is Newton's backward
polynomial p(t_n + s h) = sum_m binom(s + m - 1, m) (nabla^m f)_n. Going from k to
k + 1 steps adds exactly one term, so

    b^(k+1)_j - b^(k)_j = gamma_k (-1)^j binom(k, j),   j = 0..k,

since (nabla^k f)_n = sum_j (-1)^j binom(k, j) f_{n-j}. Both schemes approximate the
same integral to O(h^{k+1}), hence h gamma_k (nabla^k f)_n = O(h^{k+1}) and, with
gamma_k > 0, (nabla^k f)_n = O(h^k): that is f_n = sum_{i=1}^k (-1)^{i+1} binom(k, i)
f_{n-i} + O(h^k), Eq. 3.6 without the exponential factor, for every k.
`verify_proposition_2` checks the identity symbolically for a given k.
"""

from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass
from fractions import Fraction
from math import comb
from typing import Any

import numpy as np
import sympy

from abcore._validate import as_grid, as_nodes, check_order

_s = sympy.Symbol("s")


def _fraction(value: sympy.Rational) -> Fraction:
    return Fraction(int(value.p), int(value.q))


@functools.cache
def adams_bashforth_weights(k: int) -> tuple[Fraction, ...]:
    """Weights b_0..b_{k-1} of the k-step Adams-Bashforth method (Appendix A, Table 4).

    b_j = integral_0^1 L_j(s) ds with L_j(s) = prod_{m != j} (s + m) / (m - j), so that
    x_{n+1} = x_n + h * sum_j b_j f_{n-j} with local error O(h^{k+1}), global O(h^k).

    >>> adams_bashforth_weights(3)
    (Fraction(23, 12), Fraction(-4, 3), Fraction(5, 12))
    """
    check_order(k, "k")
    weights = []
    for j in range(k):
        basis = sympy.Poly(1, _s, domain=sympy.QQ)
        for m in range(k):
            if m != j:
                basis *= sympy.Poly((_s + m) / (m - j), _s, domain=sympy.QQ)
        antiderivative = basis.integrate()
        weights.append(_fraction(antiderivative.eval(1) - antiderivative.eval(0)))
    return tuple(weights)


@functools.cache
def backward_difference_coefficient(k: int) -> Fraction:
    """gamma_k = integral_0^1 binom(s + k - 1, k) ds: 1, 1/2, 5/12, 3/8, 251/720, ..."""
    if k < 0:
        raise ValueError(f"k must be a non-negative integer, got {k!r}")
    poly = sympy.Poly(1, _s, domain=sympy.QQ)
    for m in range(k):
        poly *= sympy.Poly((_s + m) / (m + 1), _s, domain=sympy.QQ)
    antiderivative = poly.integrate()
    return _fraction(antiderivative.eval(1) - antiderivative.eval(0))


def binomial_weights(k: int) -> tuple[int, ...]:
    """(-1)^(i+1) C(k, i) for i = 1..k: the equal-step recursion of Eq. 3.6.

    f_n ~ sum_{i=1}^k (-1)^(i+1) C(k, i) f_{n-i}, error O(h^k).
    """
    check_order(k, "k")
    return tuple((-1) ** (i + 1) * comb(k, i) for i in range(1, k + 1))


@dataclass(frozen=True)
class Proposition2Report:
    """Result of `verify_proposition_2`; truthy when every identity holds exactly."""

    k: int
    gamma: Fraction
    differences: tuple[Fraction, ...]
    expected: tuple[Fraction, ...]
    recursion: tuple[Fraction, ...]

    @property
    def holds(self) -> bool:
        return self.differences == self.expected and self.recursion == tuple(
            Fraction(w) for w in binomial_weights(self.k)
        )

    def __bool__(self) -> bool:
        return self.holds

    def __str__(self) -> str:
        status = "holds" if self.holds else "FAILS"
        return (
            f"k={self.k}: b^(k+1)_j - b^(k)_j = {self.gamma} (-1)^j C({self.k}, j) {status}; "
            f"recursion weights {[str(r) for r in self.recursion]}"
        )


def verify_proposition_2(k: int) -> Proposition2Report:
    """Check Proposition 2 (Eq. 3.6) symbolically for one k.

    Verifies b^(k+1)_j - b^(k)_j = gamma_k (-1)^j C(k, j) for j = 0..k (b^(k)_k = 0), and
    that the paper's combination of Eqs. 3.7 and 3.8,
    f_n = -sum_{j=1}^k (b^(k+1)_j - b^(k)_j) / (b^(k+1)_0 - b^(k)_0) f_{n-j},
    gives exactly `binomial_weights(k)`.
    """
    check_order(k, "k")
    lower = adams_bashforth_weights(k) + (Fraction(0),)
    upper = adams_bashforth_weights(k + 1)
    gamma = backward_difference_coefficient(k)
    differences = tuple(u - v for u, v in zip(upper, lower, strict=True))
    expected = tuple(gamma * (-1) ** j * comb(k, j) for j in range(k + 1))
    recursion = tuple(-d / differences[0] for d in differences[1:])
    return Proposition2Report(k, gamma, differences, expected, recursion)


def _basis_integrals(columns: list[Any], t_from: Any, t_to: Any, xp: Any) -> list[Any]:
    """[integral_{t_from}^{t_to} l_j(t) dt for each j]: l_j the Lagrange basis through the node columns.

    Closed form, no quadrature: in u = (t - t_from) / s (s the largest distance from t_from, so |u| <= 1),
    l_j(u) = prod_{i != j} (u - u_i) / (u_j - u_i) is expanded into monomials c_p u^p and integrated term
    by term, integral_0^U u^p du = U^(p+1) / (p + 1). Every column, t_from and t_to broadcast together;
    only +, -, *, /, abs, maximum and where, so any array namespace runs it, traced and differentiated.
    """
    scale = xp.abs(t_to - t_from)
    for x in columns:
        scale = xp.maximum(scale, xp.abs(x - t_from))
    scale = xp.where(scale > 0, scale, xp.ones_like(scale))
    u = [(x - t_from) / scale for x in columns]
    upper = (t_to - t_from) / scale
    powers = [upper]
    while len(powers) < len(columns):
        powers.append(powers[-1] * upper)
    moments = [m / (p + 1) for p, m in enumerate(powers)]
    out = []
    for j, u_j in enumerate(u):
        coeffs: list[Any] = [1.0]  # prod_{i != j} (u - u_i), lowest degree first
        denominator: Any = 1.0
        for i, u_i in enumerate(u):
            if i != j:
                coeffs = [-u_i * coeffs[0], *(c - u_i * d for c, d in itertools.pairwise(coeffs)), coeffs[-1]]
                denominator = denominator * (u_j - u_i)
        integral = sum(c * m for c, m in zip(coeffs, moments, strict=True))
        out.append(integral / denominator * scale)
    return out


def multistep_weights(nodes: Any, t_from: Any, t_to: Any, xp: Any = np) -> Any:
    """Variable-step Adams-Bashforth weights: w_i = integral_{t_from}^{t_to} l_i(t) dt.

    l_i is the Lagrange basis polynomial through the distinct `nodes`, so that
    integral_{t_from}^{t_to} f(t) dt ~ sum_i w_i f(nodes_i), exact for polynomials of
    degree < len(nodes) (an order-k multistep step, k = len(nodes), local error O(h^(k+1))).
    The integral is taken in closed form, not by quadrature. On equal nodes t_n, t_n - h, ...,
    integrated over [t_n, t_n + h] this is h * adams_bashforth_weights(k) (Appendix A).

    With numpy (the default) the arguments are validated: 1-D distinct finite nodes, finite ends.
    With any other namespace (`jax.numpy`, `torch`) it is pure arithmetic: nodes of shape (..., k)
    and ends of shape (...) broadcast, it traces under `jax.jit` and differentiates, and the
    caller keeps the nodes distinct.
    """
    if xp is not np:
        return xp.stack(_basis_integrals([nodes[..., i] for i in range(nodes.shape[-1])], t_from, t_to, xp), -1)
    x = as_nodes(nodes, "nodes")
    t_from = float(t_from)
    t_to = float(t_to)
    if not (np.isfinite(t_from) and np.isfinite(t_to)):
        raise ValueError(f"t_from and t_to must be finite, got {t_from!r}, {t_to!r}")
    return np.array(_basis_integrals(list(x), t_from, t_to, np), dtype=np.float64)


def multistep_table(grid: Any, order: int, xp: Any = np) -> Any:
    """The variable-step Adams-Bashforth-`order` weights of a whole schedule, shape (n, order).

    For the grid t_0, ..., t_n (n steps; decreasing sigmas or increasing times), row i holds
    W[i, j] = integral_{t_i}^{t_{i+1}} l_j(t) dt, l_j the Lagrange basis through t_i, t_{i-1}, ...,
    t_{i-m+1} (m = min(order, i + 1): the first steps use every node they have, as diffusers'
    `LMSDiscreteScheduler` and k-diffusion's `sample_lms` do; W[i, j] = 0 for j >= m), so that

        x_{i+1} = x_i + sum_j W[i, j] f(t_{i-j}),

    local error O(h^(m+1)). The start-up rows' local errors O(h^2), O(h^3), ... do not shrink with the
    number of steps, so this integrator, like the LMS samplers above, is globally second order for every
    order >= 2 (measured in the tests); global order k needs the first k - 1 steps from a one-step method
    of order >= k - 1 (as `abcache_jax.diffrax.AdamsBashforth` does). Closed form (see
    `multistep_weights`), one vectorised pass over the grid.
    With numpy (the default) the grid is validated (finite, strictly monotonic, >= 2 entries) and
    float64; with `jax.numpy` or `torch` it is pure arithmetic in the grid's dtype and device
    (jit-able with `order` static, differentiable with respect to the grid).

    >>> import numpy as np
    >>> multistep_table(np.array([0.0, 1.0, 2.0, 3.0]), 2)
    array([[ 1. ,  0. ],
           [ 1.5, -0.5],
           [ 1.5, -0.5]])
    """
    k = check_order(order, "order")
    g = as_grid(grid, "grid") if xp is np else grid
    n = g.shape[0] - 1
    rows = []
    for i in range(min(k - 1, n)):  # the first steps: i + 1 nodes
        w = _basis_integrals([g[i - j : i - j + 1] for j in range(i + 1)], g[i : i + 1], g[i + 1 : i + 2], xp)
        rows.append(xp.stack(w + [xp.zeros_like(g[:1])] * (k - 1 - i), -1))
    if n >= k:
        rows.append(xp.stack(_basis_integrals([g[k - 1 - j : n - j] for j in range(k)], g[k - 1 : n], g[k:], xp), -1))
    return xp.concatenate(rows, 0)


def barycentric_weights(nodes: Any, valid: Any, target: Any, xp: Any = np) -> Any:
    """Lagrange extrapolation weights in the second barycentric form, for any array namespace.

    w_i = (c_i / (target - x_i)) / sum_j (c_j / (target - x_j)), c_i = 1 / prod_{j != i} (x_i - x_j),
    over the entries where `valid` is true (others get weight 0). sum_i w_i f(x_i) is the
    value at `target` of the polynomial of degree < m through the m valid points, so the
    weights sum to 1 and reproduce polynomials of degree < m. A target at a node (within
    1e-32 of the nodes' spread, where 1 / (target - x_i) would overflow) gives that node's
    unit vector. Pure array arithmetic: runs under `jax.jit` with
    `xp=jax.numpy`; validation is the caller's job (see `extrapolation_weights`).
    """
    x = xp.asarray(nodes)
    valid = xp.asarray(valid, dtype=bool)
    pair_valid = valid[:, None] & valid[None, :]
    eye = xp.eye(x.shape[0], dtype=bool)
    diffs = xp.where(pair_valid & ~eye, x[:, None] - x[None, :], xp.ones_like(x[:, None] - x[None, :]))
    # Scale-free products: normalise differences by the node spread to avoid overflow.
    spread = xp.max(xp.where(pair_valid, xp.abs(diffs), xp.zeros_like(diffs)))
    spread = xp.where(spread > 0, spread, xp.ones_like(spread))
    diffs = xp.where(pair_valid & ~eye, diffs / spread, diffs)
    c = 1.0 / xp.prod(diffs, axis=1)
    d = target - x
    exact = (xp.abs(d) <= 1e-32 * spread) & valid  # at a node (closer than 1/d can represent: that node's value)
    d_safe = xp.where(exact | ~valid, xp.ones_like(d), d / spread)
    terms = xp.where(valid, c / d_safe, xp.zeros_like(d))
    total = xp.sum(terms)
    weights = terms / xp.where(total == 0, xp.ones_like(total), total)
    return xp.where(xp.any(exact), exact.astype(x.dtype), weights)


def extrapolation_weights(nodes: Any, target: float) -> np.ndarray:
    """Weights w with sum_i w_i f(nodes_i) = p(target), p the interpolant through the nodes.

    With k nodes the prediction error is O(h^k) for smooth f (h the node spacing);
    float64, second barycentric form. With nodes target-1, ..., target-k this returns
    `binomial_weights(k)` (Eq. 3.6 without its exponential factor).
    """
    x = as_nodes(nodes, "nodes")
    target = float(target)
    if not np.isfinite(target):
        raise ValueError(f"target must be finite, got {target!r}")
    return np.asarray(barycentric_weights(x, np.ones(x.shape, dtype=bool), target))
