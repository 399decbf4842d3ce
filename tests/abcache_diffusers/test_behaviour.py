"""Configuration errors, the few-step guard, contexts, scheduler swaps, adaptive mode, torch.compile, CPU offload."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from abcache_diffusers import (
    ABCacheConfig,
    apply_ab_cache,
    cache_stats,
    disable_ab_cache,
    enable_ab_cache,
    get_ab_cache_hook,
    remove_ab_cache,
)
from abcore import ABConfig


@pytest.mark.parametrize(
    ("bad", "field"),
    [
        (dict(order=0), "order"),
        (dict(interval=0), "interval"),
        (dict(warmup=-1), "warmup"),
        (dict(cooldown=1.5), "cooldown"),
        (dict(compute_mask=(False, True)), "compute_mask"),
        (dict(tolerance=-0.1), "tolerance"),
        (dict(tolerance=0.1, order=1), "order"),
        (dict(weighting="exponential"), "weighting"),
        (dict(abscissa="t"), "abscissa"),
        (dict(predictor="paper"), "predictor"),
        (dict(correct="yes"), "correct"),
        (dict(predictor="binomial", correct=True), "correct"),
        (dict(min_steps=-1), "min_steps"),
        (dict(force="yes"), "force"),
        (dict(timestep_arg="time step"), "timestep_arg"),
        (dict(weighting="exp-eps", abscissa="sigma"), "weighting"),
        (dict(intervals=3), "intervals"),
    ],
)
def test_bad_config_values_raise_at_enable_naming_the_field(bad, field, tiny):
    pipe, _ = tiny.BUILDERS["ddim"]()
    with pytest.raises(ValueError, match=field):
        enable_ab_cache(pipe, bad)
    assert get_ab_cache_hook(pipe.unet) is None


def test_config_errors_that_need_the_pipeline(tiny):
    flux, _ = tiny.BUILDERS["flux"]()
    with pytest.raises(ValueError, match="prediction_type"):  # flow matching has no eps / x0 to weight
        enable_ab_cache(flux, ABCacheConfig(weighting="exp"))
    with pytest.raises(ValueError, match="lambda"):
        enable_ab_cache(flux, ABCacheConfig(weighting="exp-eps"))
    with pytest.raises(TypeError, match="ABCacheConfig"):
        enable_ab_cache(flux, 3)
    with pytest.raises(ValueError, match="timestep_arg"):
        enable_ab_cache(flux, ABCacheConfig(timestep_arg="sigma"))
    with pytest.raises(ValueError, match=r"abscissa=.lambda.*FlowMatchEulerDiscreteScheduler"):
        enable_ab_cache(flux, ABCacheConfig(abscissa="lambda"))
    assert get_ab_cache_hook(flux.transformer) is None
    enable_ab_cache(flux)
    enable_ab_cache(flux)  # the same config again: the hook follows this pipeline's scheduler (from_pipe siblings)
    with pytest.raises(ValueError, match="already applied"):
        enable_ab_cache(flux, ABCacheConfig(interval=3))


def test_apply_with_its_defaults_and_no_scheduler_caches_and_says_the_budget_is_off(tiny):
    """Issue 17 item 5: `apply_ab_cache(model)` with the documented defaults raised at every call (cool-down 4)."""
    pipe, kwargs = tiny.BUILDERS["sd3"]()
    calls = tiny.count_forward(pipe.transformer)
    hook = apply_ab_cache(pipe.transformer)
    with pytest.warns(UserWarning, match="default call budget needs the number of steps"):
        out = tiny.run(pipe, kwargs)
    assert torch.isfinite(out).all()
    assert calls[0] == ABConfig(interval=5, cooldown=0).num_computed(tiny.STEPS) == hook.stats.computed


def test_exp_weighting_follows_prediction_type(tiny):
    pipe, kwargs = tiny.BUILDERS["ddim"]()
    enable_ab_cache(pipe, ABCacheConfig(weighting="exp"))
    hook = get_ab_cache_hook(pipe.unet)
    assert (hook.abscissa, hook.weighting) == ("lambda", "exp-eps")
    out = tiny.run(pipe, kwargs)
    assert torch.isfinite(out).all()


def test_few_step_guard_warns_once_and_computes_every_step(tiny):
    pipe, kwargs = tiny.BUILDERS["flux"]()
    calls = tiny.count_forward(pipe.transformer)
    reference = tiny.run(pipe, kwargs, num_inference_steps=4)
    calls[0] = 0
    enable_ab_cache(pipe, ABCacheConfig(interval=2, warmup=1))
    with pytest.warns(UserWarning, match="below min_steps=10") as record:
        out = tiny.run(pipe, kwargs, num_inference_steps=4)
        tiny.run(pipe, kwargs, num_inference_steps=4)
    assert len(record) == 1
    assert calls[0] == 2 * 4 * 2
    assert torch.equal(out, reference)
    assert cache_stats(pipe)["transformer"].contexts["cond"].computed == 8
    disable_ab_cache(pipe)
    enable_ab_cache(pipe, ABCacheConfig(interval=2, warmup=1, cooldown=0, force=True))
    calls[0] = 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tiny.run(pipe, kwargs, num_inference_steps=4)
    assert calls[0] == 2 * ABConfig(interval=2, warmup=1, cooldown=0).num_computed(4) < 8


def test_several_calls_per_step_without_context_get_separate_histories(tiny):
    """SD3 skip-layer guidance calls the transformer a third time per step, from step 1, without a context."""
    pipe, kwargs = tiny.BUILDERS["sd3"]()
    calls = tiny.count_forward(pipe.transformer)
    enable_ab_cache(pipe)
    slg = dict(skip_guidance_layers=[0], skip_layer_guidance_start=0.01, skip_layer_guidance_stop=0.99)
    first = tiny.run(pipe, kwargs, **slg)
    contexts = cache_stats(pipe)["transformer"].contexts
    assert sorted(contexts) == ["default", "default_1"]
    assert contexts["default"].steps == 12 and contexts["default_1"].steps == 11  # steps 1 .. 11
    planned = ABConfig().num_computed(12) + ABConfig().num_computed(11)
    assert calls[0] == planned
    assert torch.isfinite(first).all()
    assert torch.equal(tiny.run(pipe, kwargs, **slg), first)


def test_a_swapped_scheduler_is_followed(tiny):
    from diffusers import DDIMScheduler

    pipe, kwargs = tiny.BUILDERS["dit"]()
    calls = tiny.count_forward(pipe.transformer)
    enable_ab_cache(pipe)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    out = tiny.run(pipe, kwargs, num_inference_steps=15)
    hook = get_ab_cache_hook(pipe.transformer)
    assert hook.grid.shape == (15,)
    np.testing.assert_allclose(hook.grid, _ddim_lambda(pipe.scheduler), rtol=1e-12)
    assert calls[0] == ABConfig().num_computed(15)
    assert torch.isfinite(out).all()


def _ddim_lambda(scheduler) -> np.ndarray:
    abar = scheduler.alphas_cumprod.double().numpy()[scheduler.timesteps.numpy()]
    return 0.5 * np.log(abar / (1 - abar))


def test_adaptive_mode_runs_within_its_bounds(tiny):
    pipe, kwargs = tiny.BUILDERS["wan"]()
    calls = tiny.count_forward(pipe.transformer)
    computed = {}
    for tolerance in (10.0, 0.3, 1e-12):
        enable_ab_cache(pipe, ABCacheConfig(tolerance=tolerance, interval=3, warmup=2, cooldown=0))
        calls[0] = 0
        out = tiny.run(pipe, kwargs)
        stats = cache_stats(pipe)["transformer"]
        disable_ab_cache(pipe)
        assert torch.isfinite(out).all()
        assert calls[0] == stats.computed and stats.steps == 2 * 12
        # the largest error estimate among accepted predictions is within the tolerance
        assert stats.max_error <= tolerance if stats.predicted else stats.max_error is None
        computed[tolerance] = stats.computed
    # everything accepted: warm-up 2, then a computation after every interval - 1 = 2 predictions in a row,
    # i.e. steps 0, 1, 4, 7, 10 of 12 in each of the 2 contexts (the fixed schedule's 0, 1, 3, 6, 9 by chance also has 5)
    assert computed[10.0] == 2 * len([0, 1, 4, 7, 10])
    assert computed[10.0] <= computed[0.3] <= computed[1e-12] == 2 * 12  # nothing is accurate to 1e-12


def test_torch_compile_after_the_hook(tiny):
    from torch._dynamo.utils import counters

    pipe, kwargs = tiny.BUILDERS["sd3"]()
    calls = tiny.count_forward(pipe.transformer)
    enable_ab_cache(pipe)
    eager = tiny.run(pipe, kwargs)
    torch._dynamo.reset()
    counters.clear()
    pipe.transformer.compile(backend="eager")
    calls[0] = 0
    compiled = tiny.run(pipe, kwargs)
    assert counters["stats"]["calls_captured"] > 100  # the transformer itself was traced, not skipped
    assert calls[0] == ABConfig().num_computed(12)
    assert torch.equal(compiled, eager)
    assert torch.equal(tiny.run(pipe, kwargs), eager)


def test_a_module_compiled_before_the_hook_is_unwrapped(tiny):
    pipe, kwargs = tiny.BUILDERS["ddim"]()
    calls = tiny.count_forward(pipe.unet)
    enable_ab_cache(pipe)
    eager = tiny.run(pipe, kwargs)
    disable_ab_cache(pipe)
    pipe.unet = torch.compile(pipe.unet, backend="eager")
    enable_ab_cache(pipe)
    assert get_ab_cache_hook(pipe.unet) is get_ab_cache_hook(pipe.unet._orig_mod) is not None
    calls[0] = 0
    assert torch.equal(tiny.run(pipe, kwargs), eager)
    assert calls[0] == ABConfig().num_computed(12)
    disable_ab_cache(pipe)
    assert get_ab_cache_hook(pipe.unet) is None


def test_the_hook_survives_model_cpu_offload(tiny):
    pipe, kwargs = tiny.BUILDERS["flux"]()
    calls = tiny.count_forward(pipe.transformer)
    reference = tiny.run(pipe, kwargs)
    enable_ab_cache(pipe)
    cached = tiny.run(pipe, kwargs)
    pipe.enable_model_cpu_offload(device="cpu")  # accelerate wraps the hooked forward
    calls[0] = 0
    assert torch.equal(tiny.run(pipe, kwargs), cached)
    assert torch.equal(tiny.run(pipe, kwargs), cached)  # the offload hooks are re-applied after each call
    assert calls[0] == 2 * 2 * ABConfig().num_computed(12)
    disable_ab_cache(pipe)
    assert pipe.transformer.forward.func.__module__.startswith("accelerate")  # offloading still in place
    calls[0] = 0
    assert torch.equal(tiny.run(pipe, kwargs), reference)
    assert calls[0] == 2 * 12


def test_reset_entry_point_for_models_without_cache_mixin(tiny):
    pipe, kwargs = tiny.BUILDERS["ddim"]()
    assert not hasattr(pipe.unet, "_reset_stateful_cache")
    enable_ab_cache(pipe)
    assert hasattr(pipe.unet, "_reset_stateful_cache")  # pipelines call it at the end of __call__
    hook = get_ab_cache_hook(pipe.unet)
    tiny.run(pipe, kwargs)
    hook.state_manager.get_state()  # the "default" context's state, as at a call
    pipe.unet._reset_stateful_cache()  # what pipelines call (DDIMPipeline from diffusers 0.41 on)
    assert hook.state_manager.branches() == [] and hook.stats.computed > 0
    remove_ab_cache(pipe.unet)
    assert not hasattr(pipe.unet, "_reset_stateful_cache")
