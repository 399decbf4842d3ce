"""Samplers: measured convergence order of the cached flow sampler, DDIM parity with abcore's reference."""

from __future__ import annotations

import abcore
import numpy as np
import pytest
import torch
from abcache_torch import CacheState, sample_ddim_eps, sample_flow_euler

# dx/dsigma = A(sigma) x + b(sigma): rotation + decay on 4 components, smooth in sigma
A = torch.tensor(
    [[-0.5, 1.0, 0.0, 0.0], [-1.0, -0.5, 0.0, 0.0], [0.0, 0.0, -0.2, 2.0], [0.0, 0.0, -2.0, -0.2]],
    dtype=torch.float64,
)


def velocity(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    s = sigma[:, None]
    return x @ A.T * (1.0 + 0.5 * s) + torch.cos(2.0 * s)


@pytest.mark.parametrize("order", [1, 2, 3])
def test_cached_flow_sampler_converges_at_order_k(order):
    config = abcore.ABConfig(order=order, interval=3, warmup=order)
    x0 = torch.tensor([[1.0, 0.0, 0.5, 1.0]], dtype=torch.float64)
    steps = [48, 96, 192, 384]
    deviations = []
    for n in steps:
        sigmas = torch.linspace(1.0, 0.0, n + 1, dtype=torch.float64)
        plain = sample_flow_euler(velocity, x0, sigmas, disable=True)
        state = CacheState(config)
        cached = sample_flow_euler(velocity, x0, sigmas, cache=state, disable=True)
        assert state.stats.predicted > n // 2
        deviations.append(float(torch.linalg.vector_norm(cached - plain)))
    slope = np.polyfit(np.log(1.0 / np.array(steps)), np.log(deviations), 1)[0]
    assert abs(slope - order) < 0.35, (slope, deviations)


def test_flow_sampler_callback_and_progress():
    seen = []
    sigmas = torch.linspace(1.0, 0.0, 7, dtype=torch.float64)
    x = torch.ones(2, 4, dtype=torch.float64)
    sample_flow_euler(velocity, x, sigmas, config=abcore.ABConfig(), callback=seen.append, disable=True)
    assert [d["i"] for d in seen] == list(range(6))
    d = seen[2]
    torch.testing.assert_close(d["denoised"], d["x"] - d["sigma"] * d["velocity"])


def test_flow_sampler_rejects_config_and_cache_together():
    with pytest.raises(ValueError, match="config"):
        sample_flow_euler(
            velocity, torch.ones(1, 4), [1.0, 0.0], config=abcore.ABConfig(), cache=CacheState(abcore.ABConfig())
        )


def vp_schedule() -> np.ndarray:
    return np.cumprod(1.0 - np.linspace(1e-4, 0.02, 1000))


def eps_np(x: np.ndarray, t: float) -> np.ndarray:
    return 0.5 * np.tanh(x) + 0.3 * np.sin(t / 200.0)


def eps_torch(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return 0.5 * torch.tanh(x) + 0.3 * torch.sin(t[:, None].to(x.dtype) / 200.0)


@pytest.mark.parametrize("weighting", ["plain", "exp-eps"])
def test_ddim_eps_matches_reference_on_lambda(weighting):
    abar_all = vp_schedule()
    timesteps = list(range(999, 0, -37))
    config = abcore.ABConfig(order=3, interval=3, warmup=3, weighting=weighting)
    final = float(abar_all[0])
    abar = np.append(abar_all[timesteps], final)
    lam = abcore.lambda_from_alphas_cumprod(abar)
    by_lambda = dict(zip(lam[:-1].tolist(), timesteps))

    def ddim_step(x, eps, l0, l1):
        a, a1 = 1.0 / (1.0 + np.exp(-2.0 * l0)), 1.0 / (1.0 + np.exp(-2.0 * l1))
        x0 = (x - np.sqrt(1.0 - a) * eps) / np.sqrt(a)
        return np.sqrt(a1) * x0 + np.sqrt(1.0 - a1) * eps

    x_init = np.linspace(-2.0, 2.0, 8).reshape(2, 4)
    ref = abcore.sample(lambda x, lv: eps_np(x, by_lambda[lv]), x_init, lam, ddim_step, config)
    state = CacheState(config)
    out = sample_ddim_eps(
        eps_torch, torch.tensor(x_init), timesteps, torch.tensor(abar_all), cache=state, final_alpha_cumprod=final,
        disable=True,
    )  # fmt: skip
    np.testing.assert_allclose(out.numpy(), ref.x, rtol=1e-10, atol=1e-12)
    assert state.stats.computed == int(ref.computed.sum()) < len(timesteps)
    plain = sample_ddim_eps(
        eps_torch, torch.tensor(x_init), timesteps, abar_all, final_alpha_cumprod=final, disable=True
    )
    assert 0 < float((plain - out).abs().max() / plain.abs().max()) < 0.05


def test_ddim_bad_input():
    abar = vp_schedule()
    with pytest.raises(ValueError, match="abscissa"):
        sample_ddim_eps(eps_torch, torch.ones(1, 2), [999, 500], abar, abscissa="sigma")
    with pytest.raises(ValueError, match="timesteps"):
        sample_ddim_eps(eps_torch, torch.ones(1, 2), [999.5, 500], abar)
    with pytest.raises(ValueError, match="timesteps"):
        sample_ddim_eps(eps_torch, torch.ones(1, 2), [1000, 500], abar)
    with pytest.raises(ValueError, match="abscissa"):
        sample_ddim_eps(eps_torch, torch.ones(1, 2), [999, 500], abar, abscissa="t",
                        config=abcore.ABConfig(weighting="exp-eps"))  # fmt: skip
