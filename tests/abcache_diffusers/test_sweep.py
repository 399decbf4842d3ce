"""The hook over abcore's float64 config sweep: every setting executes exactly as `abcore.sample` does.

A float64 denoiser computing `abcore.testing.parity_model` at the hook's own abscissa, called by a loop that steps
with the scheduler's linear coefficients, is run under `apply_ab_cache` and compared with the numpy reference on the
same grid and steps: the same computed steps, outputs and final sample to 1e-12. Flow-matching settings run on
FlowMatchEulerDiscreteScheduler (sigma), the exponential weightings on DDIM (lambda).
"""

from __future__ import annotations

import dataclasses

import abcore
import diffusers
import numpy as np
import pytest
import torch
from abcache_diffusers import ABCacheConfig, abscissa_grid, apply_ab_cache, linear_steps, resolve_abscissa
from abcore.testing import config_sweep, parity_model

STEPS = 12  # the sweep's compute mask has 12 entries


class Denoiser(torch.nn.Module):
    """parity_model(x, s) where s is the hook's abscissa of the call's timestep; counts its calls."""

    def __init__(self, timesteps: torch.Tensor, grid: np.ndarray) -> None:
        super().__init__()
        self.times = {float(t): float(s) for t, s in zip(timesteps, grid, strict=True)}
        self.calls = 0

    def forward(self, x: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return parity_model(x, self.times[float(timestep)], torch)


def _scheduler(config: abcore.ABConfig):
    if config.weighting == "plain":
        scheduler = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
    else:
        scheduler = diffusers.DDIMScheduler(clip_sample=False, timestep_spacing="trailing", set_alpha_to_one=False)
    scheduler.set_timesteps(STEPS)
    return scheduler


def _hook_config(config: abcore.ABConfig) -> ABCacheConfig:
    fields = {f.name: getattr(config, f.name) for f in dataclasses.fields(config) if f.name != "abscissa"}
    return ABCacheConfig(**fields, abscissa="index" if config.abscissa == "index" else "auto")


@pytest.mark.parametrize("config", config_sweep(), ids=repr)
def test_the_hook_executes_the_sweep_like_abcore_sample(config: abcore.ABConfig) -> None:
    scheduler = _scheduler(config)
    grid = abscissa_grid(scheduler, resolve_abscissa(scheduler, "auto"))  # the hook's grid (tested elsewhere)
    steps = linear_steps(scheduler)
    assert steps is not None
    model = Denoiser(scheduler.timesteps, grid)
    hook = apply_ab_cache(model, _hook_config(config), scheduler=scheduler)
    x0 = np.linspace(-1.0, 1.0, 6)
    x = torch.tensor(x0, dtype=torch.float64)
    outputs, computed = [], []
    with torch.no_grad():
        for i, t in enumerate(scheduler.timesteps):
            before = model.calls
            out = model(x, t)
            computed.append(model.calls > before)
            outputs.append(out.numpy().copy())
            x = steps.apply(i, x, out)
    np.testing.assert_array_equal(hook.grid, np.arange(STEPS, dtype=float) if config.abscissa == "index" else grid)
    end = grid[-1] + (grid[-1] - grid[-2])  # the sampler's end point (the model is never called there)
    reference = abcore.sample(parity_model, x0, np.append(grid, end), None, config, steps=steps)
    assert computed == reference.computed.tolist()
    np.testing.assert_allclose(np.stack(outputs), np.stack(reference.outputs), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(x.numpy(), reference.x, rtol=1e-12, atol=1e-12)
    assert hook.stats.computed == int(reference.computed.sum())
