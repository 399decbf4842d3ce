"""Test helpers: synthetic ODEs with known solutions, grids, convergence-order measurement, and the
model and config sweep that adapter parity tests run against `abcore.sample`."""

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
    """ABConfigs that cover every axis: fixed / adaptive, correction on / off / auto, cool-down, mask,
    abscissa, predictor and weighting (orders 1-3). For adapter parity tests against `abcore.sample`."""
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
    mask = (True, True, False, False, True, False, False, False, True, False, True, True)
    configs.append(ABConfig(order=2, compute_mask=mask, cooldown=0, correct=True))
    return configs
