"""abcache-torch: AB-Cache for any PyTorch denoiser (paper, Sections 3.3-3.4).

`ABCache` wraps a model called with its time; `sample` runs a whole sampler; `ContextState` is one cache
context's transition, for integrations that know the step index themselves (the diffusers hook, ComfyUI).
For sampler authors: `multistep_table` (exact variable-step Adams-Bashforth weights on torch tensors) and
`sample_lms`, k-diffusion's LMS sampler on those weights.
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
