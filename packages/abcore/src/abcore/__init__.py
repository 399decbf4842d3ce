"""abcore: exact Lagrange / Adams-Bashforth weights and the AB-Cache step rule.

Pure numpy + sympy; never imports torch or jax. The step rule (`decide`, `correction_weights`,
`after_predicted`, `after_computed` on a `RuleState`) is the one source of every decision and weight:
`make_plan` folds it over a known grid, `sample` executes it in numpy, and the adapters execute it
in PyTorch and JAX. For other samplers, `multistep_table` gives the exact variable-step
Adams-Bashforth (LMS) weights of a whole schedule in numpy, torch or jax.numpy. The paper's theory
is in `abcore.theory`, test helpers in `abcore.testing`.
"""

from abcore._config import ABSCISSAS, PREDICTORS, WEIGHTINGS, ABConfig
from abcore._plan import CachePlan, check_steps, make_plan
from abcore._reference import Trajectory, sample
from abcore._rule import (
    Decision,
    RuleState,
    accept_prediction,
    after_computed,
    after_predicted,
    correction_weights,
    decide,
    history_weights,
    init_state,
    node_of,
)
from abcore._schedule import lambda_from_alphas_cumprod, lambda_from_sigma
from abcore._steps import PREDICTIONS, LinearSteps
from abcore._validate import as_grid, as_times
from abcore._weights import barycentric_weights, extrapolation_weights, multistep_table, multistep_weights

__all__ = [
    "ABSCISSAS",
    "PREDICTIONS",
    "PREDICTORS",
    "WEIGHTINGS",
    "ABConfig",
    "CachePlan",
    "Decision",
    "LinearSteps",
    "RuleState",
    "Trajectory",
    "accept_prediction",
    "after_computed",
    "after_predicted",
    "as_grid",
    "as_times",
    "barycentric_weights",
    "check_steps",
    "correction_weights",
    "decide",
    "extrapolation_weights",
    "history_weights",
    "init_state",
    "lambda_from_alphas_cumprod",
    "lambda_from_sigma",
    "make_plan",
    "multistep_table",
    "multistep_weights",
    "node_of",
    "sample",
]
__version__ = "0.2.0"
