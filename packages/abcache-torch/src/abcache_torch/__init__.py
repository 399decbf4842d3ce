"""abcache-torch: AB-Cache for any PyTorch denoiser.

The model runs only at the steps of abcore's plan; at the others its output is predicted
by Lagrange / Adams-Bashforth extrapolation through the last `order` computed outputs at
their real step times (paper, Sections 3.3-3.4).
"""

from abcache_torch._samplers import sample_ddim_eps, sample_flow_euler
from abcache_torch._state import DEFAULT_CONTEXT, CacheState, accumulation_dtype, extrapolate
from abcache_torch._stats import CacheStats, ContextStats
from abcache_torch._tree import TreeDef, flatten
from abcache_torch._wrapper import TIME_KEYWORDS, ABCache, input_key

__all__ = [
    "DEFAULT_CONTEXT",
    "TIME_KEYWORDS",
    "ABCache",
    "CacheState",
    "CacheStats",
    "ContextStats",
    "TreeDef",
    "accumulation_dtype",
    "extrapolate",
    "flatten",
    "input_key",
    "sample_ddim_eps",
    "sample_flow_euler",
]
__version__ = "0.1.0"
