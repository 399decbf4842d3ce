"""The pipeline's `CacheContext(step_index, sigma, num_inference_steps)` (diffusers 0.41+) as the step source."""

from __future__ import annotations

import importlib

import pytest
import torch
from abcache_diffusers import ABCacheConfig, apply_ab_cache, remove_ab_cache
from abcore import ABConfig
from diffusers import FlowMatchEulerDiscreteScheduler

pytestmark = pytest.mark.skipif(
    not hasattr(importlib.import_module("diffusers.hooks.hooks"), "CacheContext"),
    reason="cache_context(name, step_index=..., sigma=...) is diffusers 0.41+",
)
SETTINGS = dict(order=2, interval=3, warmup=2, cooldown=1, correct=False)


def _loop(pipe, kwargs, steps: int, with_step: bool = True) -> torch.Tensor:
    """Wan's loop (cond and uncond per step) outside any pipeline, passing the step through `cache_context`."""
    model, scheduler = pipe.transformer, pipe.scheduler
    scheduler.set_timesteps(steps)
    x = torch.randn((1, 4, 2, 2, 2), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        for i, t in enumerate(scheduler.timesteps):
            where = dict(step_index=i, sigma=float(scheduler.sigmas[i]), num_inference_steps=steps) if with_step else {}
            out = {}
            for name, embeds in (("cond", kwargs["prompt_embeds"]), ("uncond", kwargs["negative_prompt_embeds"])):
                with model.cache_context(name, **where):
                    out[name] = model(
                        hidden_states=x, timestep=t.expand(1), encoder_hidden_states=embeds, return_dict=False
                    )[0]
            noise = out["uncond"] + kwargs["guidance_scale"] * (out["cond"] - out["uncond"])
            x = scheduler.step(noise, t, x, return_dict=False)[0]
    model._reset_stateful_cache()
    return x


def test_a_stale_scheduler_is_detected_and_the_context_steps_are_used(tiny):
    pipe, kwargs = tiny.BUILDERS["wan"]()
    calls = tiny.count_forward(pipe.transformer)
    apply_ab_cache(pipe.transformer, ABCacheConfig(**SETTINGS), scheduler=pipe.scheduler)
    reference = _loop(pipe, kwargs, 12)  # the hook reads the running scheduler
    assert calls[0] == 2 * ABConfig(**SETTINGS).num_computed(12)
    remove_ab_cache(pipe.transformer)

    stale = FlowMatchEulerDiscreteScheduler(shift=1.0)  # another grid than the running one
    stale.set_timesteps(12)
    apply_ab_cache(pipe.transformer, ABCacheConfig(**SETTINGS), scheduler=stale)
    calls[0] = 0
    with pytest.warns(UserWarning, match="not the running one") as record:
        first = _loop(pipe, kwargs, 12)  # step 0 is at sigma 1 on both grids: found out at step 1, restarted there
        calls[0] = 0
        second = _loop(pipe, kwargs, 12)
    assert len([w for w in record if "not the running one" in str(w.message)]) == 1  # once
    assert torch.isfinite(first).all()
    # from then on cached with cool-down on the pipeline's sigmas: the same calls and output as on the right grid
    assert calls[0] == 2 * ABConfig(**SETTINGS).num_computed(12)
    assert torch.equal(second, reference)


def test_without_a_scheduler_the_context_keeps_the_few_step_guard_and_cooldown(tiny):
    pipe, kwargs = tiny.BUILDERS["wan"]()
    calls = tiny.count_forward(pipe.transformer)
    uncached = _loop(pipe, kwargs, 4)
    hook = apply_ab_cache(pipe.transformer, ABCacheConfig(order=2, interval=3, warmup=2, cooldown=0))
    calls[0] = 0
    with pytest.warns(UserWarning, match="below min_steps"):
        assert torch.equal(_loop(pipe, kwargs, 4), uncached)
    assert calls[0] == 2 * 4
    calls[0] = 0
    _loop(pipe, kwargs, 12)
    assert calls[0] == 2 * ABConfig(order=2, interval=3, warmup=2, cooldown=0).num_computed(12)
    assert hook.stats.contexts["cond"].predicted == hook.stats.contexts["uncond"].predicted > 0
