"""k-diffusion style samplers with AB-Cache: ``sample_xxx(model, x, grid, config=..., callback=..., disable=...)``.

The grid is announced to the cache before the loop, so each step's weights come from
``abcore.make_plan`` and the loop never reads a tensor back from the device.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import abcore
import numpy as np
import torch
from tqdm.auto import trange

from abcache_torch._state import CacheState

Callback = Callable[[dict[str, Any]], None]
ABSCISSAS = ("lambda", "t")


def _host_grid(values: Any, name: str, min_size: int) -> list[float]:
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().tolist()
    grid = np.asarray(values, dtype=np.float64)
    if grid.ndim != 1 or grid.size < min_size or not np.all(np.isfinite(grid)):
        raise ValueError(f"{name} must be a 1-D sequence of at least {min_size} finite values, got {values!r}")
    return grid.tolist()


def _engine(config: abcore.ABConfig | None, cache: CacheState | None, times: Sequence[float]) -> CacheState | None:
    """The cache that runs the loop (None: uncached), its grid announced."""
    if config is not None and cache is not None:
        raise ValueError("config and cache are exclusive: give an ABConfig or a CacheState")
    if cache is not None:
        if not isinstance(cache, CacheState):
            raise TypeError(f"cache must be an abcache_torch.CacheState, got {type(cache).__name__}")
        cache.set_grid(times)
        return cache
    if config is None:
        return None
    return CacheState(config, times, check_finite=False)


@torch.no_grad()
def sample_flow_euler(
    model: Callable[..., torch.Tensor],
    x: torch.Tensor,
    sigmas: Any,
    *,
    config: abcore.ABConfig | None = None,
    cache: CacheState | None = None,
    extra_args: dict[str, Any] | None = None,
    callback: Callback | None = None,
    disable: bool | None = None,
) -> torch.Tensor:
    """Flow-matching Euler sampler: x_{i+1} = x_i + (sigma_{i+1} - sigma_i) v_i.

    model(x, sigma, **extra_args) -> velocity v (sigma: a batch of equal values, shape (B,));
    x = (1 - sigma) x0 + sigma noise, so the clean estimate is x - sigma v. `sigmas` has n + 1
    entries for n model steps (usually ending at 0). With `config` (or a `cache`, whose stats
    stay readable afterwards) v_i is extrapolated on the sigma abscissa at predicted steps.
    callback receives {"x", "i", "sigma", "sigma_hat", "denoised", "velocity"} after each step.
    """
    grid = _host_grid(sigmas, "sigmas", 2)
    sigma_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    sigma_dev = torch.as_tensor(grid, dtype=sigma_dtype, device=x.device)
    engine = _engine(config, cache, grid[:-1])
    extra_args = {} if extra_args is None else extra_args
    s_in = x.new_ones([x.shape[0]])
    for i in trange(len(grid) - 1, disable=disable):
        sigma = sigma_dev[i] * s_in

        def call(x: torch.Tensor = x, sigma: torch.Tensor = sigma) -> torch.Tensor:
            return model(x, sigma, **extra_args)

        v = call() if engine is None else engine.step(None, call)
        x_next = x + (grid[i + 1] - grid[i]) * v
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigma_dev[i], "sigma_hat": sigma_dev[i], "denoised": x - grid[i] * v,
                      "velocity": v})  # fmt: skip
        x = x_next
    return x


@torch.no_grad()
def sample_ddim_eps(
    model: Callable[..., torch.Tensor],
    x: torch.Tensor,
    timesteps: Any,
    alphas_cumprod: Any,
    *,
    config: abcore.ABConfig | None = None,
    cache: CacheState | None = None,
    abscissa: str = "lambda",
    final_alpha_cumprod: float = 1.0,
    extra_args: dict[str, Any] | None = None,
    callback: Callback | None = None,
    disable: bool | None = None,
) -> torch.Tensor:
    """Deterministic DDIM (eta = 0) for an eps-prediction model on a VP schedule.

    model(x, t, **extra_args) -> eps, with t the integer timestep as a (B,) long tensor.
    With abar = alphas_cumprod[t]: x0 = (x - sqrt(1 - abar) eps) / sqrt(abar),
    x_next = sqrt(abar_next) x0 + sqrt(1 - abar_next) eps, abar_next the next timestep's value
    (`final_alpha_cumprod` after the last). `timesteps` are the n model steps, usually decreasing.
    At predicted steps eps is extrapolated on `abscissa`: "lambda" (default, the half log-SNR
    log(alpha / sigma) of abcore.lambda_from_alphas_cumprod, the paper's variable; needed by the
    "exp-eps" weighting of Eq. 3.6) or "t" (the timestep itself).
    callback receives {"x", "i", "t", "denoised", "eps"} after each step.
    """
    if abscissa not in ABSCISSAS:
        raise ValueError(f"abscissa must be one of {ABSCISSAS}, got {abscissa!r}")
    steps = _host_grid(timesteps, "timesteps", 1)
    if any(s != int(s) for s in steps):
        raise ValueError(f"timesteps must be integers (indices into alphas_cumprod), got {steps!r}")
    abar_all = np.asarray(_host_grid(alphas_cumprod, "alphas_cumprod", 1))
    index = np.asarray(steps, dtype=np.int64)
    if index.min() < 0 or index.max() >= abar_all.size:
        raise ValueError(f"timesteps must index alphas_cumprod (size {abar_all.size}), got {steps!r}")
    if not 0.0 < final_alpha_cumprod <= 1.0:
        raise ValueError(f"final_alpha_cumprod must lie in (0, 1], got {final_alpha_cumprod!r}")
    abar = np.append(abar_all[index], final_alpha_cumprod)
    times = abcore.lambda_from_alphas_cumprod(abar[:-1]).tolist() if abscissa == "lambda" else steps
    if config is not None and config.weighting != "plain" and abscissa != "lambda":
        raise ValueError(f"weighting={config.weighting!r} needs abscissa='lambda', got {abscissa!r}")
    engine = _engine(config, cache, times)
    extra_args = {} if extra_args is None else extra_args
    t_dev = torch.as_tensor(index, device=x.device)
    s_in = torch.ones([x.shape[0]], dtype=torch.long, device=x.device)
    for i in trange(len(steps), disable=disable):
        t = t_dev[i] * s_in

        def call(x: torch.Tensor = x, t: torch.Tensor = t) -> torch.Tensor:
            return model(x, t, **extra_args)

        eps = call() if engine is None else engine.step(None, call)
        a, a_next = float(abar[i]), float(abar[i + 1])
        x0 = (x - (1.0 - a) ** 0.5 * eps) / a**0.5
        x_next = a_next**0.5 * x0 + (1.0 - a_next) ** 0.5 * eps
        if callback is not None:
            callback({"x": x, "i": i, "t": t_dev[i], "denoised": x0, "eps": eps})
        x = x_next
    return x
