"""Exact variable-step multistep (LMS) weights in torch, and k-diffusion's `sample_lms` on them."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import abcore
import torch


def multistep_table(grid: torch.Tensor, order: int) -> torch.Tensor:
    """`abcore.multistep_table` in torch: the (n, order) Adams-Bashforth weights of a schedule.

    Row i integrates the Lagrange interpolant through t_i, t_{i-1}, ... over [t_i, t_{i+1}]:
    x_{i+1} = x_i + sum_j W[i, j] f(t_{i-j}), order min(order, i + 1) at the first steps. Closed form
    (no quadrature), in the grid's dtype and device, differentiable with respect to the grid (e.g. a
    learned sigma schedule). The grid must be strictly monotonic: it is not checked here, so that the
    call stays on the device and in the autograd graph (`abcore.multistep_table` checks it in numpy).
    """
    if not isinstance(grid, torch.Tensor) or not grid.is_floating_point() or grid.ndim != 1 or grid.shape[0] < 2:
        raise ValueError(f"grid must be a 1-D floating-point tensor of >= 2 entries, got {grid!r}")
    return abcore.multistep_table(grid, order, xp=torch)


Denoiser = Callable[..., torch.Tensor]


@torch.no_grad()
def sample_lms(
    model: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    extra_args: dict[str, Any] | None = None,
    callback: Callable[[dict[str, Any]], Any] | None = None,
    disable: bool | None = None,
    order: int = 4,
) -> torch.Tensor:
    """k-diffusion's `sample_lms` with exact weights: a drop-in of the same signature and results.

    Karras' ODE dx/dsigma = d = (x - D(x, sigma)) / sigma, integrated by the linear multistep method
    x_{i+1} = x_i + sum_j W[i, j] d_{i-j}, W = `abcore.multistep_table(sigmas, order)` (order `order`,
    lower at the first steps). k-diffusion computes each W[i, j] by `scipy.integrate.quad` at every step;
    this computes the whole table once, in closed form, in float64 on the host, before the loop.
    `model(x, sigma * ones(batch), **extra_args)` returns the denoised x; `callback` gets k-diffusion's
    dict (x, i, sigma, sigma_hat, denoised). `disable` (k-diffusion's progress-bar switch) is accepted
    for the signature; there is no progress bar.
    """
    grid = abcore.as_grid(sigmas, "sigmas")
    if not (grid[:-1] > 0).all():  # the model runs at every sigma but the last, and d divides by it
        raise ValueError(
            "sigmas: LMS divides by sigma at every step, so every sigma but the last must be > 0 (k-diffusion's "
            f"schedules decrease to 0), got {grid.tolist()}"
        )
    weights = abcore.multistep_table(grid, order).tolist()
    extra_args = {} if extra_args is None else extra_args
    s_in = x.new_ones([x.shape[0]])
    derivatives: list[torch.Tensor] = []  # newest first
    for i, row in enumerate(weights):
        sigma = sigmas[i]
        denoised = model(x, sigma * s_in, **extra_args)
        derivatives = [(x - denoised) / sigma, *derivatives[: order - 1]]
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigma, "sigma_hat": sigma, "denoised": denoised})
        x = x + sum(w * d for w, d in zip(row, derivatives))
    return x
