"""The scheduler's real spacing: which abscissa predictions extrapolate on, and where each call sits on it.

- Flow matching (`FlowMatch*` schedulers, `use_flow_sigmas`, `prediction_type="flow_prediction"`): the velocity is
  extrapolated on sigma, read from `scheduler.sigmas` (shift and dynamic shifting included).
- Schedulers with `_sigma_to_alpha_sigma_t` (DPM-Solver, UniPC, DEIS, SA-Solver): lambda = log(alpha_t / sigma_t)
  of `scheduler.sigmas`; VE-sigma schedulers (Euler, Euler ancestral, Heun, LMS): lambda = -log(sigma); schedulers
  with only `alphas_cumprod` (DDIM, DDPM, PNDM): lambda = 0.5 log(abar / (1 - abar)) at the integer timesteps.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from abcore import lambda_from_alphas_cumprod, lambda_from_sigma


def _numpy(values: Any) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        values = values.detach().to("cpu", torch.float64).numpy()
    return np.asarray(values, dtype=np.float64).reshape(-1)


def is_flow(scheduler: Any) -> bool:
    """Whether `scheduler` integrates a flow-matching ODE (velocity output, x_t = (1 - sigma) x0 + sigma noise)."""
    config = getattr(scheduler, "config", {})
    return (
        "FlowMatch" in type(scheduler).__name__
        or bool(config.get("use_flow_sigmas", False))
        or config.get("prediction_type") == "flow_prediction"
    )


def resolve_abscissa(scheduler: Any, requested: str) -> str:
    """The concrete abscissa ("sigma", "lambda", "timestep" or "index") for `requested` on `scheduler`."""
    if scheduler is None:
        if requested not in ("auto", "timestep"):
            raise ValueError(
                f"abscissa={requested!r} needs the scheduler: pass scheduler= or use enable_ab_cache(pipe)"
            )
        return "timestep"
    if requested != "auto":
        return requested
    if is_flow(scheduler):
        return "sigma"
    if hasattr(scheduler, "alphas_cumprod") or hasattr(scheduler, "sigmas"):
        return "lambda"
    return "timestep"


def resolve_weighting(scheduler: Any, weighting: str, abscissa: str) -> str:
    """abcore's weighting for `weighting` on `scheduler`: "exp" follows `prediction_type`; exp-* need lambda."""
    if weighting == "plain":
        return weighting
    prediction = getattr(scheduler, "config", {}).get("prediction_type") if scheduler is not None else None
    if weighting == "exp":
        by_prediction = {"epsilon": "exp-eps", "sample": "exp-x0"}
        if prediction not in by_prediction:
            raise ValueError(
                f"weighting='exp' needs a scheduler with prediction_type 'epsilon' or 'sample', got {prediction!r}; "
                "use weighting='plain'"
            )
        weighting = by_prediction[prediction]
    if abscissa != "lambda":
        raise ValueError(f"weighting {weighting!r} extrapolates on lambda, but the abscissa is {abscissa!r}")
    return weighting


def abscissa_grid(scheduler: Any, abscissa: str) -> np.ndarray:
    """The abscissa at each entry of `scheduler.timesteps` (one model call each), float64."""
    timesteps = _numpy(scheduler.timesteps)
    n = timesteps.size
    sigmas = getattr(scheduler, "sigmas", None)
    sigmas = None if sigmas is None else _numpy(sigmas)
    if sigmas is not None and sigmas.size < n:
        sigmas = None
    if abscissa == "index":
        return np.arange(n, dtype=np.float64)
    if abscissa == "timestep":
        return timesteps
    if abscissa == "sigma":
        if sigmas is not None:
            return sigmas[:n].copy()
        return timesteps / float(scheduler.config.get("num_train_timesteps", 1000))
    # lambda
    if sigmas is not None and hasattr(scheduler, "_sigma_to_alpha_sigma_t"):
        alpha_t, sigma_t = scheduler._sigma_to_alpha_sigma_t(torch.as_tensor(sigmas[:n], dtype=torch.float64))
        grid = np.log(_numpy(alpha_t)) - np.log(_numpy(sigma_t))
    elif sigmas is not None and not is_flow(scheduler):
        grid = lambda_from_sigma(sigmas[:n])
    elif hasattr(scheduler, "alphas_cumprod"):
        abar = _numpy(scheduler.alphas_cumprod)
        grid = lambda_from_alphas_cumprod(abar[np.rint(timesteps).astype(np.int64)])
    else:
        raise ValueError(f"{type(scheduler).__name__} has neither sigmas nor alphas_cumprod: cannot compute lambda")
    if not np.all(np.isfinite(grid)):
        raise ValueError(f"lambda is not finite on the grid of {type(scheduler).__name__}; use abscissa='sigma'")
    return grid


def timestep_scale(timesteps: np.ndarray, value: float, num_train_timesteps: float) -> float:
    """1, or `num_train_timesteps` when the denoiser receives timestep / num_train_timesteps (FLUX)."""
    raw = float(np.min(np.abs(timesteps - value)))
    scaled = float(np.min(np.abs(timesteps - value * num_train_timesteps)))
    return num_train_timesteps if scaled < raw else 1.0


def step_index(scheduler: Any, timesteps: np.ndarray, value: Callable[[], float], scale: float) -> int:
    """Index into `timesteps` of the call whose timestep is ``value()``.

    The scheduler's own `step_index` when it has one (exact, whatever dtype the timestep was cast to, and no read
    of a device tensor), else `begin_index` before the first step, else the grid entry nearest ``value() * scale``.
    """
    for attribute in ("step_index", "begin_index"):
        index = getattr(scheduler, attribute, None)
        if isinstance(index, int) and 0 <= index < timesteps.size:
            return index
    return int(np.argmin(np.abs(timesteps - value() * scale)))
