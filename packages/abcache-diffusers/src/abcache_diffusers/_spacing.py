"""The scheduler's real spacing: which abscissa predictions extrapolate on, and where each call sits on it.

- Flow matching (`FlowMatch*` schedulers, `use_flow_sigmas`, `prediction_type="flow_prediction"`): the velocity is
  extrapolated on sigma, read from `scheduler.sigmas` (shift and dynamic shifting included).
- Schedulers with `_sigma_to_alpha_sigma_t` (DPM-Solver, UniPC, DEIS, SA-Solver): lambda = log(alpha_t / sigma_t)
  of `scheduler.sigmas`; VE-sigma schedulers (Euler, Euler ancestral, Heun, LMS): lambda = -log(sigma); schedulers
  with only `alphas_cumprod` (DDIM, DDPM, PNDM): lambda = 0.5 log(abar / (1 - abar)) at the integer timesteps.

Every entry of `scheduler.timesteps` is one model call, at the sigma the scheduler evaluates it (`abscissa_grid`).
Second-order schedulers (Heun, FlowMatchHeun, PNDM's Runge-Kutta warm-up) call the model twice at one abscissa;
`stages` splits their calls into strictly monotonic sequences, one history each. `SchedulerView` holds all of it for
one `set_timesteps`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import abcore
import numpy as np
import torch
from abcore import LinearSteps, lambda_from_alphas_cumprod, lambda_from_sigma

from abcache_diffusers._config import ABCacheConfig


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
    if requested == "lambda" and is_flow(scheduler) and not hasattr(scheduler, "_sigma_to_alpha_sigma_t"):
        raise ValueError(
            f"abscissa='lambda' needs a scheduler with alphas (VP / VE noise schedule), but {type(scheduler).__name__} "
            "is flow matching: use abscissa='auto' or 'sigma'"
        )
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


def resolve(scheduler: Any, config: ABCacheConfig) -> tuple[str, str]:
    """(abscissa, weighting) of `config` on `scheduler`; a ValueError names the field `scheduler` cannot run."""
    abscissa = resolve_abscissa(scheduler, config.abscissa)
    weighting = resolve_weighting(scheduler, config.weighting, abscissa)
    if config.correct is True:
        reason = "no scheduler is known" if scheduler is None else nonlinear_reason(scheduler)
        if reason is not None:
            raise ValueError(
                f"correct=True needs a step linear in the model output, but {type(scheduler).__name__}: {reason}; "
                "use correct=None (correct where possible) or False"
            )
    return abscissa, weighting


def abscissa_grid(scheduler: Any, abscissa: str) -> np.ndarray:
    """The abscissa at each entry of `scheduler.timesteps` (one model call each), float64."""
    timesteps = _numpy(scheduler.timesteps)
    n = timesteps.size
    sigmas = getattr(scheduler, "sigmas", None)
    sigmas = None if sigmas is None else _numpy(sigmas)
    if sigmas is not None and sigmas.size < n:
        sigmas = None
    interpol = getattr(scheduler, "sigmas_interpol", None)
    if sigmas is not None and interpol is not None:  # KDPM2: the second-order calls (odd entries) are in between
        sigmas, interpol = sigmas.copy(), _numpy(interpol)
        # KDPM2 evaluates call j at sigmas_interpol[j]; KDPM2-ancestral at sigmas_interpol[j - 1]
        shift = 1 if "Ancestral" in type(scheduler).__name__ else 0
        sigmas[1:n:2] = interpol[1 - shift : n - shift : 2]
    elif sigmas is not None and "DPMSolverSDE" in type(scheduler).__name__:
        # DPMSolverSDEScheduler repeats each sigma in `sigmas`, but evaluates its second-order calls (odd entries)
        # at the midpoint in log sigma of the step: sqrt(sigma_j * sigma_{j+1})
        sigmas, odd = sigmas.copy(), np.arange(1, n, 2)
        sigmas[odd] = np.sqrt(sigmas[odd - 1] * sigmas[odd])
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


NOT_STARTED = -1  # `scheduler_index`: the scheduler has not stepped yet and the call's timestep does not say


def scheduler_index(scheduler: Any, timesteps: np.ndarray, timestep: Any) -> int | None:
    """The index into `timesteps` of the call the scheduler is at; None when the call is not on this grid.

    The scheduler's own counter where it keeps one (`step_index`, `begin_index` before the first step; PNDM's
    `counter`), else the one entry of `timesteps` equal to the call's `timestep` (DDIM, DDPM, or a scheduler that has
    not stepped yet). An index past the grid (a finished run), or a timestep off the grid of a scheduler without a
    counter, gives None; a scheduler with a counter that has not stepped, and a timestep that is not one of its
    entries (FLUX passes timestep / 1000), gives `NOT_STARTED`.
    """
    n = timesteps.size
    if "PNDM" in type(scheduler).__name__:
        index = scheduler.counter
    else:
        index = getattr(scheduler, "step_index", None)
        if index is None:
            index = getattr(scheduler, "begin_index", None)
    if isinstance(index, int):
        return index if 0 <= index < n else None
    if timestep is not None:
        value = float(timestep.detach().reshape(-1)[0]) if isinstance(timestep, torch.Tensor) else float(timestep)
        matches = np.flatnonzero(timesteps == value)
        if matches.size == 1:
            return int(matches[0])
    return NOT_STARTED if hasattr(type(scheduler), "step_index") else None


def stages(grid: np.ndarray) -> np.ndarray:
    """(n,) int: the stage of each call, so that the calls of each stage have strictly monotonic abscissae.

    All zeros for a strictly monotonic grid. Where an abscissa repeats (Heun's second-order call at the next sigma,
    PNDM's Runge-Kutta steps), a call joins the first stage whose last abscissa it strictly follows.
    """
    direction = 1.0 if grid.size < 2 or grid[-1] >= grid[0] else -1.0
    last: list[float] = []
    result = np.zeros(grid.size, dtype=np.int64)
    for i, value in enumerate(grid):
        stage = next((s for s, prev in enumerate(last) if (value - prev) * direction > 0), len(last))
        if stage == len(last):
            last.append(value)
        last[stage] = value
        result[i] = stage
    return result


def nonlinear_reason(scheduler: Any) -> str | None:
    """None when `linear_steps` knows the step of `scheduler` as linear in the model output, else why not."""
    name = type(scheduler).__name__
    config = getattr(scheduler, "config", {})
    prediction = config.get("prediction_type")
    if name == "FlowMatchEulerDiscreteScheduler":
        return "stochastic_sampling=True adds fresh noise to each step" if config.get("stochastic_sampling") else None
    if name == "DDIMScheduler" and config.get("clip_sample"):
        return "clip_sample=True clips the predicted x0 (pass clip_sample=False)"
    if name == "DDIMScheduler" and config.get("thresholding"):
        return "thresholding=True thresholds the predicted x0"
    if name in ("DDIMScheduler", "EulerDiscreteScheduler"):
        if prediction not in ("epsilon", "sample", "v_prediction"):
            return f"prediction_type={prediction!r} is not one of 'epsilon', 'sample', 'v_prediction'"
        return None
    return "its step is not known here as linear in the model output alone (multistep, higher order or stochastic)"


def linear_steps(scheduler: Any) -> LinearSteps | None:
    """The coefficients (a, b) of x_{j+1} = a_j x_j + b_j out_j at every call on `scheduler.timesteps`, or None.

    Known for FlowMatchEulerDiscreteScheduler (a = 1, b = sigma_{j+1} - sigma_j), DDIMScheduler without clipping
    or thresholding (eta = 0) and EulerDiscreteScheduler (s_churn = 0); x is the scheduler's sample, before
    `scale_model_input`. None where `nonlinear_reason` gives a reason or the timesteps are not set.
    """
    if nonlinear_reason(scheduler) is not None or getattr(scheduler, "timesteps", None) is None:
        return None
    name = type(scheduler).__name__
    n = int(scheduler.timesteps.numel())
    prediction = scheduler.config.get("prediction_type")
    if name == "DDIMScheduler":
        abar = _numpy(scheduler.alphas_cumprod)
        final = float(scheduler.final_alpha_cumprod)
        t = np.rint(_numpy(scheduler.timesteps)).astype(np.int64)
        prev = t - scheduler.config.num_train_timesteps // scheduler.num_inference_steps
        current, following = abar[t], np.where(prev >= 0, abar[np.maximum(prev, 0)], final)
        pairs = [
            LinearSteps.ddim(np.sqrt([c, f]), np.sqrt([1.0 - c, 1.0 - f]), prediction)
            for c, f in zip(current, following, strict=True)
        ]
        return LinearSteps(np.concatenate([p.a for p in pairs]), np.concatenate([p.b for p in pairs]))
    sigmas = _numpy(scheduler.sigmas)
    if sigmas.size != n + 1:
        return None
    if name == "FlowMatchEulerDiscreteScheduler":
        return LinearSteps(np.ones(n), np.diff(sigmas))
    # EulerDiscreteScheduler: x' = x + dt (x - x0) / sigma, x0 by prediction type
    sigma, dt = sigmas[:-1], np.diff(sigmas)
    if prediction == "epsilon":  # x0 = x - sigma out
        return LinearSteps(np.ones(n), dt)
    if prediction == "sample":  # x0 = out
        return LinearSteps(1.0 + dt / sigma, -dt / sigma)
    # v_prediction: x0 = x / (sigma^2 + 1) - out sigma / sqrt(sigma^2 + 1)
    return LinearSteps(1.0 + dt * sigma / (sigma**2 + 1.0), dt / np.sqrt(sigma**2 + 1.0))


@dataclass(frozen=True, eq=False)
class SchedulerView:
    """One `set_timesteps` of a scheduler as AB-Cache sees it, computed once (`of`), or a run the pipeline's
    `CacheContext` describes (`of_context`: no grid, the times come with each call).

    config: the hook's. grid: (n,) the abscissa of each call. stages: (n,) the history of each call (`stages`). steps: the step
    coefficients for the correction. sigmas: the scheduler's sigmas (to check a pipeline's `CacheContext.sigma`).
    """

    config: ABCacheConfig
    scheduler: Any
    timesteps: Any  # the scheduler's timesteps tensor this view was computed from
    timestep_values: np.ndarray | None
    abscissa: str
    weighting: str
    grid: np.ndarray | None
    stages: np.ndarray
    steps: LinearSteps | None
    sigmas: np.ndarray | None
    _schedules: dict[tuple, abcore.Schedule] = field(default_factory=dict, repr=False)

    @classmethod
    def of(cls, scheduler: Any, config: ABCacheConfig) -> SchedulerView:
        """The view of `scheduler`'s current timesteps (`resolve` raises ValueError for a config it cannot run)."""
        abscissa, weighting = resolve(scheduler, config)
        grid = abscissa_grid(scheduler, abscissa)
        # DPM-SDE's midpoint calls see the noise its step injects: a history of their own (stage 1)
        sde = "DPMSolverSDE" in type(scheduler).__name__
        stage = np.arange(grid.size, dtype=np.int64) % 2 if sde else stages(grid)
        steps = linear_steps(scheduler) if not np.any(stage) else None  # the correction, the budget, the state test
        sigmas = None if getattr(scheduler, "sigmas", None) is None else _numpy(scheduler.sigmas)
        timesteps = scheduler.timesteps
        return cls(config, scheduler, timesteps, _numpy(timesteps), abscissa, weighting, grid, stage, steps, sigmas)

    @classmethod
    def of_context(
        cls, config: ABCacheConfig, num_calls: int, abscissa: str, scheduler: Any = None, timesteps: Any = None
    ) -> SchedulerView:
        """A run of `num_calls` calls known only from the pipeline's `CacheContext`: no grid, the times come with the
        calls. `scheduler` and its `timesteps`: the scheduler found not to be the running one, not read again."""
        stages = np.zeros(num_calls, np.int64)
        return cls(config, scheduler, timesteps, None, abscissa, "plain", None, stages, None, None)

    @property
    def num_calls(self) -> int:
        return int(self.stages.size)

    def locate(self, index: int) -> tuple[int, int, int]:
        """(stage, position within the stage, calls of the stage) of call `index`."""
        stage = int(self.stages[index])
        members = np.flatnonzero(self.stages == stage)
        return stage, int(np.searchsorted(members, index)), int(members.size)

    def schedule(self, stage: int, start: int) -> abcore.Schedule:
        """The `abcore.Schedule` of `stage` from its position `start` on (times None for a context run); `force`
        fits the warm-up and cool-down into a short run."""
        if (stage, start) not in self._schedules:
            members = np.flatnonzero(self.stages == stage)[start:]
            times = None if self.grid is None else self.grid[members]
            steps = None if self.steps is None else LinearSteps(self.steps.a[members], self.steps.b[members])
            ab = self.config.to_ab_config(self.weighting)
            self._schedules[stage, start] = abcore.schedule(
                ab, times, steps, num_steps=members.size, fit=self.config.force
            )
        return self._schedules[stage, start]
