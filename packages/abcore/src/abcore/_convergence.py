"""Empirical convergence orders on synthetic ODEs with known solutions.

Three measurements, each on a ladder of refined grids, with the slope of
log(error) against log(h) (h the largest step) fitted on the finest refinements
whose error is above the float64 floor:

- "integrator": a k-step variable-step Adams-Bashforth integrator built from
  `multistep_table` (start-up with exact values); global error at the end, O(h^k).
- "prediction": the order-k Lagrange prediction of the right-hand side f(y(t_i), t_i)
  from the k previous steps along the exact solution; RMS error over the grid, O(h^k).
- "cache": the deviation at the end of the Euler sampler run by `sample` with
  ``ABConfig(order=k, interval=..., warmup=k)`` from the same Euler sampler computing
  every step, O(h^k) (the paper's claim; the sampler's own O(h) error cancels).

Errors are vector 2-norms over a small state, so that sign changes of a scalar error
cannot spoil the fit. Grids run from 1 to 0 like a flow-matching sigma (`make_grid`):
"equal"; "random", a random smooth monotone warp of the equal grid (fixed seed), the
way a scheduler's sigma(s) is non-uniform; "shifted", FLUX-like, sigma = shift s /
(1 + (shift - 1) s) with s = linspace(1, 0, n + 1) and shift = 3 (the last steps 9x
the first); "jitter", independent random step lengths.

On "jitter" grids the integrator and the prediction keep their order, but the cache
does not for k >= 3: Euler's local error h_i^2 y''/2 changes randomly from step to
step, so the sampler's own outputs are smooth in t only up to O(h^2), and no
extrapolation through them can do better than that. Real schedulers evaluate a smooth
sigma(s) on equal s, which the "random" and "shifted" grids model.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from abcore._config import ABConfig
from abcore._reference import sample
from abcore._steps import LinearSteps
from abcore._weights import extrapolation_weights, multistep_table

GRIDS: tuple[str, ...] = ("equal", "random", "shifted", "jitter")
KINDS: tuple[str, ...] = ("integrator", "prediction", "cache")
FLUX_SHIFT = 3.0
RANDOM_SEED = 20250601
ERROR_FLOOR = 1e-11  # below this, float64 rounding competes with the truncation error


@dataclass(frozen=True)
class SyntheticODE:
    """y' = f(y, t) with the closed-form solution y = exact(t)."""

    name: str
    f: Callable[[np.ndarray, float], np.ndarray]
    exact: Callable[[float], np.ndarray]


def linear_ode(decay: float = 0.5, omega: float = 6.0) -> SyntheticODE:
    """y' = A y, A = [[-decay, omega], [-omega, -decay]] (rotation + decay), 2 blocks.

    y(t) = e^{-decay t} R(omega t) y(0) per block, with the second block at twice the
    frequency; y(0) = (1, 0, 0.5, 1).
    """
    freqs = (omega, 2.0 * omega)
    y0 = np.array([1.0, 0.0, 0.5, 1.0])
    a = np.zeros((4, 4))
    for b, w in enumerate(freqs):
        a[2 * b : 2 * b + 2, 2 * b : 2 * b + 2] = [[-decay, w], [-w, -decay]]

    def exact(t: float) -> np.ndarray:
        out = np.empty(4)
        for b, w in enumerate(freqs):
            c, s = math.cos(w * t), math.sin(w * t)
            p, q = y0[2 * b : 2 * b + 2]
            out[2 * b : 2 * b + 2] = math.exp(-decay * t) * np.array([c * p + s * q, -s * p + c * q])
        return out

    return SyntheticODE("linear", lambda y, t: a @ y, exact)


def nonlinear_ode(rate: float = 3.0, spin: float = 6.0) -> SyntheticODE:
    """A smooth nonlinear system y = (u, v, p, q) with a closed-form solution.

    u' = rate u (1 - u)      u = 1 / (1 + b e^{-rate t}),  b = 1/u(0) - 1
    v' = -rate u v           v = v(0) (1 + b) / (e^{rate t} + b)
    (p + iq)' = i spin u (p + iq)
                             p + iq = (p(0) + i q(0)) exp(i spin/rate log((e^{rate t} + b) / (1 + b)))
    with u(0) = 0.25, v(0) = 1, p(0) = 1, q(0) = 0.
    """
    u0, v0 = 0.25, 1.0
    b = 1.0 / u0 - 1.0

    def f(y: np.ndarray, t: float) -> np.ndarray:
        u, v, p, q = y
        return np.array([rate * u * (1.0 - u), -rate * u * v, -spin * u * q, spin * u * p])

    def exact(t: float) -> np.ndarray:
        e = math.exp(rate * t)
        phase = spin / rate * math.log((e + b) / (1.0 + b))
        return np.array([1.0 / (1.0 + b / e), v0 * (1.0 + b) / (e + b), math.cos(phase), math.sin(phase)])

    return SyntheticODE("nonlinear", f, exact)


ODES: dict[str, Callable[[], SyntheticODE]] = {"linear": linear_ode, "nonlinear": nonlinear_ode}


def _random_warp(seed: int, modes: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """Mode numbers m and amplitudes a_m of g(s) = s + sum_m a_m sin(pi m s) / (pi m), sum |a_m| = 0.7."""
    m = np.arange(1, modes + 1)
    a = np.random.default_rng(seed).uniform(-1.0, 1.0, modes) / m
    return m, a * (0.7 / np.sum(np.abs(a)))


def make_grid(kind: str, n: int, shift: float = FLUX_SHIFT, seed: int = RANDOM_SEED) -> np.ndarray:
    """n + 1 decreasing times from 1 to 0.

    "equal": s = linspace(1, 0, n + 1). "shifted": shift s / (1 + (shift - 1) s), FLUX-like.
    "random": g(s), a random smooth monotone warp (g' between 0.3 and 1.7, fixed seed),
    the same map at every n, like a scheduler's sigma(s). "jitter": independent step
    lengths uniform in [0.5, 1.5] (a fresh draw per n), rough at the scale of one step.
    """
    if kind not in GRIDS:
        raise ValueError(f"grid must be one of {GRIDS}, got {kind!r}")
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"n must be an integer >= 1, got {n!r}")
    s = np.linspace(1.0, 0.0, n + 1)
    if kind == "equal":
        return s
    if kind == "shifted":
        return shift * s / (1.0 + (shift - 1.0) * s)
    if kind == "random":
        m, a = _random_warp(seed)
        return s + np.sin(np.pi * np.outer(s, m)) @ (a / (np.pi * m))
    steps = np.random.default_rng([seed, n]).uniform(0.5, 1.5, n)
    grid = 1.0 - np.concatenate([[0.0], np.cumsum(steps)]) / steps.sum()
    grid[-1] = 0.0
    return grid


def adams_bashforth_solve(ode: SyntheticODE, times: np.ndarray, k: int) -> np.ndarray:
    """k-step variable-step Adams-Bashforth on `times`, started with exact values y_0..y_{k-1}.

    y_{i+1} = y_i + sum_j W[i, j] f(y_{i-j}, t_{i-j}), W = multistep_table(times, k).
    """
    if len(times) <= k:
        raise ValueError(f"times must hold more than k = {k} entries, got {len(times)}")
    table = multistep_table(times, k)
    history: list[np.ndarray] = []  # f at t_i, t_{i-1}, ..., newest first
    y = ode.exact(times[0])
    for i in range(len(times) - 1):
        if i < k:
            y = ode.exact(times[i])
        history = [ode.f(y, times[i]), *history][:k]
        if i >= k - 1:
            y = y + sum(wj * fj for wj, fj in zip(table[i], history, strict=True))
    return y


def integrator_error(ode: SyntheticODE, times: np.ndarray, k: int) -> float:
    """Global error ||y_N - y(t_N)|| of the k-step variable-step Adams-Bashforth integrator."""
    return float(np.linalg.norm(adams_bashforth_solve(ode, times, k) - ode.exact(times[-1])))


def prediction_error(ode: SyntheticODE, times: np.ndarray, k: int) -> float:
    """RMS over steps of ||sum_j w_j f_{i-1-j} - f_i|| along the exact solution.

    w = extrapolation_weights(t_{i-1}..t_{i-k}, t_i), the order-k prediction. The RMS
    rather than the maximum keeps the extreme value of random step ratios out of the fit.
    """
    values = [ode.f(ode.exact(t), t) for t in times]
    squares = []
    for i in range(k, len(times)):
        w = extrapolation_weights(times[i - k : i][::-1], times[i])
        pred = sum(wj * values[i - 1 - j] for j, wj in enumerate(w))
        squares.append(float(np.sum((pred - values[i]) ** 2)))
    return float(np.sqrt(np.mean(squares)))


def _euler(x: np.ndarray, out: np.ndarray, t0: float, t1: float) -> np.ndarray:
    return x + (t1 - t0) * out


def cache_deviation(ode: SyntheticODE, times: np.ndarray, k: int, interval: int = 3, correct: bool = False) -> float:
    """||x_cached - x_full|| at the end: Euler with AB-Cache (order k, warmup k, no cool-down) against Euler
    every step; `correct` adds the correction of predicted steps (with the last step computed)."""
    x0 = ode.exact(times[0])
    config = ABConfig(order=k, interval=interval, warmup=k, cooldown=int(correct), correct=correct)
    steps = LinearSteps.euler(times) if correct else None
    cached = sample(ode.f, x0, times, _euler, config, steps=steps).x
    full = x0
    for t0, t1 in itertools.pairwise(times):
        full = _euler(full, ode.f(full, t0), t0, t1)
    return float(np.linalg.norm(cached - full))


_ERRORS: dict[str, Callable[[SyntheticODE, np.ndarray, int], float]] = {
    "integrator": integrator_error,
    "prediction": prediction_error,
    "cache": cache_deviation,
}


@dataclass(frozen=True)
class ConvergenceResult:
    """Errors on a ladder of grids and the slope fitted on the finest `fit` of them."""

    kind: str
    ode: str
    grid: str
    order: int
    steps: tuple[int, ...]
    h: tuple[float, ...]
    errors: tuple[float, ...]
    slope: float

    def within(self, tolerance: float = 0.35) -> bool:
        return abs(self.slope - self.order) <= tolerance


def fit_slope(h: Sequence[float], errors: Sequence[float]) -> float:
    """Least-squares slope of log(error) against log(h)."""
    if len(h) < 2:
        raise ValueError(f"need at least 2 refinements to fit a slope, got {len(h)}")
    return float(np.polyfit(np.log(h), np.log(errors), 1)[0])


def default_steps(kind: str, grid: str, order: int) -> tuple[int, ...]:
    """The refinement ladder the tests fit on: (n/4, n/2, n), in the asymptotic regime.

    Euler (k = 1) on the stiffer linear ODE, the cached sampler (which extrapolates
    across interval * h) and the FLUX-shifted grid (steps up to 2.7x the mean) reach
    their asymptotic regime later; the integrator at k >= 2 is there by n = 128.
    """
    if kind == "integrator":
        finest = 1024 if order == 1 else 512
    elif kind == "prediction":
        finest = 2048 if grid == "shifted" else 1024
    else:
        finest = 2048 if order == 1 or grid == "shifted" else 1024
    return (finest // 4, finest // 2, finest)


def auto_steps(
    kind: str, order: int, grid: str, ode: str, start: int = 16, ratio: float = 2**0.5, max_steps: int = 4096
) -> tuple[tuple[int, ...], tuple[float, ...]]:
    """Refine from `start` by `ratio` until the error falls below ERROR_FLOOR or `max_steps`.

    For high orders, where a fixed ladder would hit float64 rounding. Returns the step
    counts and their errors, floor excluded.
    """
    problem, error_fn = ODES[ode](), _ERRORS[kind]
    ladder: list[int] = []
    errs: list[float] = []
    n = float(max(start, order + 1))
    while round(n) <= max_steps:
        err = error_fn(problem, make_grid(grid, round(n)), order)
        if not err >= ERROR_FLOOR:  # NaN (an unstable integrator) stops the ladder too
            break
        ladder.append(round(n))
        errs.append(err)
        n *= ratio
    return tuple(ladder), tuple(errs)


def measure_order(
    kind: str,
    order: int,
    grid: str = "equal",
    ode: str = "linear",
    steps: Sequence[int] | str | None = None,
    fit: int = 3,
) -> ConvergenceResult:
    """Empirical order of `kind` ("integrator", "prediction" or "cache") at order k.

    `steps`: the ladder of step counts; None takes `default_steps`, "auto" refines with
    `auto_steps`. The slope is fitted on the finest `fit` refinements.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if ode not in ODES:
        raise ValueError(f"ode must be one of {tuple(ODES)}, got {ode!r}")
    if grid not in GRIDS:
        raise ValueError(f"grid must be one of {GRIDS}, got {grid!r}")
    if steps == "auto":
        ladder, errs = auto_steps(kind, order, grid, ode)
    else:
        ladder = tuple(int(n) for n in (default_steps(kind, grid, order) if steps is None else steps))
        problem = ODES[ode]()
        errs = tuple(_ERRORS[kind](problem, make_grid(grid, n), order) for n in ladder)
    h = tuple(float(np.max(np.abs(np.diff(make_grid(grid, n))))) for n in ladder)
    slope = fit_slope(h[-fit:], errs[-fit:])
    return ConvergenceResult(kind, ode, grid, order, ladder, h, errs, slope)


def convergence_orders(
    orders: Sequence[int] = (1, 2, 3, 4),
    kinds: Sequence[str] = KINDS,
    grids: Sequence[str] = ("equal", "random", "shifted"),
    odes: Sequence[str] = tuple(ODES),
) -> list[ConvergenceResult]:
    """`measure_order` with the default ladders over every combination."""
    return [measure_order(kind, k, grid, ode) for kind in kinds for ode in odes for grid in grids for k in orders]
