"""AB-Cache on real diffusers pipelines (tiny random-init components): call counts, identity, reset, spacing."""

from __future__ import annotations

import inspect

import diffusers
import numpy as np
import pytest
import torch
from abcache_diffusers import (
    ABCacheConfig,
    cache_stats,
    disable_ab_cache,
    enable_ab_cache,
    get_ab_cache_hook,
    summary,
)
from abcore import ABConfig, lambda_from_alphas_cumprod


def test_forward_runs_exactly_the_planned_number_of_times(pipeline, tiny):
    name, pipe, kwargs, calls = pipeline
    run, STEPS, CONTEXTS = tiny.run, tiny.STEPS, tiny.CONTEXTS
    config = ABCacheConfig(order=2, interval=3, warmup=2, cooldown=1)
    enable_ab_cache(pipe, config)
    first = run(pipe, kwargs)
    planned = ABConfig(order=2, interval=3, warmup=2, cooldown=1).num_computed(STEPS)
    assert planned == 6  # steps 0, 1 (warm-up), 3, 6, 9, 11 (cool-down) of 12
    assert calls[0] == planned * len(CONTEXTS[name])
    stats = cache_stats(pipe)["transformer" if name != "ddim" else "unet"]
    assert sorted(stats.contexts) == sorted(CONTEXTS[name])
    for counters in stats.contexts.values():
        assert (counters.computed, counters.predicted, counters.fallbacks) == (planned, STEPS - planned, 0)
    assert torch.isfinite(first).all()
    # a second call with the same seed: identical output, the same number of calls
    second = run(pipe, kwargs)
    assert torch.equal(first, second)
    assert calls[0] == 2 * planned * len(CONTEXTS[name])
    table = summary(pipe)  # counts accumulate over the two calls; the bound is steps / computed = 12 / 6
    assert all(
        f"  {ctx:<14}{2 * STEPS:>7}{2 * planned:>10}{2 * (STEPS - planned):>11}" in table for ctx in CONTEXTS[name]
    )
    assert "2.00x" in table


def test_interval_one_is_the_uncached_pipeline_and_removal_restores_it(pipeline, tiny):
    name, pipe, kwargs, calls = pipeline
    run, denoiser_of = tiny.run, tiny.denoiser_of
    reference = run(pipe, kwargs)
    uncached_calls = calls[0]
    assert uncached_calls == tiny.STEPS * len(tiny.CONTEXTS[name])
    enable_ab_cache(pipe, ABCacheConfig(interval=1))
    assert torch.equal(run(pipe, kwargs), reference)
    assert calls[0] == 2 * uncached_calls
    disable_ab_cache(pipe)
    enable_ab_cache(pipe, ABCacheConfig(interval=4))
    cached = run(pipe, kwargs)
    assert not torch.equal(cached, reference)  # predictions do change the output
    disable_ab_cache(pipe)
    assert get_ab_cache_hook(denoiser_of(pipe)) is None
    assert not hasattr(denoiser_of(pipe)._diffusers_hook, "hooks") or not denoiser_of(pipe)._diffusers_hook.hooks
    calls[0] = 0
    assert torch.equal(run(pipe, kwargs), reference)
    assert calls[0] == uncached_calls


def _expected_grid(pipe) -> np.ndarray:
    """The abscissa computed here independently of the package: sigma, or lambda from the schedule."""
    scheduler = pipe.scheduler
    n = len(scheduler.timesteps)
    if "FlowMatch" in type(scheduler).__name__:
        return scheduler.sigmas[:n].double().numpy()
    if hasattr(scheduler, "sigmas"):  # DPM-Solver: sigma = sqrt((1 - abar) / abar), lambda = -log(sigma)
        return -np.log(scheduler.sigmas[:n].double().numpy())
    abar = scheduler.alphas_cumprod.double().numpy()[scheduler.timesteps.numpy()]
    return lambda_from_alphas_cumprod(abar)


def test_predictions_use_the_schedulers_real_spacing(pipeline, tiny):
    name, pipe, kwargs, _ = pipeline
    enable_ab_cache(pipe)
    tiny.run(pipe, kwargs)
    hook = get_ab_cache_hook(tiny.denoiser_of(pipe))
    assert hook.abscissa == tiny.SPACING[name]
    expected = _expected_grid(pipe)
    np.testing.assert_allclose(hook.grid, expected, rtol=1e-12, atol=1e-12)
    # the grids are not uniform: predicting on the index would weight the history differently
    assert np.ptp(np.diff(expected)) > 1e-3 * np.abs(np.diff(expected)).mean()


def test_histories_are_released_at_the_end_of_each_call(pipeline, tiny):
    name, pipe, kwargs, _ = pipeline
    if "maybe_free_model_hooks" not in inspect.getsource(type(pipe).__call__):
        pytest.skip(f"{type(pipe).__name__} of diffusers {diffusers.__version__} does not reset hooks after a call")
    enable_ab_cache(pipe)
    tiny.run(pipe, kwargs)
    hook = get_ab_cache_hook(tiny.denoiser_of(pipe))
    assert sorted(hook.stats.contexts) == sorted(tiny.CONTEXTS[name])  # the call used the contexts' states ...
    assert hook.state_manager.branches() == []  # ... and released them


@pytest.mark.parametrize("name", ["flux", "ddim"])
def test_a_changed_grid_starts_afresh(name, tiny):
    run, STEPS = tiny.run, tiny.STEPS
    pipe, kwargs = tiny.BUILDERS[name]()
    enable_ab_cache(pipe)
    fresh = {}
    for steps in (STEPS, 10, STEPS):
        disable_ab_cache(pipe)
        enable_ab_cache(pipe)
        fresh[steps] = run(pipe, kwargs, num_inference_steps=steps)
    # one hook, consecutive calls with different step counts: each equals a fresh hook's output
    for steps in (STEPS, 10, STEPS, 10):
        assert torch.equal(run(pipe, kwargs, num_inference_steps=steps), fresh[steps])
    if name == "flux":  # custom sigmas
        sigmas = list(np.linspace(1.0, 0.1, 11))
        out = run(pipe, kwargs, sigmas=sigmas, num_inference_steps=11)
        hook = get_ab_cache_hook(pipe.transformer)
        np.testing.assert_allclose(hook.grid, pipe.scheduler.sigmas[:11].double().numpy(), rtol=1e-12)
        disable_ab_cache(pipe)
        enable_ab_cache(pipe)
        assert torch.equal(run(pipe, kwargs, sigmas=sigmas, num_inference_steps=11), out)


def test_flux_without_true_cfg_uses_one_context(tiny):
    pipe, kwargs = tiny.BUILDERS["flux"]()
    calls = tiny.count_forward(pipe.transformer)
    enable_ab_cache(pipe, ABCacheConfig(interval=3))
    tiny.run(pipe, kwargs, true_cfg_scale=1.0)
    assert calls[0] == ABConfig(interval=3).num_computed(tiny.STEPS)
    assert list(cache_stats(pipe)["transformer"].contexts) == ["cond"]


def test_img2img_strength_announces_the_part_of_the_grid_that_runs(tiny):
    """FluxImg2ImgPipeline starts mid-grid (strength) and calls the transformer twice per step without a context."""
    from diffusers import FluxImg2ImgPipeline

    base, kwargs = tiny.BUILDERS["flux"]()
    pipe = FluxImg2ImgPipeline(**base.components)
    pipe.set_progress_bar_config(disable=True)
    calls = tiny.count_forward(pipe.transformer)
    image = torch.rand((1, 3, 16, 16), generator=torch.Generator().manual_seed(3))
    enable_ab_cache(pipe)
    fresh = {}
    for strength in (0.5, 0.75):
        calls[0] = 0
        fresh[strength] = tiny.run(pipe, kwargs, image=image, strength=strength, num_inference_steps=24)
        steps = int(24 * strength)
        assert calls[0] == 2 * ABConfig().num_computed(steps)  # the grid the call runs, not all 24 steps
        assert sorted(cache_stats(pipe)["transformer"].contexts) == ["default", "default_1"]
        disable_ab_cache(pipe)
        enable_ab_cache(pipe)
    for strength in (0.75, 0.5):  # consecutive calls on one hook
        assert torch.equal(
            tiny.run(pipe, kwargs, image=image, strength=strength, num_inference_steps=24), fresh[strength]
        )
