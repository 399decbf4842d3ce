"""ExactLMSDiscreteScheduler against diffusers' LMSDiscreteScheduler (scipy quadrature) and exact rationals."""

from __future__ import annotations

from fractions import Fraction
from typing import Any

import numpy as np
import pytest
import torch
from abcache_diffusers import ExactLMSDiscreteScheduler
from abcore.testing import exact_multistep_weights
from diffusers import LMSDiscreteScheduler, UNet2DModel

SCHEDULES: dict[str, dict[str, Any]] = {
    "linspace": {},
    "leading": {"timestep_spacing": "leading", "steps_offset": 1},
    "trailing": {"timestep_spacing": "trailing"},
    "karras": {"use_karras_sigmas": True},
    "exponential": {"use_exponential_sigmas": True},
}


def schedulers(config: dict[str, Any], steps: int) -> tuple[LMSDiscreteScheduler, ExactLMSDiscreteScheduler]:
    theirs = LMSDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, **config)
    ours = ExactLMSDiscreteScheduler.from_config(theirs.config)
    for scheduler in (theirs, ours):
        scheduler.set_timesteps(steps)
    return theirs, ours


@pytest.mark.parametrize("steps", [10, 50])
@pytest.mark.parametrize("schedule", list(SCHEDULES))
def test_coefficients_equal_diffusers_quadrature_and_the_exact_integral(schedule: str, steps: int) -> None:
    theirs, ours = schedulers(SCHEDULES[schedule], steps)
    sigmas = [Fraction(float(s)) for s in ours.sigmas.double()]
    quadrature_error, exact_error = 0.0, 0.0
    for order in range(1, 5):
        for t in range(order - 1, steps):
            exact = exact_multistep_weights(sigmas[t - order + 1 : t + 1][::-1], sigmas[t], sigmas[t + 1])
            scale = max(abs(float(c)) for c in exact)
            for j, c in enumerate(exact):
                quadrature_error = max(quadrature_error, abs(theirs.get_lms_coefficient(order, t, j) - c) / scale)
                exact_error = max(exact_error, abs(ours.get_lms_coefficient(order, t, j) - c) / scale)
    assert quadrature_error < 1e-6  # diffusers integrates in float32
    assert exact_error < 1e-13


def tiny_unet() -> UNet2DModel:
    torch.manual_seed(0)
    return UNet2DModel(
        sample_size=8,
        in_channels=3,
        out_channels=3,
        layers_per_block=1,
        block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
    ).eval()


@torch.no_grad()
def denoise(unet: UNet2DModel, scheduler: LMSDiscreteScheduler, steps: int, order: int = 4) -> torch.Tensor:
    """The loop of every diffusers pipeline: scale_model_input, the model, step."""
    scheduler.set_timesteps(steps)
    sample = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        sample = scheduler.step(unet(scheduler.scale_model_input(sample, t), t).sample, t, sample, order).prev_sample
    return sample


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_sampling_loop_equals_diffusers(prediction: str) -> None:
    unet = tiny_unet()
    theirs, ours = schedulers({"prediction_type": prediction, "use_karras_sigmas": True}, 20)
    for steps, order in [(20, 4), (12, 4), (12, 2)]:  # each set_timesteps must rebuild the table
        expected, got = denoise(unet, theirs, steps, order), denoise(unet, ours, steps, order)
        tolerance = 1e-6 * float(expected.abs().max())  # float32 rounding: measured 1.2e-7 to 3.2e-7
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=tolerance)
        # ...a tolerance that tells the orders apart: one order lower moves the result far more.
        assert float((denoise(unet, ours, steps, order - 1) - expected).abs().max()) > 100 * tolerance


def test_config_round_trip_and_bad_orders() -> None:
    ours = schedulers(SCHEDULES["karras"], 10)[1]
    assert isinstance(ours, LMSDiscreteScheduler)
    assert dict(ExactLMSDiscreteScheduler.from_config(ours.config).config) == dict(ours.config)
    np.testing.assert_allclose(ours.get_lms_coefficient(1, 0, 0), float(ours.sigmas[1] - ours.sigmas[0]), rtol=1e-15)
    for order, t, j in [(3, 1, 0), (0, 4, 0), (2, 4, 2), (2, 4, -1)]:
        with pytest.raises(ValueError, match="order"):
            ours.get_lms_coefficient(order, t, j)


def test_ab_cache_runs_on_it_as_on_diffusers_lms(tiny):
    from abcache_diffusers import ABCacheConfig, disable_ab_cache, enable_ab_cache

    results = []
    for cls in (LMSDiscreteScheduler, ExactLMSDiscreteScheduler):
        pipe, kwargs = tiny.BUILDERS["dit"]()
        pipe.scheduler = cls.from_config(pipe.scheduler.config)
        calls = tiny.count_forward(pipe.transformer)
        enable_ab_cache(pipe, ABCacheConfig(force=True))
        torch.manual_seed(0)
        results.append((tiny.run(pipe, {**kwargs, "num_inference_steps": 20}), calls[0]))
        disable_ab_cache(pipe)
    (theirs, their_calls), (ours, our_calls) = results
    assert our_calls == their_calls < 20
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5 * float(theirs.abs().max()))
