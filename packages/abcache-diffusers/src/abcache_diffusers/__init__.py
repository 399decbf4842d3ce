"""abcache-diffusers: AB-Cache for Hugging Face diffusers pipelines, on the scheduler's real sigma / lambda spacing.

from abcache_diffusers import enable_ab_cache
enable_ab_cache(pipe)  # FLUX, SD3, Wan, LTX, CogVideoX, DiT, DDIM, ... any denoiser that takes a timestep
image = pipe(prompt).images[0]

`ExactLMSDiscreteScheduler` is diffusers' LMS scheduler on exact (closed-form) multistep coefficients.
"""

from abcache_diffusers._config import ABCacheConfig
from abcache_diffusers._hook import AB_CACHE_HOOK, ABCacheHook, apply_ab_cache, get_ab_cache_hook, remove_ab_cache
from abcache_diffusers._pipeline import cache_stats, denoisers, disable_ab_cache, enable_ab_cache, summary
from abcache_diffusers._spacing import abscissa_grid, linear_steps, resolve_abscissa
from abcache_diffusers.lms import ExactLMSDiscreteScheduler

__all__ = [
    "AB_CACHE_HOOK",
    "ABCacheConfig",
    "ABCacheHook",
    "ExactLMSDiscreteScheduler",
    "abscissa_grid",
    "apply_ab_cache",
    "cache_stats",
    "denoisers",
    "disable_ab_cache",
    "enable_ab_cache",
    "get_ab_cache_hook",
    "linear_steps",
    "remove_ab_cache",
    "resolve_abscissa",
    "summary",
]
__version__ = "0.2.0"
