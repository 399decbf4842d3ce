"""abcache-jax: AB-Cache for JAX/Flax, a jit-compiled cached sampling loop that keeps the batch sharding.

`sample` runs a sampler under `lax.scan`, calling the model only at the steps the
abcore plan (or the adaptive test) computes and predicting the others from a
`CacheState` of past outputs. All weights come from abcore.
"""

from abcache_jax._sample import ModelFn, StepFn, Trajectory, sample
from abcache_jax._samplers import ddim_eps_step, flow_euler_step, vp_alpha_sigma
from abcache_jax._state import CacheState, extrapolate, init_state, mark_predicted, push, weighted_sum

__all__ = [
    "CacheState",
    "ModelFn",
    "StepFn",
    "Trajectory",
    "ddim_eps_step",
    "extrapolate",
    "flow_euler_step",
    "init_state",
    "mark_predicted",
    "push",
    "sample",
    "vp_alpha_sigma",
    "weighted_sum",
]
__version__ = "0.1.0"
