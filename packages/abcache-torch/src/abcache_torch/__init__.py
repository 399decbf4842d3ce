"""abcache-torch: AB-Cache for any PyTorch denoiser.

The model runs only at the compute steps of abcore's step rule; at the others its output is
predicted by Lagrange / Adams-Bashforth extrapolation through the last `order` computed outputs
at their real step times (paper, Sections 3.3-3.4, Eq. 3.5), and with the sampler's
`abcore.LinearSteps` a computed step corrects the predicted ones before it.

`ABCache` wraps a model called with its time; `sample` runs a whole sampler; `ContextState` is one cache
context's transition, for integrations that know the step index themselves (the diffusers hook, ComfyUI).
For sampler authors: `multistep_table` (abcore's exact variable-step Adams-Bashforth weights on torch
tensors, differentiable) and `sample_lms`, k-diffusion's LMS sampler on those weights.
"""

from abcache_torch._history import History, weighted_sum
from abcache_torch._multistep import multistep_table, sample_lms
from abcache_torch._state import ContextState, predict_jointly
from abcache_torch._stats import CacheStats, ContextStats
from abcache_torch._steps import ddim_eps_step, flow_euler_step, sample
from abcache_torch._wrapper import DEFAULT_CONTEXT, TIME_KEYWORDS, ABCache, input_key

__all__ = [
    "DEFAULT_CONTEXT",
    "TIME_KEYWORDS",
    "ABCache",
    "CacheStats",
    "ContextState",
    "ContextStats",
    "History",
    "ddim_eps_step",
    "flow_euler_step",
    "input_key",
    "multistep_table",
    "predict_jointly",
    "sample",
    "sample_lms",
    "weighted_sum",
]
__version__ = "0.3.0"
