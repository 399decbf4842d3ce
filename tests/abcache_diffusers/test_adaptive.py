"""Adaptive mode under CFG: one decision per step for cond and uncond, equal to one `ABCache` over both contexts."""

from __future__ import annotations

import functools

import pytest
import torch
from abcache_diffusers import (
    ABCacheConfig,
    apply_ab_cache,
    enable_ab_cache,
    get_ab_cache_hook,
    linear_steps,
    remove_ab_cache,
)
from abcache_torch import ABCache

STEPS = 20
# measured on the tiny Wan below: deciding per context, cond and uncond compute different steps at this tolerance
CONFIG = ABCacheConfig(tolerance=0.15, interval=4, warmup=2, cooldown=1)


def _wan(tiny):
    pipe, kwargs = tiny.BUILDERS["wan"]()
    # a negative prompt far from the prompt: the two branches' error estimates differ
    kwargs = {**kwargs, "negative_prompt_embeds": kwargs["negative_prompt_embeds"] * 20, "num_inference_steps": STEPS}
    latents = torch.randn((1, 4, 2, 2, 2), generator=torch.Generator().manual_seed(7))
    return pipe, kwargs, latents


def _computed_steps(pipe, kwargs, latents) -> tuple[dict[str, list[float]], torch.Tensor]:
    """The timesteps at which each context ran the transformer, and the output."""
    log: list[tuple[str, float]] = []
    module = pipe.transformer
    original = module.forward

    @functools.wraps(original)
    def forward(*args, **kw):
        log.append((hook.state_manager.name, float(kw["timestep"].reshape(-1)[0])))
        return original(*args, **kw)

    module.forward = forward
    enable_ab_cache(pipe, CONFIG)
    hook = get_ab_cache_hook(module)
    out = pipe(**kwargs, latents=latents.clone(), generator=torch.Generator().manual_seed(0))[0]
    steps = {name: [t for ctx, t in log if ctx == name] for name in ("cond", "uncond")}
    stats = hook.stats.contexts
    assert {name: stats[name].computed for name in steps} == {name: len(ts) for name, ts in steps.items()}
    return steps, out


def test_cfg_branches_compute_the_same_steps(tiny):
    pipe, kwargs, latents = _wan(tiny)
    steps, _ = _computed_steps(pipe, kwargs, latents)
    assert steps["cond"] == steps["uncond"]
    assert 2 < len(steps["cond"]) < STEPS  # some steps predicted, not all
    # deciding per context (one ABCache per branch) gives the branches different steps here: the test can tell
    pipe, kwargs, latents = _wan(tiny)
    pipe.scheduler.set_timesteps(STEPS)
    sigmas = pipe.scheduler.sigmas[:STEPS].double().numpy()
    alone = {name: _steps_on(sigmas, CONFIG, None) for name in ("cond", "uncond")}
    _wan_loop(pipe, kwargs, latents, lambda i, name, compute: alone[name](compute, float(sigmas[i])))
    assert alone["cond"].stats.computed != alone["uncond"].stats.computed


def _steps_on(times, config: ABCacheConfig, steps) -> ABCache:
    """`ABCache` over a step closure: ``cache(compute, time)`` runs ``compute()`` at the compute steps."""
    return ABCache(lambda compute, time: compute(), config.to_ab_config(), times=times, steps=steps, time_arg=1)


def _wan_loop(pipe, kwargs, latents, step):
    """Wan's denoising loop (two calls per step) calling the transformer through ``step(i, context, compute)``."""
    scheduler = pipe.scheduler
    scheduler.set_timesteps(STEPS)
    x = latents.clone()
    with torch.no_grad():
        for i, t in enumerate(scheduler.timesteps):

            def call(embeds, x=x, t=t):
                return pipe.transformer(
                    hidden_states=x, timestep=t.expand(1), encoder_hidden_states=embeds, return_dict=False
                )[0]

            cond = step(i, "cond", lambda: call(kwargs["prompt_embeds"]))
            uncond = step(i, "uncond", lambda: call(kwargs["negative_prompt_embeds"]))
            noise = uncond + kwargs["guidance_scale"] * (cond - uncond)
            x = scheduler.step(noise, t, x, return_dict=False)[0]
    return x


@pytest.mark.parametrize("correct", [False, None])
def test_adaptive_hook_equals_one_engine_over_both_contexts(correct, tiny):
    pipe, kwargs, latents = _wan(tiny)
    config = ABCacheConfig(**{**CONFIG.__dict__, "correct": correct})
    hook = apply_ab_cache(pipe.transformer, config, scheduler=pipe.scheduler)
    hooked = _wan_loop(pipe, kwargs, latents, lambda i, name, compute: _in_context(pipe, name, compute))
    computed = {name: hook.stats.contexts[name].computed for name in ("cond", "uncond")}
    remove_ab_cache(pipe.transformer)

    pipe.scheduler.set_timesteps(STEPS)
    sigmas = pipe.scheduler.sigmas[:STEPS].double().numpy()
    steps = linear_steps(pipe.scheduler)  # the state test (and, unless correct=False, the correction) use them
    cache = _steps_on(sigmas, config, steps)

    def step(i, name, compute):
        with cache.context(name):
            return cache(compute, float(sigmas[i]))

    manual = _wan_loop(pipe, kwargs, latents, step)
    assert torch.equal(hooked, manual)
    assert computed == {name: cache.stats.contexts[name].computed for name in ("cond", "uncond")}
    assert computed["cond"] == computed["uncond"] < STEPS


def _in_context(pipe, name, compute):
    with pipe.transformer.cache_context(name):
        return compute()
