"""One sampling run of a patched model: its `abcore.Schedule`, one `ContextState` per cache context, the wrappers.

ComfyUI hands every wrapper what it needs, so nothing is guessed:

- ``OUTER_SAMPLE`` (`outer_sample_wrapper`) sees the run's sigma list before the sampler starts. It builds one
  `Run` (the schedule of ``sigmas[:-1]``, the sampler's linear step when there is one), puts it in a clone of
  the guider's ``transformer_options`` and logs its counters once when the run ends, however it ends.
- ``DIFFUSION_MODEL`` (`diffusion_model_wrapper`) sees each denoiser call with the sigma of the call and the
  cond ``uuids`` of its batch in ``transformer_options``. The call's step is the index of that sigma in the
  run's list (an exact match: a sampler's intermediate sigmas are not steps and run uncached); its context is
  the tuple of uuids (positive / negative, or both batched together). Each context runs abcache-torch's
  `ContextState` transition: ``predict(i)``, then ``record(i, output)`` or ``skip(i, leaves)``.

The correction of predicted steps needs the sampler's step as x_{j+1} = a_j x_j + b_j out_j in the
diffusion model's own output. ComfyUI's "euler" and "ddim" take x_{j+1} = x_j + h_j (x_j - D_j) / sigma_j with
``D = model_sampling.calculate_denoised(sigma, out, x)``; when D = c_skip(sigma) x + c_out(sigma) out (EPS,
V-prediction, flow / CONST, X0: probed, not assumed) the step is linear with a_j = 1 + h_j (1 - c_skip) / sigma_j
and b_j = -h_j c_out / sigma_j. CFG mixes the contexts with constant weights that sum to one, so each
context's own correction adds up to the correction of the mixed output. Any other sampler, a churn, an
inpainting mask, a custom CFG function or guider, or an output that is not affine: no correction, said once.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any, cast

import abcore
import numpy as np
import torch
from abcache_torch import CacheStats, ContextState

KEY = "abcache"
log = logging.getLogger("abcache_comfyui")


@dataclass(frozen=True)
class Settings:
    """What the node was given; stored in the patched model's ``transformer_options["abcache"]``.

    config: the AB-Cache settings (`abcore.ABConfig`): a call budget (the default) is placed on each run's
        sigmas, a fixed schedule's warm-up and cool-down are fitted to each run (`run_config`).
    start_percent, end_percent: the part of the run where steps may be predicted, as ComfyUI's other cache
        nodes have it (``model_sampling.percent_to_sigma``): a step whose sigma is above the start sigma or
        at or below the end sigma computes.
    verbose: log each step's decision.
    """

    config: abcore.ABConfig
    start_percent: float = 0.0
    end_percent: float = 1.0
    verbose: bool = False

    def __post_init__(self) -> None:
        if not 0.0 <= self.start_percent <= self.end_percent <= 1.0:
            raise ValueError(
                f"start_percent and end_percent must satisfy 0 <= start <= end <= 1, got "
                f"{self.start_percent} and {self.end_percent}"
            )


def grid_of(sigmas: torch.Tensor) -> np.ndarray:
    """The run's sigmas as float64 (exact: each float32 value is a float64)."""
    return sigmas.detach().to("cpu", torch.float64).numpy().reshape(-1)


def affine_denoised(model_sampling: Any, sigma: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """(c_skip, c_out) with ``calculate_denoised(sigma, out, x) = c_skip x + c_out out``, or None if not affine."""
    s = torch.as_tensor(sigma, dtype=torch.float64)
    n = s.shape[0]

    def denoised(out: float, x: float) -> np.ndarray:
        o = torch.full((n, 1), out, dtype=torch.float64)
        xx = torch.full((n, 1), x, dtype=torch.float64)
        with torch.no_grad():
            return np.asarray(model_sampling.calculate_denoised(s, o, xx).to(torch.float64)).reshape(n)

    try:
        zero, c_out, c_skip, probe = denoised(0.0, 0.0), denoised(1.0, 0.0), denoised(0.0, 1.0), denoised(2.0, -3.0)
    except Exception:  # a model sampling that does not take these shapes: no correction
        return None
    scale = np.maximum(1.0, np.abs(c_out) + np.abs(c_skip))
    affine = np.allclose(zero, 0.0, atol=1e-6) and np.allclose(probe, 2 * c_out - 3 * c_skip, atol=1e-6 * scale)
    return (c_skip, c_out) if affine and np.all(np.isfinite(c_out)) else None


def euler_steps(
    sampler: Any, denoise_mask: Any, guider: Any, grid: np.ndarray
) -> tuple[abcore.LinearSteps | None, str]:
    """The sampler's step as `abcore.LinearSteps` in the diffusion model's output, or (None, why not)."""
    import comfy.k_diffusion.sampling as k_sampling
    import comfy.samplers

    function = getattr(sampler, "sampler_function", None)
    name = getattr(function, "__name__", type(sampler).__name__)
    if function is not k_sampling.sample_euler:
        return None, f"sampler {name} is not euler / ddim, whose step is linear in the model output"
    if float(getattr(sampler, "extra_options", {}).get("s_churn", 0.0)) > 0:
        return None, "euler with s_churn > 0 adds noise at each step"
    if denoise_mask is not None:
        return None, "an inpainting mask mixes the latent into each step"
    options = guider.model_options
    if options.get("sampler_cfg_function") or options.get("sampler_post_cfg_function"):
        return None, "a custom CFG function may mix the outputs non-linearly"
    if options.get("sampler_pre_cfg_function"):
        return None, "a pre-CFG function may change the outputs"
    if type(guider).predict_noise is not comfy.samplers.CFGGuider.predict_noise:
        return None, f"the guider {type(guider).__name__} combines the outputs its own way"
    sigma, h = grid[:-1], np.diff(grid)
    if np.any(sigma <= 0) or np.any(h == 0):
        return None, "the sigma list repeats a value or reaches 0 before its end"
    coefficients = affine_denoised(guider.model_patcher.model.model_sampling, sigma)
    if coefficients is None:
        return None, "the model's denoised output is not affine in its output"
    c_skip, c_out = coefficients
    try:
        return abcore.LinearSteps(1.0 + h * (1.0 - c_skip) / sigma, -h * c_out / sigma), "euler"
    except ValueError as error:  # b = 0 somewhere (an output the step does not use)
        return None, str(error)


def run_config(
    settings: Settings, grid: np.ndarray, model_sampling: Any, steps: abcore.LinearSteps | None
) -> abcore.ABConfig:
    """The run's `ABConfig`: the node's, fitted to n steps, with the start / end range as a compute mask.

    `abcore.schedule(..., fit=True)` places a call budget on the run's sigmas (with the sampler's `steps`, by
    its sensitivity) and fits a given warm-up and cool-down into the budget, or the fixed schedule's into n.
    Steps outside the start / end range are added as computed steps (a budget then becomes its mask plus these).
    """
    config = settings.config
    placed = abcore.schedule(config, grid[:-1], steps, fit=True)
    fitted, mask = placed.config, cast(np.ndarray, placed.forced)  # the times are given: n is known
    start = model_sampling.percent_to_sigma(settings.start_percent)
    end = model_sampling.percent_to_sigma(settings.end_percent)
    outside = (grid[:-1] > start) | (grid[:-1] <= end)
    if outside.any():
        mask = mask | outside
        fitted = dataclasses.replace(fitted, calls=None, speedup=None, compute_mask=tuple(bool(m) for m in mask))
    correct = steps is not None and config.correct is not False
    return dataclasses.replace(fitted, correct=None if correct else False)


@dataclass
class Context:
    """One cache context of a run: its transition, the inputs it was made for, and its last step's answer."""

    state: ContextState
    signature: Hashable
    last: tuple[int, Any] | None = None  # (step, its predicted output, or None if it computed)


class Run:
    """One sampling run: the schedule, the contexts by uuids, the counters of what was computed and skipped."""

    def __init__(self, settings: Settings, sigmas: torch.Tensor, sampler: Any, denoise_mask: Any, guider: Any):
        self.settings = settings
        grid = grid_of(sigmas)
        self.num_steps = grid.size - 1
        model_sampling = guider.model_patcher.model.model_sampling
        steps: abcore.LinearSteps | None = None
        self.correction = "off: the node's correct input is False"
        self.schedule: abcore.Schedule | None = None
        if self.num_steps >= 1:
            # the sampler's linear step places the budget and scales the adaptive test, with or without correction
            steps, why = euler_steps(sampler, denoise_mask, guider, grid)
            if settings.config.correct is not False:
                self.correction = "on (euler)" if steps is not None else f"off: {why}"
            config = run_config(settings, grid, model_sampling, steps)
            self.schedule = abcore.schedule(config, grid[:-1], steps)
        self.index: dict[float, list[int]] = {}
        for i, s in enumerate(grid[:-1].tolist()):
            self.index.setdefault(s, []).append(i)
        self.contexts: dict[Hashable, Context] = {}
        self.stats = CacheStats()
        self.seen: set[int] = set()
        self.computed: set[int] = set()
        self.uncached = 0  # calls at a sigma that is not one of the run's steps
        self.repeats = 0  # further calls at a computed step (a two-stage sampler's second evaluation)
        self.reused = 0  # further calls at a predicted step, answered by the same prediction
        self.restarts = 0  # contexts started over on a new input shape

    def step_of(self, sigma: Any, context: Context | None) -> int | None:
        """The step whose sigma the call's sigma equals exactly, or None (not a step of this run)."""
        if sigma is None:
            return None
        values = torch.as_tensor(sigma).detach().reshape(-1).to("cpu", torch.float64).tolist()
        if not values or any(v != values[0] for v in values):
            return None
        candidates = self.index.get(values[0])
        if not candidates:
            return None
        if len(candidates) == 1 or context is None:
            return candidates[0]
        following = [i for i in candidates if i >= context.state.step - 1]
        return following[0] if following else candidates[-1]

    def call(self, executor: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any], options: dict) -> Any:
        """One diffusion-model call: predicted, or computed and recorded, or passed through uncached."""
        if self.schedule is None:
            return executor(*args, **kwargs)
        key = tuple(str(u) for u in options.get("uuids") or ()) or ("default",)
        signature = input_signature(args, kwargs)
        context = self.contexts.get(key)
        if context is not None and context.signature != signature:
            self.restarts += 1
            context = None
        i = self.step_of(options.get("sigmas"), context)
        if i is None:
            self.uncached += 1
            return executor(*args, **kwargs)
        if context is None:
            stats = self.stats.context(f"context{len(self.stats.contexts)}")
            context = Context(ContextState(self.schedule, stats), signature)
            context.state.restart(i)
            self.contexts[key] = context
        state = context.state
        self.seen.add(i)
        if context.last is not None and context.last[0] == i and state.step == i + 1:  # a second call at step i
            if context.last[1] is not None:
                self.reused += 1
                return context.last[1]  # a predicted step answers every call at its sigma alike
            self.repeats += 1
            return executor(*args, **kwargs)
        if self.schedule.config.adaptive:  # one decision for the contexts at step i: cond and uncond alike
            leaves = state.predict(i, peers=[c.state for c in self.contexts.values()])
        else:
            leaves = state.predict(i)
        if leaves is None:
            output = state.record(i, executor(*args, **kwargs))
            context.last = (i, None)
            self.computed.add(i)
        else:
            output = state.skip(i, leaves)
            context.last = (i, output)
        if self.settings.verbose:
            what = "computed" if leaves is None else "predicted"
            log.info("AB-Cache [verbose] - step %d/%d %s (context %s)", i, self.num_steps, what, key)
        return output

    def summary(self) -> str:
        """What the run computed and skipped (logged once when it ends)."""
        skipped = len(self.seen - self.computed)
        steps = len(self.seen)
        calls = self.stats.computed + self.repeats + self.uncached
        saved = self.stats.predicted + self.reused
        speedup = (calls + saved) / calls if calls else 1.0
        text = (
            f"AB-Cache - skipped {skipped}/{steps} steps, saved {saved} of {calls + saved} model calls "
            f"({speedup:.2f}x); correction {self.correction}"
        )
        if self.uncached:
            text += f"; {self.uncached} calls at sigmas off the run's list ran uncached (a multi-stage sampler)"
        if self.restarts:
            text += f"; {self.restarts} context restarts on a new input shape"
        return text


def input_signature(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Hashable:
    """Shapes, dtypes and devices of the call's tensors: a change (batch, resolution) starts a fresh context."""
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    tensors += [kwargs[k] for k in sorted(kwargs) if isinstance(kwargs[k], torch.Tensor)]
    return tuple((tuple(t.shape), t.dtype, t.device) for t in tensors)


def transformer_options_of(args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict | None:
    """The ``transformer_options`` of a diffusion-model call (a keyword, or the last positional argument)."""
    options = kwargs.get("transformer_options")
    if isinstance(options, dict):
        return options
    for value in reversed(args):
        if isinstance(value, dict):
            return value
    return None


def diffusion_model_wrapper(executor: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``WrappersMP.DIFFUSION_MODEL``: route the call to the run's context, or run it as is outside a run."""
    options = transformer_options_of(args, kwargs)
    run = None if options is None else options.get(KEY)
    if options is None or not isinstance(run, Run):
        return executor(*args, **kwargs)
    return run.call(executor, args, kwargs, options)


def outer_sample_wrapper(executor: Any, *args: Any, **kwargs: Any) -> Any:
    """``WrappersMP.OUTER_SAMPLE``: a fresh `Run` for this sampling run, logged and dropped when it ends."""
    import comfy.model_patcher

    guider = executor.class_obj
    original = guider.model_options
    names = ("noise", "latent_image", "sampler", "sigmas", "denoise_mask")
    bound = dict(zip(names, args, strict=False)) | {k: v for k, v in kwargs.items() if k in names}
    guider.model_options = comfy.model_patcher.create_model_options_clone(original)
    options = guider.model_options["transformer_options"]
    settings = options.get(KEY)
    run = None
    try:
        if isinstance(settings, Settings):
            run = Run(settings, bound["sigmas"], bound["sampler"], bound.get("denoise_mask"), guider)
            options[KEY] = run
            log.info("AB-Cache enabled - %s, %d steps", describe(run), run.num_steps)
        return executor(*args, **kwargs)
    finally:
        if run is not None:
            log.info(run.summary(), extra={"abcache_run": run})
        guider.model_options = original


def describe(run: Run) -> str:
    """The run's settings, for the log: the budget and where it went, or the fixed / adaptive schedule."""
    settings, c = run.settings, run.settings.config
    if c.budgeted:
        if c.calls is not None:
            rule = f"calls={c.calls}"
        else:
            rule = f"floor(steps / {c.speedup})" if c.speedup is not None else "5 + steps // 5"
        calls = f"{c.budget(run.num_steps)} calls ({rule})" if run.num_steps >= 1 else f"{rule} calls"
        sensitive = run.schedule is not None and run.schedule.sensitivity is not None
        placed = "by the sampler's sensitivity" if sensitive else "evenly"
        mode = f"a budget of {calls} placed {placed}"
    else:
        mode = f"tolerance {c.tolerance}, interval {c.interval}" if c.adaptive else f"interval {c.interval}"
    text = f"order {c.order}, {mode}"
    for name in ("warmup", "cooldown"):
        value = getattr(c, name)
        if value is not None:
            text += f", {name} {value}"
    if settings.start_percent > 0.0 or settings.end_percent < 1.0:
        text += f", start_percent {settings.start_percent}, end_percent {settings.end_percent}"
    return text
