"""Parity with abcache-torch: the hooked pipeline equals a manual loop over the same denoiser with `ABCache`."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from abcache_diffusers import ABCacheConfig, apply_ab_cache, enable_ab_cache, remove_ab_cache
from abcache_torch import ABCache
from abcore import ABConfig, lambda_from_alphas_cumprod


def steps_on(times: np.ndarray, settings: dict) -> ABCache:
    """`ABCache` over a step closure: ``cache(compute, time)`` runs ``compute()`` at the compute steps."""
    return ABCache(lambda compute, time: compute(), ABConfig(**settings), times=times, time_arg=1)


# without the correction: the manual loops below do not pass the step coefficients
CONFIGS = [
    dict(order=2, interval=3, warmup=2, correct=False),
    dict(order=3, interval=4, warmup=3, cooldown=1, correct=False),
]


@pytest.mark.parametrize("settings", CONFIGS)
def test_ddim_pipeline_matches_abcache_wrapping_the_unet_in_a_manual_loop(settings, tiny):
    pipe, kwargs = tiny.BUILDERS["ddim"]()
    enable_ab_cache(pipe, ABCacheConfig(**settings))
    hooked = tiny.run(pipe, kwargs, output_type="np")  # (N, H, W, C); diffusers 0.40 has no "pt" here
    remove_ab_cache(pipe.unet)

    scheduler, unet = pipe.scheduler, pipe.unet
    scheduler.set_timesteps(tiny.STEPS)
    abar = scheduler.alphas_cumprod.double().numpy()
    lam = lambda_from_alphas_cumprod(abar[scheduler.timesteps.numpy()])  # eps model: lambda = log(alpha / sigma)
    lam_of = {int(t): float(v) for t, v in zip(scheduler.timesteps, lam)}
    cache = ABCache(unet, ABConfig(**settings), time_fn=lambda args, kw: lam_of[int(args[1])], times=lam)
    generator = torch.Generator().manual_seed(0)
    image = torch.randn((1, 3, 8, 8), generator=generator)
    with torch.no_grad():
        for t in scheduler.timesteps:
            out = cache(image, t).sample
            image = scheduler.step(out, t, image, eta=0.0, generator=generator).prev_sample
    manual = (image / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1)
    assert cache.stats.computed == ABConfig(**settings).num_computed(tiny.STEPS)
    assert torch.equal(hooked, manual)


def _sd3_manual(pipe, kwargs, latents, model=None, step=None):
    """SD3's denoising loop (batched CFG) calling `model` (default the transformer) through `step(i, compute)`."""
    model = pipe.transformer if model is None else model
    scheduler = pipe.scheduler
    scheduler.set_timesteps(kwargs["num_inference_steps"])
    prompt = torch.cat([kwargs["negative_prompt_embeds"], kwargs["prompt_embeds"]])
    pooled = torch.cat([kwargs["negative_pooled_prompt_embeds"], kwargs["pooled_prompt_embeds"]])
    x = latents.clone()
    with torch.no_grad():
        for i, t in enumerate(scheduler.timesteps):
            inputs = torch.cat([x, x])

            def compute(inputs=inputs, t=t):
                return model(
                    hidden_states=inputs,
                    timestep=t.expand(2),
                    encoder_hidden_states=prompt,
                    pooled_projections=pooled,
                    return_dict=False,
                )[0]

            out = compute() if step is None else step(i, compute)
            uncond, cond = out.chunk(2)
            x = scheduler.step(uncond + kwargs["guidance_scale"] * (cond - uncond), t, x, return_dict=False)[0]
    return x


@pytest.mark.parametrize("settings", CONFIGS)
def test_sd3_pipeline_matches_cache_state_on_sigma_in_a_manual_loop(settings, tiny):
    pipe, kwargs = tiny.BUILDERS["sd3"]()
    latents = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(5))
    enable_ab_cache(pipe, ABCacheConfig(**settings))
    hooked = tiny.run(pipe, kwargs, latents=latents.clone())
    remove_ab_cache(pipe.transformer)
    sigmas = pipe.scheduler.sigmas[: tiny.STEPS].double().numpy()  # flow matching: velocity on sigma
    state = steps_on(sigmas, settings)
    manual = _sd3_manual(pipe, kwargs, latents, step=lambda i, compute: state(compute, float(sigmas[i])))
    assert torch.equal(hooked, manual)
    # predicting on the step index instead gives another result: the spacing matters
    by_index = steps_on(np.arange(float(tiny.STEPS)), settings)
    other = _sd3_manual(pipe, kwargs, latents, step=lambda i, compute: by_index(compute, float(i)))
    assert not torch.allclose(other, manual, rtol=0, atol=1e-6)


def test_hook_without_scheduler_matches_abcache_on_the_timestep(tiny):
    """apply_ab_cache(module, config) alone extrapolates on the timestep it receives, step by step, like ABCache."""
    pipe, kwargs = tiny.BUILDERS["sd3"]()
    latents = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(5))
    config = ABConfig(order=2, interval=3, warmup=2, cooldown=0)
    cache = ABCache(pipe.transformer, config, time_arg="timestep")
    reference = _sd3_manual(pipe, kwargs, latents, model=cache)

    hook = apply_ab_cache(pipe.transformer, ABCacheConfig(order=2, interval=3, warmup=2, cooldown=0))
    hooked = _sd3_manual(pipe, kwargs, latents)
    assert hook.abscissa == "timestep"
    assert hook.stats.computed == cache.stats.computed == config.num_computed(tiny.STEPS)
    assert torch.equal(hooked, reference)
