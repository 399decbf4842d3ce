"""`sample` and its steps: measured convergence order of the cached flow sampler, DDIM parity with abcore."""

from __future__ import annotations

import abcore
import numpy as np
import pytest
import torch
from abcache_torch import ddim_eps_step, flow_euler_step, sample

# dx/dsigma = A(sigma) x + b(sigma): rotation + decay on 4 components, smooth in sigma
A = torch.tensor(
    [[-0.5, 1.0, 0.0, 0.0], [-1.0, -0.5, 0.0, 0.0], [0.0, 0.0, -0.2, 2.0], [0.0, 0.0, -2.0, -0.2]],
    dtype=torch.float64,
)


def velocity(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    s = sigma[:, None]
    return x @ A.T * (1.0 + 0.5 * s) + torch.cos(2.0 * s)


def velocity_f(x: torch.Tensor, sigma: float) -> torch.Tensor:
    return velocity(x, torch.full((x.shape[0],), sigma, dtype=x.dtype))


@pytest.mark.parametrize("order", [1, 2, 3])
def test_cached_flow_sampler_converges_at_order_k(order):
    config = abcore.ABConfig(order=order, interval=3, warmup=order, cooldown=0, correct=False)
    x0 = torch.tensor([[1.0, 0.0, 0.5, 1.0]], dtype=torch.float64)
    steps = [48, 96, 192, 384]
    deviations = []
    for n in steps:
        sigmas = np.linspace(1.0, 0.0, n + 1)
        plain = sample(velocity_f, x0, sigmas, flow_euler_step, abcore.ABConfig(interval=1, cooldown=0)).x
        traj = sample(velocity_f, x0, sigmas, flow_euler_step, config)
        assert (~traj.computed).sum() > n // 2
        deviations.append(float(torch.linalg.vector_norm(traj.x - plain)))
    slope = np.polyfit(np.log(1.0 / np.array(steps)), np.log(deviations), 1)[0]
    assert abs(slope - order) < 0.35, (slope, deviations)


def test_correction_raises_the_order_of_the_cached_sampler():
    """With the steps known the predicted steps are corrected: the deviation falls faster than O(h^k)."""
    x0 = torch.tensor([[1.0, 0.0, 0.5, 1.0]], dtype=torch.float64)
    config = abcore.ABConfig(order=2, interval=3, warmup=2, cooldown=1)
    deviations = {False: [], True: []}
    for n in (48, 96, 192):
        sigmas = np.linspace(1.0, 0.0, n + 1)
        plain = sample(velocity_f, x0, sigmas, flow_euler_step, abcore.ABConfig(interval=1, cooldown=0)).x
        for correct in (False, True):
            steps = abcore.LinearSteps.euler(sigmas) if correct else None
            x = sample(velocity_f, x0, sigmas, flow_euler_step, config, steps=steps).x
            deviations[correct].append(float(torch.linalg.vector_norm(x - plain)))
    assert all(c < 0.5 * p for c, p in zip(deviations[True], deviations[False])), deviations


def test_sample_callback_and_linear_steps_without_step_fn():
    seen = []
    sigmas = np.linspace(1.0, 0.0, 7)
    x = torch.ones(2, 4, dtype=torch.float64)
    config = abcore.ABConfig(cooldown=1)
    steps = abcore.LinearSteps.euler(sigmas)
    a = sample(velocity_f, x, sigmas, flow_euler_step, config, steps=steps, callback=lambda i, x, o: seen.append(i))
    b = sample(velocity_f, x, sigmas, None, config, steps=steps)
    assert seen == list(range(6))
    torch.testing.assert_close(a.x, b.x, rtol=1e-14, atol=1e-14)
    with pytest.raises(ValueError, match="step_fn"):
        sample(velocity_f, x, sigmas, None, config)


def vp_schedule() -> np.ndarray:
    return np.cumprod(1.0 - np.linspace(1e-4, 0.02, 1000))


def eps_np(x: np.ndarray, t: float) -> np.ndarray:
    return 0.5 * np.tanh(x) + 0.3 * np.sin(t / 200.0)


def eps_torch(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return 0.5 * torch.tanh(x) + 0.3 * torch.sin(t[:, None].to(x.dtype) / 200.0)


@pytest.mark.parametrize("weighting", ["plain", "exp-eps"])
@pytest.mark.parametrize("correct", [False, True])
def test_ddim_eps_matches_reference_on_lambda(weighting, correct):
    abar_all = vp_schedule()
    timesteps = list(range(999, 0, -37))
    config = abcore.ABConfig(order=3, interval=3, warmup=3, cooldown=1, weighting=weighting, correct=correct)
    abar = np.append(abar_all[timesteps], abar_all[0])
    lam = abcore.lambda_from_alphas_cumprod(abar)
    by_lambda = dict(zip(lam[:-1].tolist(), timesteps))
    steps = abcore.LinearSteps.ddim(np.sqrt(abar), np.sqrt(1.0 - abar), "epsilon")

    def ddim_step(x, eps, l0, l1):
        a, a1 = 1.0 / (1.0 + np.exp(-2.0 * l0)), 1.0 / (1.0 + np.exp(-2.0 * l1))
        x0 = (x - np.sqrt(1.0 - a) * eps) / np.sqrt(a)
        return np.sqrt(a1) * x0 + np.sqrt(1.0 - a1) * eps

    def eps_t(x, lv):
        return eps_torch(x, torch.full((x.shape[0],), by_lambda[lv], dtype=torch.float64))

    x_init = np.linspace(-2.0, 2.0, 8).reshape(2, 4)
    ref = abcore.sample(lambda x, lv: eps_np(x, by_lambda[lv]), x_init, lam, ddim_step, config, steps=steps)
    traj = sample(eps_t, torch.tensor(x_init), lam, ddim_eps_step, config, steps=steps)
    np.testing.assert_allclose(traj.x.numpy(), ref.x, rtol=1e-10, atol=1e-12)
    np.testing.assert_array_equal(traj.computed, ref.computed)
    assert traj.computed.sum() < len(timesteps)
    by_steps = sample(eps_t, torch.tensor(x_init), lam, None, config, steps=steps)  # the same step as LinearSteps
    np.testing.assert_allclose(by_steps.x.numpy(), ref.x, rtol=1e-10, atol=1e-12)
    plain = sample(eps_t, torch.tensor(x_init), lam, ddim_eps_step, abcore.ABConfig(interval=1, cooldown=0))
    assert 0 < float((plain.x - traj.x).abs().max() / plain.x.abs().max()) < 0.05
