"""The paper's theory, exactly: Adams-Bashforth weights, Proposition 2 for every k, Proposition 1's r;
and the weight functions the step rule is built from (Lagrange extrapolation, barycentric form, the
embedded error and correction weights).

Not needed to run a cache (see `abcore` for the runtime names); for researchers, sampler authors and the tests.
"""

from abcore._rule import Decision, correction_weights, history_weights
from abcore._schedule import scale_factor, scale_factor_curve
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
    "Decision",
    "Proposition2Report",
    "adams_bashforth_weights",
    "backward_difference_coefficient",
    "barycentric_weights",
    "binomial_weights",
    "correction_weights",
    "extrapolation_weights",
    "history_weights",
    "multistep_weights",
    "scale_factor",
    "scale_factor_curve",
    "verify_proposition_2",
]
