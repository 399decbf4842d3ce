"""abcore: exact Adams-Bashforth / Lagrange weights and cache plans for AB-Cache.

Pure numpy + sympy; never imports torch or jax. Adapters execute the plans built here.
"""

from abcore._config import SPACINGS, WEIGHTINGS, ABConfig
from abcore._plan import (
    CachePlan,
    PlannerState,
    StepDecision,
    accept_prediction,
    history_weights,
    make_plan,
    plan_step,
    record,
)
from abcore._reference import Trajectory, sample
from abcore._schedule import lambda_from_alphas_cumprod, lambda_from_sigma, scale_factor, scale_factor_curve
from abcore._validate import as_times
from abcore._weights import (
    Proposition2Report,
    adams_bashforth_weights,
    backward_difference_coefficient,
    barycentric_weights,
    binomial_weights,
    extrapolation_weights,
    multistep_weights,
    verify_proposition_2,
)

__all__ = [
    "SPACINGS",
    "WEIGHTINGS",
    "ABConfig",
    "CachePlan",
    "PlannerState",
    "Proposition2Report",
    "StepDecision",
    "Trajectory",
    "accept_prediction",
    "adams_bashforth_weights",
    "as_times",
    "backward_difference_coefficient",
    "barycentric_weights",
    "binomial_weights",
    "extrapolation_weights",
    "history_weights",
    "lambda_from_alphas_cumprod",
    "lambda_from_sigma",
    "make_plan",
    "multistep_weights",
    "plan_step",
    "record",
    "sample",
    "scale_factor",
    "scale_factor_curve",
    "verify_proposition_2",
]
__version__ = "0.1.0"
