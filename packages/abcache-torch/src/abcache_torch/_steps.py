"""`sample`: `abcore.sample` in PyTorch, and two sampler steps (flow-matching Euler, DDIM on lambda).

The loop runs one `ContextState` on the grid's `abcore.Schedule`: it reads no time back from the device.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import abcore
import numpy as np
import torch

from abcache_torch._state import ContextState

ModelFn = Callable[[torch.Tensor, float], Any]
StepFn = Callable[[torch.Tensor, Any, float, float], torch.Tensor]


def flow_euler_step(x: torch.Tensor, out: torch.Tensor, t: float, t_next: float) -> torch.Tensor:
    """Flow-matching Euler: x_next = x + (t_next - t) v (``LinearSteps.euler``: a = 1, b = t_next - t)."""
    return x + (t_next - t) * out


def ddim_eps_step(x: torch.Tensor, eps: torch.Tensor, lam: float, lam_next: float) -> torch.Tensor:
    """Deterministic DDIM (eta = 0) for an eps-prediction on the half log-SNR lambda = log(alpha / sigma).

    x_next = alpha' x0 + sigma' eps with x0 = (x - sigma eps) / alpha, written as the first-order DPM-Solver
    update x_next = (alpha'/alpha) x - sigma' (e^h - 1) eps, h = lambda' - lambda (the same formula as
    ``abcache_jax.ddim_eps_step``); alpha^2 = sigmoid(2 lambda), sigma^2 = sigmoid(-2 lambda) (variance
    preserving); ``LinearSteps.ddim(..., "epsilon")`` has its coefficients.
    """
    alpha = (1.0 / (1.0 + math.exp(-2.0 * lam))) ** 0.5
    alpha1, sigma1 = (1.0 / (1.0 + math.exp(-2.0 * lam_next))) ** 0.5, (1.0 / (1.0 + math.exp(2.0 * lam_next))) ** 0.5
    return (alpha1 / alpha) * x - sigma1 * math.expm1(lam_next - lam) * eps


@torch.no_grad()
def sample(
    model_fn: ModelFn,
    x: torch.Tensor,
    grid: Any,
    step_fn: StepFn | None,
    config: abcore.ABConfig,
    *,
    steps: abcore.LinearSteps | None = None,
    callback: Callable[[int, torch.Tensor, Any], None] | None = None,
    check_finite: bool = True,
    process_group: Any = None,
) -> abcore.Trajectory:
    """`abcore.sample` with torch tensors: x_{i+1} = step_fn(x_i, out_i, grid[i], grid[i+1]).

    `grid` has n + 1 entries for n steps (the model is never called at the last). out_i is
    model_fn(x_i, grid[i]) (the time a Python float) at computed steps, corrected with `steps`
    (``config.correct``), and the extrapolation sum_j w_j H_j (Eq. 3.5) at predicted ones. With
    `steps` and no `step_fn` the step is a_i x_i + b_i out_i. `check_finite` and `process_group` (the ranks
    that sample one batch split between them) as in `ContextState`. Returns ``abcore.Trajectory(x, computed, outputs)``.
    """
    t = abcore.as_grid(grid)
    n = t.size - 1
    if step_fn is None and steps is None:
        raise ValueError("step_fn is required unless steps=LinearSteps(...) gives the step")
    state = ContextState(abcore.schedule(config, t[:-1], steps), check_finite=check_finite, process_group=process_group)
    computed = np.zeros(n, dtype=bool)
    outputs = []
    for i in range(n):
        leaves = state.predict(i)
        if leaves is None:
            out = state.record(i, model_fn(x, float(t[i])))
            computed[i] = True
        else:
            out = state.skip(i, leaves)
        outputs.append(out)
        if step_fn is None:
            x = float(steps.a[i]) * x + float(steps.b[i]) * out  # type: ignore[union-attr]
        else:
            x = step_fn(x, out, float(t[i]), float(t[i + 1]))
        if callback is not None:
            callback(i, x, out)
    return abcore.Trajectory(x, computed, outputs)
