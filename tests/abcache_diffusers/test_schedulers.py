"""Schedulers beyond the first-order ones: step coefficients, repeated / intermediate timesteps, stochastic steps."""

from __future__ import annotations

import functools

import diffusers
import numpy as np
import pytest
import torch
from abcache_diffusers import ABCacheConfig, cache_stats, disable_ab_cache, enable_ab_cache, get_ab_cache_hook
from abcache_diffusers._spacing import linear_steps, nonlinear_reason, stages

LINEAR = [
    ("FlowMatchEulerDiscreteScheduler", dict(shift=3.0)),
    ("DDIMScheduler", dict(clip_sample=False)),
    ("DDIMScheduler", dict(clip_sample=False, prediction_type="sample")),
    ("DDIMScheduler", dict(clip_sample=False, prediction_type="v_prediction", timestep_spacing="trailing")),
    ("EulerDiscreteScheduler", dict()),
    ("EulerDiscreteScheduler", dict(prediction_type="v_prediction")),
    ("EulerDiscreteScheduler", dict(prediction_type="sample", use_karras_sigmas=True)),
]


@pytest.mark.parametrize(("name", "options"), LINEAR)
def test_linear_steps_reproduce_the_schedulers_own_step(name, options):
    scheduler = getattr(diffusers, name)(**options)
    scheduler.set_timesteps(12)
    steps = linear_steps(scheduler)
    assert steps is not None and steps.num_steps == len(scheduler.timesteps)
    generator = torch.Generator().manual_seed(0)
    for j, t in enumerate(scheduler.timesteps):
        x, out = torch.randn(2, 1, 3, 4, 4, generator=generator)
        if hasattr(scheduler, "scale_model_input"):
            scheduler.scale_model_input(x, t)  # the step acts on the unscaled x
        reference = scheduler.step(out, t, x).prev_sample.double()
        mine = steps.apply(j, x.double(), out.double())
        assert float((reference - mine).abs().max()) <= 1e-5 * max(1.0, float(reference.abs().max()))


@pytest.mark.parametrize(
    ("name", "options", "reason"),
    [
        ("DDIMScheduler", dict(clip_sample=True), "clip_sample"),
        ("DDIMScheduler", dict(clip_sample=False, thresholding=True), "thresholding"),
        ("FlowMatchEulerDiscreteScheduler", dict(stochastic_sampling=True), "stochastic_sampling"),
        ("DPMSolverMultistepScheduler", dict(), "not known"),
        ("HeunDiscreteScheduler", dict(), "not known"),
    ],
)
def test_nonlinear_steps_have_a_reason_and_no_coefficients(name, options, reason):
    scheduler = getattr(diffusers, name)(**options)
    scheduler.set_timesteps(12)
    assert reason in nonlinear_reason(scheduler)
    assert linear_steps(scheduler) is None


def test_correct_true_on_a_nonlinear_step_raises_at_enable_naming_the_scheduler(tiny):
    pipe, kwargs = tiny.BUILDERS["ddim"]()  # DDIMScheduler() clips x0 by default
    with pytest.raises(ValueError, match=r"DDIMScheduler.*clip_sample"):
        enable_ab_cache(pipe, ABCacheConfig(correct=True))
    assert get_ab_cache_hook(pipe.unet) is None
    enable_ab_cache(pipe)  # correct=None: no correction there, silently
    pipe.scheduler = diffusers.DDIMScheduler.from_config(pipe.scheduler.config, clip_sample=False)
    assert torch.isfinite(tiny.run(pipe, kwargs)).all()


def test_correct_true_on_a_scheduler_swapped_in_raises_at_the_first_call(tiny):
    pipe, kwargs = tiny.BUILDERS["dit"]()
    pipe.scheduler = diffusers.DDIMScheduler.from_config(pipe.scheduler.config, clip_sample=False)
    enable_ab_cache(pipe, ABCacheConfig(correct=True))
    pipe.scheduler = diffusers.HeunDiscreteScheduler.from_config(pipe.scheduler.config)
    with pytest.raises(ValueError, match="HeunDiscreteScheduler"):
        tiny.run(pipe, kwargs)


def test_stages_split_repeated_abscissae_into_monotonic_histories():
    assert stages(np.array([3.0, 2.0, 1.0])).tolist() == [0, 0, 0]
    assert stages(np.array([3.0, 2.0, 2.0, 1.0, 1.0, 0.5])).tolist() == [0, 0, 1, 0, 1, 0]
    assert stages(np.array([-1.0, 0.0, 0.0, 1.0])).tolist() == [0, 0, 1, 0]


# (scheduler, options, pipeline): flow-matching schedulers on SD3, the others on DiT
SCHEDULERS = [
    ("FlowMatchEulerDiscreteScheduler", dict(shift=3.0), "sd3"),
    ("FlowMatchHeunDiscreteScheduler", dict(shift=3.0), "sd3"),
    ("DDIMScheduler", dict(clip_sample=False), "dit"),
    ("EulerDiscreteScheduler", dict(), "dit"),
    ("HeunDiscreteScheduler", dict(), "dit"),
    ("KDPM2DiscreteScheduler", dict(), "dit"),
    ("KDPM2AncestralDiscreteScheduler", dict(), "dit"),
    ("DPMSolverSDEScheduler", dict(), "dit"),  # needs torchsde (the [test] extra)
    ("PNDMScheduler", dict(), "dit"),
    ("EulerAncestralDiscreteScheduler", dict(), "dit"),
    ("DDPMScheduler", dict(), "dit"),
    ("DPMSolverMultistepScheduler", dict(), "dit"),
    ("UniPCMultistepScheduler", dict(), "dit"),
    ("LMSDiscreteScheduler", dict(), "dit"),
]


def _run(tiny, pipe, kwargs):
    torch.manual_seed(0)  # DiTPipeline steps stochastic schedulers without its generator
    return tiny.run(pipe, kwargs)


def _with_scheduler(tiny, name, options, pipeline):
    if name == "DPMSolverSDEScheduler":
        pytest.importorskip("torchsde", reason="DPMSolverSDEScheduler imports torchsde (the [test] extra)")
    pipe, kwargs = tiny.BUILDERS[pipeline]()
    config = {k: v for k, v in pipe.scheduler.config.items() if not k.startswith("_")}
    pipe.scheduler = getattr(diffusers, name).from_config(config, **options)
    return pipe, {**kwargs, "num_inference_steps": 20}, tiny.count_forward(tiny.denoiser_of(pipe))


@pytest.mark.parametrize(("name", "options", "pipeline"), SCHEDULERS)
def test_every_scheduler_runs_and_interval_1_is_bitwise_uncached(name, options, pipeline, tiny):
    pipe, kwargs, calls = _with_scheduler(tiny, name, options, pipeline)
    reference = _run(tiny, pipe, kwargs)
    uncached = calls[0]
    assert uncached == len(pipe.scheduler.timesteps)
    enable_ab_cache(pipe, ABCacheConfig(interval=1))
    assert torch.equal(_run(tiny, pipe, kwargs), reference)
    disable_ab_cache(pipe)
    enable_ab_cache(pipe, ABCacheConfig(force=True))  # PNDM's Runge-Kutta stage has fewer than min_steps calls
    calls[0] = 0
    cached = _run(tiny, pipe, kwargs)
    assert torch.isfinite(cached).all()
    assert calls[0] < uncached
    grid = get_ab_cache_hook(tiny.denoiser_of(pipe)).grid
    assert grid.shape == (uncached,) and np.all(np.isfinite(grid))
    if np.any(stages(grid)):  # one history per stage
        assert all("/stage" in ctx for ctx in cache_stats(pipe)["transformer"].contexts)


def test_kdpm2_calls_sit_at_their_interpolated_sigmas(tiny):
    pipe, kwargs, _ = _with_scheduler(tiny, "KDPM2DiscreteScheduler", {}, "dit")
    enable_ab_cache(pipe, ABCacheConfig(abscissa="sigma"))
    tiny.run(pipe, kwargs)
    grid, s = get_ab_cache_hook(pipe.transformer).grid, pipe.scheduler
    np.testing.assert_allclose(grid[0::2], s.sigmas.double().numpy()[0 : grid.size : 2])
    np.testing.assert_allclose(grid[1::2], s.sigmas_interpol.double().numpy()[1 : grid.size : 2])
    assert np.all(np.diff(grid) < 0)


def test_dpm_sde_calls_sit_at_the_sigma_the_scheduler_evaluates_them(tiny):
    # DPMSolverSDEScheduler's `sigmas` repeats each sigma; its second-order calls are at the log-sigma midpoint
    pipe, kwargs, _ = _with_scheduler(tiny, "DPMSolverSDEScheduler", {}, "dit")
    s, evaluated = pipe.scheduler, []
    forward = pipe.transformer.forward

    @functools.wraps(forward)
    def record(*args, **kw):
        sigma = s.sigmas[s.step_index] if s.state_in_first_order else s.mid_point_sigma
        evaluated.append(float(sigma))
        return forward(*args, **kw)

    pipe.transformer.forward = record
    enable_ab_cache(pipe, ABCacheConfig(abscissa="sigma", interval=1))
    _run(tiny, pipe, kwargs)
    grid = get_ab_cache_hook(pipe.transformer).grid
    assert len(evaluated) == grid.size == len(s.timesteps)
    np.testing.assert_allclose(grid, evaluated, rtol=1e-6)
    assert np.all(np.diff(grid) < 0) and not np.any(stages(grid))  # one history, as on abscissa="timestep"
