"""Test helpers: synthetic ODEs with known solutions, grids, convergence-order measurement, the
model and config sweep that adapter parity tests run against `abcore.sample`, and exact rational
multistep weights to check any implementation against."""

from collections.abc import Iterable
from fractions import Fraction
from typing import Any

import numpy as np

from abcore._config import ABConfig
from abcore._convergence import (
    ConvergenceResult,
    SyntheticODE,
    cache_deviation,
    convergence_orders,
    fit_slope,
    linear_ode,
    make_grid,
    measure_order,
    nonlinear_ode,
    prediction_error,
)

__all__ = [
    "ConvergenceResult",
    "SyntheticODE",
    "cache_deviation",
    "config_sweep",
    "convergence_orders",
    "exact_multistep_weights",
    "fit_slope",
    "linear_ode",
    "make_grid",
    "measure_order",
    "nonlinear_ode",
    "parity_model",
    "prediction_error",
]


def parity_model(x: Any, t: Any, xp: Any = np) -> Any:
    """A smooth nonlinear model output every adapter can express: tanh(x)(1 - t) + 0.5 t^2 + 0.3 x t.

    Written with operators and `xp.tanh` only, so numpy, torch and jax.numpy all evaluate it.
    """
    return xp.tanh(x) * (1.0 - t) + 0.5 * t * t + 0.3 * x * t


def config_sweep() -> list[ABConfig]:
    """ABConfigs that cover every axis: fixed / adaptive (state and output tests) / budget, correction on /
    off / auto, cool-down, mask, abscissa, predictor and weighting (orders 1-3). For adapter parity tests against `abcore.sample`."""
    configs = []
    for order in (1, 2, 3):
        for interval in (1, 2, 3, 5):
            for cooldown in (0, 2):
                for correct in (False, True, None):
                    configs.append(
                        ABConfig(order=order, interval=interval, warmup=order, cooldown=cooldown, correct=correct)
                    )
        configs.append(ABConfig(order=order, interval=3, warmup=1, cooldown=0, abscissa="index", correct=True))
        configs.append(ABConfig(order=order, interval=3, warmup=2, cooldown=1, predictor="binomial", correct=False))
        configs.append(ABConfig(order=order, interval=4, warmup=2, cooldown=1, weighting="exp-eps"))
        configs.append(ABConfig(order=order, interval=4, warmup=2, cooldown=1, weighting="exp-x0", correct=False))
    for order in (2, 3):
        for tolerance in (0.01, 0.1):
            for correct in (False, True):
                configs.append(
                    ABConfig(order=order, interval=4, warmup=2, cooldown=2, tolerance=tolerance, correct=correct)
                )
        configs.append(ABConfig(order=order, tolerance=0.05, max_predicted=5, cooldown=0, abscissa="index"))
        configs.append(ABConfig(order=order, interval=4, cooldown=2, tolerance=0.1, error="output"))
    mask = (True, True, False, False, True, False, False, False, True, False, True, True)
    configs.append(ABConfig(order=2, compute_mask=mask, cooldown=0, correct=True))
    configs += [
        ABConfig(calls=5),
        ABConfig(order=3, speedup=2.5, correct=False),
        ABConfig(calls=6, warmup=2, cooldown=1),
    ]
    return configs


def exact_multistep_weights(nodes: Iterable[Any], t_from: Any, t_to: Any) -> tuple[Fraction, ...]:
    """integral_{t_from}^{t_to} l_j(t) dt over the rationals, by the order conditions, not the closed form.

    Solves sum_j w_j (x_j - t_from)^q = (t_to - t_from)^(q+1) / (q + 1), q = 0..k-1, exactly (Gauss-Jordan
    over `Fraction`s; floats are taken at their exact binary values). An oracle independent of
    `multistep_weights` / `multistep_table`, for the tests and benchmarks of every adapter and drop-in.
    """
    x = [Fraction(v) for v in nodes]
    a, h = Fraction(t_from), Fraction(t_to) - Fraction(t_from)
    k = len(x)
    rows = [[(xj - a) ** q for xj in x] + [h ** (q + 1) / (q + 1)] for q in range(k)]
    for col in range(k):
        pivot = next(r for r in range(col, k) if rows[r][col] != 0)
        rows[col], rows[pivot] = rows[pivot], rows[col]
        rows[col] = [v / rows[col][col] for v in rows[col]]
        for r in range(k):
            if r != col and rows[r][col] != 0:
                factor = rows[r][col]
                rows[r] = [v - factor * p for v, p in zip(rows[r], rows[col], strict=True)]
    return tuple(row[-1] for row in rows)
