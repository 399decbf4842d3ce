"""abcore: exact Lagrange / Adams-Bashforth weights and the AB-Cache step rule.

Pure numpy + sympy; never imports torch or jax. One transition per step, written once here and
executed by every adapter (numpy, PyTorch, a JAX scan, the diffusers hook):

    sched = abcore.schedule(config, times, steps)     # once per grid
    state = abcore.begin(sched)                       # once per cache context
    d = abcore.decide(sched, state, i)                # compute or predict; weights w, e, c
    state = abcore.complete(sched, state, i, computed)

`fit_weights` fits prediction weights to recorded trajectories (opt-in, for fixed schedules); `joint` is the
adaptive decision of a group of contexts, `make_plan` the fold of the rule over a grid
(fixed mode), `sample` the numpy reference executor. For other samplers, `multistep_table` gives the
exact variable-step Adams-Bashforth (LMS) weights of a whole schedule in numpy, torch or jax.numpy.
The paper's theory and the weight functions are in `abcore.theory`, test helpers in `abcore.testing`.
"""

from abcore import theory as theory  # `abcore.theory.x` after `import abcore`
from abcore._config import ABConfig
from abcore._learned import fit_weights
from abcore._plan import CachePlan, make_plan
from abcore._reference import Trajectory, sample
from abcore._rule import RuleState, Schedule, begin, complete, decide, joint, schedule
from abcore._schedule import lambda_from_alphas_cumprod, lambda_from_sigma
from abcore._steps import LinearSteps
from abcore._validate import as_grid
from abcore._weights import multistep_table

__all__ = [
    "ABConfig",
    "CachePlan",
    "LinearSteps",
    "RuleState",
    "Schedule",
    "Trajectory",
    "as_grid",
    "begin",
    "complete",
    "decide",
    "fit_weights",
    "joint",
    "lambda_from_alphas_cumprod",
    "lambda_from_sigma",
    "make_plan",
    "multistep_table",
    "sample",
    "schedule",
]
__version__ = "0.3.0"
