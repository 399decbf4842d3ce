"""abcache-torch: AB-Cache for any PyTorch denoiser.

The model runs only at the compute steps of abcore's step rule; at the others its output is
predicted by Lagrange / Adams-Bashforth extrapolation through the last `order` computed outputs
at their real step times (paper, Sections 3.3-3.4, Eq. 3.5), and with the sampler's
`abcore.LinearSteps` a computed step corrects the predicted ones before it.

For sampler authors: `multistep_table` (abcore's exact variable-step Adams-Bashforth weights on torch
tensors, differentiable) and `sample_lms`, k-diffusion's LMS sampler on those weights.
"""

from abcache_torch._engine import DEFAULT_CONTEXT, CacheEngine, Cursor
from abcache_torch._history import History, accumulation_dtype, extrapolate
from abcache_torch._multistep import multistep_table, sample_lms
from abcache_torch._stats import CacheStats, ContextStats
from abcache_torch._steps import ddim_eps_step, flow_euler_step, sample
from abcache_torch._tree import TreeDef, flatten
from abcache_torch._wrapper import TIME_KEYWORDS, ABCache, input_key

__all__ = [
    "DEFAULT_CONTEXT",
    "TIME_KEYWORDS",
    "ABCache",
    "CacheEngine",
    "CacheStats",
    "ContextStats",
    "Cursor",
    "History",
    "TreeDef",
    "accumulation_dtype",
    "ddim_eps_step",
    "extrapolate",
    "flatten",
    "flow_euler_step",
    "input_key",
    "multistep_table",
    "sample",
    "sample_lms",
]
__version__ = "0.2.0"
