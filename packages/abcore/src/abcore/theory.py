"""The paper's theory, exactly: Adams-Bashforth weights, Proposition 2 for every k, Proposition 1's r.

Not needed to run a cache (see `abcore` for the runtime names); for researchers and the tests.
"""

from abcore._schedule import scale_factor, scale_factor_curve
from abcore._weights import (
    Proposition2Report,
    adams_bashforth_weights,
    backward_difference_coefficient,
    binomial_weights,
    multistep_weights,
    verify_proposition_2,
)

__all__ = [
    "Proposition2Report",
    "adams_bashforth_weights",
    "backward_difference_coefficient",
    "binomial_weights",
    "multistep_weights",
    "scale_factor",
    "scale_factor_curve",
    "verify_proposition_2",
]
