"""Pipeline-level entry points: `enable_ab_cache(pipe)`, `disable_ab_cache(pipe)`, `cache_stats`, `summary`."""

from __future__ import annotations

import weakref
from typing import Any

import torch
from abcache_torch import CacheStats

from abcache_diffusers._config import ABCacheConfig, as_config
from abcache_diffusers._hook import apply_ab_cache, get_ab_cache_hook, remove_ab_cache

DENOISER_NAMES = ("transformer", "transformer_2", "unet")


def denoisers(pipe: Any) -> dict[str, torch.nn.Module]:
    """The pipeline's denoisers by component name (`transformer`, Wan 2.2's `transformer_2`, `unet`)."""
    found = {name: getattr(pipe, name, None) for name in DENOISER_NAMES}
    return {name: module for name, module in found.items() if isinstance(module, torch.nn.Module)}


def enable_ab_cache(pipe: Any, config: ABCacheConfig | dict | None = None) -> None:
    r"""
    Enables [AB-Cache](https://huggingface.co/papers/2504.10540) on a diffusers pipeline.

    Applies [`apply_ab_cache`] to the pipeline's denoiser (`pipe.transformer`, also `pipe.transformer_2`, or
    `pipe.unet`) with `pipe.scheduler` as the source of the step index and grid (the scheduler in place at each
    call is used, so it may be swapped later). A pipeline that shares the denoiser, such as
    `X.from_pipe(pipe, scheduler=...)`, runs uncached with a warning until `enable_ab_cache(that_pipeline)` makes the
    hook follow its scheduler (same config; the first pipeline then warns in turn). The hook state is reset at the end
    of every pipeline call, and by every `set_timesteps`.

    Args:
        pipe (`DiffusionPipeline`):
            The pipeline.
        config (`ABCacheConfig`, *optional*):
            The cache settings (default `ABCacheConfig()`); a dict of its fields is accepted. Invalid values raise a
            `ValueError` here, naming the field.

    Example:

    ```python
    >>> import torch
    >>> from diffusers import FluxPipeline
    >>> from abcache_diffusers import enable_ab_cache, summary

    >>> pipe = FluxPipeline.from_pretrained("black-forest-labs/FLUX.1-dev", torch_dtype=torch.bfloat16).to("cuda")
    >>> enable_ab_cache(pipe)
    >>> image = pipe("A cat holding a sign that says hello world", num_inference_steps=28).images[0]
    >>> print(summary(pipe))
    ```
    """
    config = as_config(config)
    modules = denoisers(pipe)
    if not modules:
        raise ValueError(f"{type(pipe).__name__} has no denoiser: expected one of the components {DENOISER_NAMES}")
    if getattr(pipe, "scheduler", None) is None:
        raise ValueError(f"{type(pipe).__name__} has no scheduler: AB-Cache reads the step grid from pipe.scheduler")
    pipe_ref, last = weakref.ref(pipe), [pipe.scheduler]

    def scheduler() -> Any:
        """The pipeline's current scheduler; once the pipeline is gone, the last one it had."""
        current = getattr(pipe_ref(), "scheduler", None)
        if current is not None:
            last[0] = current
        return last[0]

    applied = []
    try:
        for module in modules.values():
            hook = get_ab_cache_hook(module)
            if hook is not None and hook.config == config:  # a pipeline sharing the denoiser: follow its scheduler
                hook.follow(scheduler)
                continue
            apply_ab_cache(module, config, scheduler=scheduler)
            applied.append(module)
    except Exception:
        for module in applied:
            remove_ab_cache(module)
        raise


def disable_ab_cache(pipe: Any) -> None:
    """Removes AB-Cache from the pipeline's denoisers, restoring their original forward."""
    for module in denoisers(pipe).values():
        remove_ab_cache(module)


def cache_stats(pipe: Any) -> dict[str, CacheStats]:
    """Per denoiser with AB-Cache: its counters per context (computed, predicted, fallbacks), since enabled."""
    hooks = {name: get_ab_cache_hook(module) for name, module in denoisers(pipe).items()}
    return {name: hook.stats for name, hook in hooks.items() if hook is not None}


def summary(pipe: Any) -> str:
    """A table per denoiser and context: steps computed and predicted, model calls saved, the speedup bound.

    The speedup bound is steps / computed, the speedup when the denoiser dominates the cost. Counts accumulate
    over pipeline calls since `enable_ab_cache`.
    """
    lines = []
    for name, module in denoisers(pipe).items():
        hook = get_ab_cache_hook(module)
        if hook is None:
            continue
        c = hook.config
        lines.append(
            f"AB-Cache on {name} ({hook.abscissa} abscissa, order={c.order}, interval={c.interval}, "
            f"warmup={c.warmup}, cooldown={c.cooldown}, weighting={hook.weighting}):"
        )
        lines.append(f"  {'context':<14}{'steps':>7}{'computed':>10}{'predicted':>11}{'saved':>7}{'bound':>9}")
        rows: list[tuple[str, Any]] = list(hook.stats.contexts.items())  # (name, ContextStats), then the CacheStats
        if len(rows) > 1:
            rows.append(("total", hook.stats))
        for ctx, s in rows:
            bound = s.steps / s.computed if s.computed else 1.0
            lines.append(f"  {ctx:<14}{s.steps:>7}{s.computed:>10}{s.predicted:>11}{s.predicted:>7}{bound:>8.2f}x")
    if not lines:
        return "AB-Cache is not enabled on this pipeline"
    return "\n".join(lines)
