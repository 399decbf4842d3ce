"""abcache-jax: AB-Cache for JAX/Flax, a jit-compiled cached sampling loop that keeps the batch sharding.

`sample` runs a sampler under `lax.scan` and executes abcore's step rule on `jax.numpy`: the model
runs only at the steps the rule computes, the others are predicted from a `History` of past outputs
(and corrected once the next output is computed, given the sampler's `abcore.LinearSteps`).
`HostStepper` executes the same rule for pipelines that keep their own Python loop (`predict(i)`,
`record(i, output)`), deciding on the host without a device sync in fixed mode.
`multistep_table` gives abcore's exact variable-step Adams-Bashforth weights of a schedule in JAX;
the optional `abcache_jax.diffrax` module (extra ``diffrax``) holds a diffrax `AdamsBashforth` solver.
"""

from abcache_jax._history import History, init_history, push, weighted_sum
from abcache_jax._multistep import multistep_table
from abcache_jax._sample import ModelFn, StepFn, Trajectory, any_over_batch, sample
from abcache_jax._stepper import HostStepper
from abcache_jax._steps import ddim_eps_step, flow_euler_step, vp_alpha_sigma

__all__ = [
    "History",
    "HostStepper",
    "ModelFn",
    "StepFn",
    "Trajectory",
    "any_over_batch",
    "ddim_eps_step",
    "flow_euler_step",
    "init_history",
    "multistep_table",
    "push",
    "sample",
    "vp_alpha_sigma",
    "weighted_sum",
]
__version__ = "0.2.0"
