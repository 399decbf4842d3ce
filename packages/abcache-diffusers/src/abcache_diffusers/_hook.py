"""The AB-Cache model hook: `apply_ab_cache(module, config)` / `remove_ab_cache(module)`.

One stateful `ModelHook` on the denoiser. Each call is placed on the scheduler's grid (its step index), its
abscissa (sigma or lambda) is looked up there, and the call is routed to the history of its cache context
(`cache_context("cond")`, ...). The histories, the plan and the extrapolation are `abcache_torch.CacheEngine`'s.
The contexts that start at the same step share one engine, announced the part of the grid they run, so that the
adaptive mode takes one decision per step for all of them (cond and uncond make the same calls).
"""

from __future__ import annotations

import inspect
import math
import sys
import warnings
import weakref
from collections.abc import Callable
from typing import Any, cast

import numpy as np
import torch
from abcache_torch import CacheEngine, CacheStats, input_key
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.hooks.hooks import BaseState, StateManager
from diffusers.utils.torch_utils import unwrap_module

from abcache_diffusers._config import ABCacheConfig, as_config
from abcache_diffusers._spacing import (
    _numpy,
    abscissa_grid,
    call_stages,
    linear_steps,
    nonlinear_reason,
    resolve_abscissa,
    resolve_weighting,
    step_index,
    timestep_scale,
)

AB_CACHE_HOOK = "ab_cache"
DEFAULT_CONTEXT = "default"

SchedulerSource = Any  # a scheduler, a zero-argument callable returning one, or None


class _NoState(BaseState):
    def reset(self, *args: Any, **kwargs: Any) -> None:
        pass


class _ContextTracker(StateManager):
    """Receives the pipeline's `cache_context`: a name (diffusers 0.40) or a `CacheContext` (0.41+).

    A `CacheContext` may also carry the loop's `step_index`, `sigma` and `num_inference_steps`.
    """

    def __init__(self) -> None:
        super().__init__(_NoState)  # type: ignore[arg-type]  # diffusers annotates the class as an instance
        self.set_context(None)

    def set_context(self, context: Any) -> None:
        super().set_context(context)
        named = context is None or isinstance(context, str)
        self.name: str | None = context if named else context.name
        self.step_index: int | None = None if named else getattr(context, "step_index", None)
        self.sigma: float | None = None if named else getattr(context, "sigma", None)
        self.num_steps: int | None = None if named else getattr(context, "num_inference_steps", None)

    def reset(self, *args: Any, **kwargs: Any) -> None:
        super().reset(*args, **kwargs)
        self.set_context(None)


def _timestep_value(timestep: Any) -> float:
    """The step's timestep as a float (the largest entry of a per-sample / per-token tensor)."""
    if isinstance(timestep, torch.Tensor):
        return float(timestep.detach().reshape(-1).max())
    return float(timestep)


def _add_stats(target: CacheStats, source: CacheStats) -> None:
    """Add the per-context counters of `source` to `target`."""
    for name, counters in source.contexts.items():
        into = target.context(name)
        into.computed += counters.computed
        into.predicted += counters.predicted
        into.fallbacks += counters.fallbacks
        if counters.max_error is not None:
            into.note_error(counters.max_error)


class ABCacheHook(ModelHook):
    r"""
    The stateful AB-Cache hook (see [`apply_ab_cache`]). Holds one `abcache_torch.CacheEngine` per group of cache
    contexts that start at the same step (their adaptive decisions are joint).
    """

    _is_stateful = True
    _joint = True  # False: one engine per context, each deciding alone (for measurements)

    def __init__(self, config: ABCacheConfig, scheduler: SchedulerSource = None) -> None:
        super().__init__()
        self.config = config
        self.contexts = _ContextTracker()
        self._scheduler = scheduler if scheduler is None or callable(scheduler) else (lambda: scheduler)
        self._engines: dict[tuple, CacheEngine] = {}  # by group: (start index, stage), or ("timestep",)
        self._extra = CacheStats()  # few-step-guard calls, and the counters of replaced engines
        self._timestep_position: int | None = None
        self._stale: Any = None  # the timesteps of a scheduler found not to be the running one
        self._warned: set[str] = set()
        self._running: Any = None  # the scheduler of the pipeline found on the call stack
        self._searched = False  # whether this generation looked for it
        self._module_ref: weakref.ref | None = None
        self._forget_grid()
        self._settings = self._resolve(self.scheduler)

    # ---------------------------------------------------------------- setup
    @property
    def scheduler(self) -> Any:
        """The scheduler of the running generation: that of the pipeline calling the denoiser, else the source's."""
        if self._running is not None:
            return self._running
        return None if self._scheduler is None else self._scheduler()

    def _find_running_scheduler(self) -> None:
        """At a generation's first call: the scheduler of the pipeline on the call stack that owns the denoiser.

        A pipeline made by `from_pipe(pipe, scheduler=...)` shares the denoiser but not the scheduler the hook was
        given; diffusers does not pass the scheduler to the denoiser, so the caller's frames are searched once.
        """
        module = None if self._module_ref is None else self._module_ref()
        self._searched = True
        frame: Any = sys._getframe(2)
        for _ in range(64):
            if frame is None or module is None:
                return
            owner: Any = frame.f_locals.get("self")
            components = getattr(owner, "components", None)
            if not isinstance(components, dict) or getattr(owner, "scheduler", None) is None:
                frame = frame.f_back
                continue
            if any(isinstance(c, torch.nn.Module) and unwrap_module(c) is module for c in components.values()):
                self._running = owner.scheduler
                return
            frame = frame.f_back

    def _set_context(self, module: torch.nn.Module, name: str | None) -> torch.nn.Module:
        """diffusers 0.40 sets the context through the hook (0.41+ sets `self.contexts` directly)."""
        self.contexts.set_context(name)
        return module

    def _resolve(self, scheduler: Any) -> tuple[str, str]:
        """(abscissa, weighting) on `scheduler`; raises ValueError for a config the scheduler cannot run."""
        abscissa = resolve_abscissa(scheduler, self.config.abscissa)
        weighting = resolve_weighting(scheduler, self.config.weighting, abscissa)
        if scheduler is None and (self.config.cooldown or self.config.compute_mask is not None):
            raise ValueError("cooldown and compute_mask need the step grid: pass scheduler= to apply_ab_cache")
        if self.config.correct is True:
            reason = "no scheduler is known" if scheduler is None else nonlinear_reason(scheduler)
            if reason is not None:
                raise ValueError(
                    f"correct=True needs a step linear in the model output, but {type(scheduler).__name__}: {reason}; "
                    "use correct=None (correct where possible) or False"
                )
        return abscissa, weighting

    def initialize_hook(self, module: torch.nn.Module) -> torch.nn.Module:
        signature = inspect.signature(module.forward).parameters
        parameters = list(signature)
        name = self.config.timestep_arg
        self._module_ref = weakref.ref(module)
        self._timestep_position = parameters.index(name) if name in parameters else None
        if name not in parameters and not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in signature.values()):
            raise ValueError(
                f"timestep_arg={name!r}: {type(module).__name__}.forward has no such argument (arguments: {parameters})"
            )
        return module

    def reset_state(self, module: torch.nn.Module) -> torch.nn.Module:
        """End of a pipeline call: forget every history and the grid (keeps the stats)."""
        for engine in self._engines.values():
            engine.reset()
        self._forget_grid()
        self._running, self._searched = None, False
        return module

    def _forget_grid(self) -> None:
        self._timesteps_ref: Any = None  # the scheduler.timesteps tensor the grid was computed from
        self._timesteps: np.ndarray | None = None
        self._grid: np.ndarray | None = getattr(self, "_grid", None)  # kept for inspection after the call
        self._stages: np.ndarray | None = None  # per call: its history among the calls sharing an abscissa
        self._steps: Any = None  # abcore.LinearSteps over the grid, or None
        self._sigmas: np.ndarray | None = None  # the scheduler's sigmas, to check the pipeline's CacheContext
        self._scale = 1.0
        self._next: dict[str, int] = {}  # per context: the grid index its next call should have
        self._group: dict[str, tuple] = {}  # per context: the key of its engine
        self._announced: set[tuple] = set()  # the groups announced on this grid
        self._last_index: dict[str, int] = {}
        self._repeat: dict[str, int] = {}
        self._guarded: set[str] = set()

    # ---------------------------------------------------------------- stats
    @property
    def stats(self) -> CacheStats:
        """Counters per context since the hook was applied (or `reset_stats`)."""
        merged = CacheStats()
        for source in (self._extra, *(engine.stats for engine in self._engines.values())):
            _add_stats(merged, source)
        return merged

    def reset_stats(self) -> None:
        self._extra = CacheStats()
        for engine in self._engines.values():
            engine.reset_stats()

    @property
    def abscissa(self) -> str:
        """The abscissa in use: "sigma", "lambda", "timestep" or "index"."""
        return self._settings[0]

    @property
    def weighting(self) -> str:
        """abcore's weighting in use ("exp" resolved from the scheduler's prediction_type)."""
        return self._settings[1]

    @property
    def grid(self) -> np.ndarray | None:
        """The abscissa of each step of the current call (None before the first step or without a scheduler)."""
        return None if self._grid is None else self._grid.copy()

    # ---------------------------------------------------------------- routing
    def _timestep(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        name = self.config.timestep_arg
        if name in kwargs:
            return kwargs[name]
        if self._timestep_position is not None and self._timestep_position < len(args):
            return args[self._timestep_position]
        return None

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, UserWarning, stacklevel=4)

    def _engine(self, key: tuple) -> CacheEngine:
        if key not in self._engines:
            self._engines[key] = CacheEngine(self.config.to_ab_config(self._settings[1]))
        return self._engines[key]

    def _refresh_grid(self, scheduler: Any, timestep: Any) -> tuple[np.ndarray, np.ndarray]:
        """(timesteps, abscissa grid), recomputed when the scheduler's timesteps changed (new call, steps, strength)."""
        timesteps = scheduler.timesteps
        if self._timesteps_ref is not None and timesteps is self._timesteps_ref:
            return cast(np.ndarray, self._timesteps), cast(np.ndarray, self._grid)
        settings = self._resolve(scheduler)
        if settings != self._settings:  # another scheduler was swapped in
            for engine in self._engines.values():
                _add_stats(self._extra, engine.stats)
            self._engines.clear()
            self._settings = settings
        self._forget_grid()
        values, grid = _numpy(timesteps), abscissa_grid(scheduler, settings[0])
        self._timesteps_ref, self._timesteps, self._grid = timesteps, values, grid
        self._stages = call_stages(scheduler, grid)
        sigmas = getattr(scheduler, "sigmas", None)
        self._sigmas = None if sigmas is None else _numpy(sigmas)
        if self.config.correct is not False and not np.any(self._stages):
            self._steps = linear_steps(scheduler)
        if timestep is not None:
            num_train = float(getattr(scheduler, "config", {}).get("num_train_timesteps", 1000))
            self._scale = timestep_scale(values, _timestep_value(timestep), num_train)
        return values, grid

    @torch.compiler.disable
    def _route(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[CacheEngine | None, float | None, str]:
        """(engine, time, context) of this call; engine None: run the model without caching."""
        base = self.contexts.name or DEFAULT_CONTEXT
        timestep = self._timestep(args, kwargs)
        if not self._searched:
            self._find_running_scheduler()
        scheduler = self.scheduler
        if scheduler is not None and getattr(scheduler, "timesteps", None) is not None:
            timesteps, grid = self._refresh_grid(scheduler, timestep)
            if timestep is not None or isinstance(getattr(scheduler, "step_index", None), int):
                index = self._index(scheduler, timesteps, timestep, base)
                if index is not None:
                    return self._route_on_grid(base, index, grid)
        if self._context_knows_the_step():
            return self._route_on_context(base, timestep)
        if timestep is None:
            self._warn_once("no-timestep", f"ab_cache: the call has no {self.config.timestep_arg!r}: not cached")
            return None, None, base
        if scheduler is not None:
            self._warn_once("no-grid", "ab_cache: the scheduler has no timesteps (set_timesteps): not cached")
            return None, None, base
        return self._engine(("timestep",) if self._joint else ("timestep", base)), _timestep_value(timestep), base

    def _index(self, scheduler: Any, timesteps: np.ndarray, timestep: Any, base: str) -> int | None:
        """The call's index on `timesteps`, or None when `scheduler` is not the one running (warned once).

        The pipeline's `CacheContext.step_index` when it passes one for this grid, else the scheduler's own counter,
        else the nearest timestep. Checked against the pipeline's `CacheContext.sigma`, or once per context and
        generation against the timestep received.
        """
        ctx, knows = self.contexts, self._context_knows_the_step()
        if knows and self._stale is scheduler.timesteps:
            return None
        if knows and ctx.num_steps == timesteps.size:
            index = cast(int, ctx.step_index)
        else:
            index = step_index(scheduler, timesteps, lambda: _timestep_value(timestep), self._scale)
        name, sigmas = type(scheduler).__name__, self._sigmas
        if knows and ctx.sigma is not None and sigmas is not None and index < sigmas.size:
            if not math.isclose(sigmas[index], float(ctx.sigma), rel_tol=1e-4, abs_tol=1e-6):
                self._stale = scheduler.timesteps  # until its timesteps are set again
                self._warn_once(
                    "stale",
                    f"ab_cache: the {name} the hook reads is not the running one (sigma {sigmas[index]:.6g} at step "
                    f"{index}, the pipeline passes {float(ctx.sigma):.6g}): caching on the pipeline's step_index, "
                    "sigma and num_inference_steps instead",
                )
                return None
        elif timestep is not None and self._next.get(base) != index:  # a context starts: check its timestep
            nearest = int(np.argmin(np.abs(timesteps - _timestep_value(timestep) * self._scale)))
            if timesteps[nearest] != timesteps[index]:
                self._warn_once(
                    "stale",
                    f"ab_cache: the {name} the hook reads is not the running one (its step {index} is at timestep "
                    f"{timesteps[index]:.6g}, the call's timestep is nearest its step {nearest}): placing the calls by "
                    "their timestep",
                )
                index = nearest
        return index

    def _context_knows_the_step(self) -> bool:
        """Whether the pipeline's `CacheContext` carries the loop's step_index and num_inference_steps."""
        i, n = self.contexts.step_index, self.contexts.num_steps
        return isinstance(i, int) and isinstance(n, int) and 0 <= i < n

    def _name(self, base: str, index: int) -> str:
        """`base`, or `base_1`, ... for a second call at the same step in the same context (SD3's skip-layer call)."""
        repeat = self._repeat.get(base, 0) + 1 if self._last_index.get(base) == index else 0
        self._repeat[base], self._last_index[base] = repeat, index
        return base if repeat == 0 else f"{base}_{repeat}"

    def _guard(self, name: str, remaining: int) -> bool:
        """Whether the few-step guard computes every step of the context `name` from here (warned once)."""
        if remaining < self.config.min_steps and not self.config.force:
            self._guarded.add(name)
            self._warn_once(
                "few-steps",
                f"ab_cache: {remaining} denoising steps is below min_steps={self.config.min_steps}: "
                "computing every step (pass force=True to cache anyway)",
            )
            return True
        self._guarded.discard(name)
        return False

    def _join(self, name: str, group: tuple) -> CacheEngine | None:
        """The engine of `group`, which the context `name` joins; None when the group is new (to be announced)."""
        group = group if self._joint else (*group, name)
        self._group[name] = group
        engine = self._engine(group)
        if group in self._announced:
            return None
        self._announced.add(group)
        return engine

    def _route_on_grid(self, base: str, index: int, grid: np.ndarray) -> tuple[CacheEngine | None, float | None, str]:
        name = self._name(base, index)
        stage = cast(np.ndarray, self._stages)
        if np.any(stage):  # an abscissa repeats (second-order schedulers): one history per stage
            name = f"{name}/stage{stage[index]}"
        if self._next.get(name) != index:  # the context starts (or jumps): announce the rest of the grid
            mine = index + np.flatnonzero(stage[index:] == stage[index])
            if not self._guard(name, mine.size):
                # contexts starting at the same step share an engine; the first one announces the grid
                engine = self._join(name, (index, int(stage[index])))
                if engine is not None:
                    self._announce(engine, grid[mine], index)
        following = index + 1 + np.flatnonzero(stage[index + 1 :] == stage[index])
        self._next[name] = int(following[0]) if following.size else -1
        if not following.size:  # this context's generation ends: look for the running pipeline again next call
            self._searched = False
        if name in self._guarded:
            self._extra.context(name).computed += 1
            return None, None, name
        return self._engines[self._group[name]], float(grid[index]), name

    def _route_on_context(self, base: str, timestep: Any) -> tuple[CacheEngine | None, float | None, str]:
        """Without the running scheduler: the steps the pipeline's `CacheContext` gives, decided step by step."""
        ctx = self.contexts
        index, n = cast(int, ctx.step_index), cast(int, ctx.num_steps)
        name = self._name(base, index)
        joined = self._group.get(name, (None,))[0] == "context"
        if (self._next.get(name) != index or not joined) and not self._guard(name, n - index):
            engine = self._join(name, ("context", index, n))
            if engine is not None:
                engine.set_grid(None, num_steps=n - index)
        self._next[name] = index + 1 if index + 1 < n else -1
        if index + 1 >= n:
            self._searched = False
        if name in self._guarded:
            self._extra.context(name).computed += 1
            return None, None, name
        if self.abscissa == "index":
            time = float(index)
        elif ctx.sigma is not None and (self.abscissa == "sigma" or timestep is None):
            time = float(ctx.sigma)
        elif timestep is not None:
            time = _timestep_value(timestep)
        else:
            self._warn_once("no-timestep", f"ab_cache: the call has no {self.config.timestep_arg!r}: not cached")
            return None, None, name
        return self._engines[self._group[name]], time, name

    def _announce(self, engine: CacheEngine, times: np.ndarray, index: int) -> None:
        """`engine.set_grid(times)`, with the step coefficients from `index` on where known."""
        steps = self._steps
        if steps is not None:
            engine.set_grid(times.tolist(), steps=type(steps)(steps.a[index:], steps.b[index:]))
        else:
            engine.set_grid(times.tolist())

    @staticmethod
    @torch.compiler.disable
    def _predict(engine: CacheEngine, time: float, name: str, key: tuple) -> tuple[bool, Any]:
        return engine.predict(time, name, key=key)

    @staticmethod
    @torch.compiler.disable
    def _store(engine: CacheEngine, name: str, output: Any) -> Any:
        return engine.store(output, name)

    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        engine, time, name = self._route(args, kwargs)
        forward = cast(Callable[..., Any], self.fn_ref.original_forward)
        if engine is None:
            return forward(*args, **kwargs)
        key = input_key(args, kwargs)
        predicted, output = self._predict(engine, time, name, key)
        if predicted:
            return output
        # the model runs here, outside the engine, so that torch.compile compiles it
        return self._store(engine, name, forward(*args, **kwargs))

    def __repr__(self) -> str:
        return f"ABCacheHook({self.config!r}, abscissa={self._settings[0]!r}, stats={self.stats!r})"


def _invalidate(registry: HookRegistry) -> None:
    """Drop diffusers' cached list of child registries (diffusers 0.41+; 0.40 has no such method)."""
    invalidate = getattr(registry, "invalidate_child_registries_cache", None)
    if invalidate is not None:
        invalidate()


def _reset_registry(module_ref: weakref.ref) -> None:
    module = module_ref()
    if module is not None:
        HookRegistry.check_if_exists_or_initialize(module).reset_stateful_hooks()


def apply_ab_cache(
    module: torch.nn.Module, config: ABCacheConfig | dict | None = None, scheduler: SchedulerSource = None
) -> ABCacheHook:
    r"""
    Applies [AB-Cache](https://huggingface.co/papers/2504.10540) to a denoiser (a transformer or a UNet).

    At the compute steps of the plan the denoiser runs and its output is stored; at the other steps the hook returns
    the Lagrange / Adams-Bashforth extrapolation (paper, Eq. 3.5) through the last `config.order` computed outputs
    at their real times: the scheduler's sigma (flow matching) or lambda = log(alpha / sigma) (DDIM, DPM-Solver,
    UniPC, Euler). Each `cache_context` name (`"cond"`, `"uncond"`, `"cond_uncond"`) has its own history; calls
    without one share the history `"default"` (a second call at the same step gets `"default_1"`).

    Args:
        module (`torch.nn.Module`):
            The denoiser. Its forward must take the timestep (argument `config.timestep_arg`).
        config (`ABCacheConfig`, *optional*):
            The cache settings (default `ABCacheConfig()`); a dict of its fields is accepted.
        scheduler (`SchedulerMixin` or `Callable[[], SchedulerMixin]`, *optional*):
            The pipeline's scheduler (or a function returning the current one), which gives the grid and the
            abscissa. Without it, the timestep the denoiser receives is the abscissa and no grid is known (no
            cool-down, mask or few-step guard). [`enable_ab_cache`] passes it for you.

    Returns:
        `ABCacheHook`: the hook (its `stats` count computed and predicted steps per context).

    Example:

    ```python
    >>> from abcache_diffusers import ABCacheConfig, apply_ab_cache

    >>> apply_ab_cache(pipe.transformer, ABCacheConfig(interval=3), scheduler=pipe.scheduler)
    ```
    """
    config = as_config(config)
    module = unwrap_module(module)  # a torch.compile'd module: hook the module it wraps
    registry = HookRegistry.check_if_exists_or_initialize(module)
    if registry.get_hook(AB_CACHE_HOOK) is not None:
        raise ValueError(f"AB-Cache is already applied to this {type(module).__name__}: call remove_ab_cache first")
    hook = ABCacheHook(config, scheduler)
    registry.register_hook(hook, AB_CACHE_HOOK)
    _invalidate(registry)
    # Pipelines reset stateful hooks at the end of each call through `_reset_stateful_cache`, which only
    # `CacheMixin` models define; give the others the same entry point.
    if not hasattr(module, "_reset_stateful_cache"):
        setattr(module, "_reset_stateful_cache", _ResetEntryPoint(weakref.ref(module)))  # noqa: B010
    return hook


class _ResetEntryPoint:
    """`module._reset_stateful_cache()` for models without `CacheMixin` (removed with the hook)."""

    def __init__(self, module_ref: weakref.ref) -> None:
        self.module_ref = module_ref

    def __call__(self, recurse: bool = True) -> None:
        _reset_registry(self.module_ref)


def get_ab_cache_hook(module: torch.nn.Module) -> ABCacheHook | None:
    """The AB-Cache hook applied to `module`, or None."""
    registry = getattr(unwrap_module(module), "_diffusers_hook", None)
    hook = None if registry is None else registry.get_hook(AB_CACHE_HOOK)
    return hook if isinstance(hook, ABCacheHook) else None


def _accelerate_forward(module: torch.nn.Module) -> Any:
    """The forward accelerate's `add_hook_to_module` installed over the module's previous one, or None."""
    forward = module.__dict__.get("forward")
    function = getattr(forward, "func", None)
    if "_old_forward" in module.__dict__ and getattr(function, "__module__", "").startswith("accelerate"):
        return forward
    return None


def remove_ab_cache(module: torch.nn.Module) -> None:
    r"""
    Removes AB-Cache from `module`, restoring its original forward. No-op when it is not applied.

    Args:
        module (`torch.nn.Module`):
            The denoiser [`apply_ab_cache`] was applied to.
    """
    module = unwrap_module(module)
    if get_ab_cache_hook(module) is None:
        return
    registry = HookRegistry.check_if_exists_or_initialize(module)
    # `enable_model_cpu_offload` after the hook: accelerate's forward wraps ours (kept in `_old_forward`).
    # Unwrap it, remove the hook, and wrap the restored forward again, so that offloading keeps working.
    offload_forward = _accelerate_forward(module)
    if offload_forward is not None:
        module.__dict__["forward"] = module.__dict__["_old_forward"]
    registry.remove_hook(AB_CACHE_HOOK, recurse=False)
    _invalidate(registry)
    if offload_forward is not None:
        module.__dict__["_old_forward"] = module.__dict__["forward"]
        module.__dict__["forward"] = offload_forward
    if isinstance(module.__dict__.get("_reset_stateful_cache"), _ResetEntryPoint):
        del module._reset_stateful_cache
