"""The AB-Cache model hook: `apply_ab_cache(module, config)` / `remove_ab_cache(module)`.

One stateful `ModelHook` on the denoiser, shaped like diffusers' own caches: a `StateManager` keeps one small
state per cache context (`cache_context("cond")`, ...), here an `abcache_torch.ContextState` per stage of the
scheduler. Each call is placed by its step index, taken from what diffusers hands over: the pipeline's
`CacheContext.step_index`, else the scheduler the hook follows (its `step_index`, or the call's timestep on its
`timesteps`). The scheduler's grid, abscissa and step coefficients are read once per `set_timesteps`
(`SchedulerView`); a new `set_timesteps` starts a new run, so a failed or interrupted call never leaks into the
next one. Without a scheduler, `abcache_torch.ABCache` places the calls by their timestep.
"""

from __future__ import annotations

import dataclasses
import inspect
import warnings
import weakref
from collections.abc import Callable
from typing import Any, cast

import numpy as np
import torch
from abcache_torch import DEFAULT_CONTEXT, ABCache, CacheStats, ContextState, input_key
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.hooks.hooks import BaseState, StateManager
from diffusers.utils.torch_utils import unwrap_module

from abcache_diffusers._config import ABCacheConfig, as_config
from abcache_diffusers._spacing import (
    NOT_STARTED,
    SchedulerView,
    resolve,
    resolve_abscissa,
    resolve_weighting,
    scheduler_index,
)

AB_CACHE_HOOK = "ab_cache"
FOLLOW_HINT = (
    "the denoiser is shared with a pipeline whose scheduler the hook does not follow (one made with "
    "from_pipe(pipe, scheduler=...)?): call enable_ab_cache(that_pipeline) to follow its scheduler"
)

SchedulerSource = Any  # a scheduler, a zero-argument callable returning one, or None


class _Branch(BaseState):
    """One cache context: its `ContextState` per (stage, repeat), each with the stage position it started at.

    A stage separates calls that share an abscissa (second-order schedulers); a repeat, a second call at the
    same step in the same context (SD3's skip-layer guidance). `None` instead of a state: the few-step guard
    computes that run.
    """

    def __init__(self) -> None:
        # (stage, repeat) -> (state, the position it started at, the inputs' `input_key`: a change starts over)
        self.runs: dict[tuple[int, int], tuple[ContextState | None, int, Any]] = {}
        self.last: tuple[int, int] | None = None  # (call index, repeat) of the previous call

    def reset(self, *args: Any, **kwargs: Any) -> None:
        self.__init__()  # type: ignore[misc]


class _States(StateManager):
    """The hook's `StateManager`: a `_Branch` per context name; diffusers 0.40 sets names, 0.41+ `CacheContext`s
    that may also carry the loop's `step_index`, `sigma` and `num_inference_steps`. No context: "default"."""

    def __init__(self) -> None:
        super().__init__(_Branch)  # type: ignore[arg-type]  # diffusers annotates the class as an instance
        self.current: Any = None  # what the pipeline set (diffusers keeps it as `_current_context` before 0.42)

    def set_context(self, context: Any) -> None:
        super().set_context(context)
        self.current = context

    def reset(self, *args: Any, **kwargs: Any) -> None:
        super().reset(*args, **kwargs)
        self.current = None

    @property
    def name(self) -> str:
        context = self.current
        name = context if context is None or isinstance(context, str) else context.name
        return name or DEFAULT_CONTEXT

    def step_info(self) -> tuple[int | None, int | None, float | None]:
        """(step_index, num_inference_steps, sigma) the pipeline's `CacheContext` carries (None where it does not)."""
        index, n, sigma = (getattr(self.current, k, None) for k in ("step_index", "num_inference_steps", "sigma"))
        if not (isinstance(index, int) and isinstance(n, int) and 0 <= index < n):
            return None, None, None
        return index, n, None if sigma is None else float(sigma)

    def get_state(self) -> _Branch:
        name = self.name
        if name not in self._state_cache:
            self._state_cache[name] = _Branch()
        return cast(_Branch, self._state_cache[name])

    def branches(self) -> list[_Branch]:
        return list(self._state_cache.values())

    def clear(self) -> None:
        """Forget every context's state (a new run), keeping the context the pipeline has set."""
        self._state_cache.clear()


def model_parallel_group(module: torch.nn.Module) -> Any:
    """The process group of the ranks that run `module` together (diffusers' `enable_parallelism`), or None."""
    config = getattr(module, "_parallel_config", None)
    for part, mesh in (("context_parallel_config", "_flattened_mesh"), ("tensor_parallel_config", "_mesh")):
        found = getattr(getattr(config, part, None), mesh, None)
        if found is not None:
            return found.get_group()
    return None


class ABCacheHook(ModelHook):
    r"""
    The stateful AB-Cache hook (see [`apply_ab_cache`]): one `abcache_torch.ContextState` per cache context and stage,
    in a diffusers `StateManager`; the scheduler's view of the running call.
    """

    _is_stateful = True

    def __init__(self, config: ABCacheConfig, scheduler: SchedulerSource = None) -> None:
        super().__init__()
        self.config = config
        self.state_manager = _States()
        self.view: SchedulerView | None = None  # the running call's scheduler (or CacheContext) view
        self._scheduler: Callable[[], Any] | None = None
        self.follow(scheduler)
        self._stats = CacheStats()  # the counters of the scheduler runs, since the hook was applied
        self._fallback: ABCache | None = None  # without a scheduler: ABCache places the calls by their timestep
        self._timestep_position: int | None = None
        self._warned: set[str] = set()

    def follow(self, scheduler: SchedulerSource) -> None:
        """Follow `scheduler` (a scheduler or a function returning the current one) from the next call on."""
        source = scheduler if scheduler is None or callable(scheduler) else (lambda: scheduler)
        resolve(None if source is None else source(), self.config)
        self._scheduler, self.view = source, None
        self.state_manager.clear()

    # ---------------------------------------------------------------- diffusers' hook interface
    def initialize_hook(self, module: torch.nn.Module) -> torch.nn.Module:
        signature = inspect.signature(module.forward).parameters
        parameters = list(signature)
        name = self.config.timestep_arg
        self._timestep_position = parameters.index(name) if name in parameters else None
        if name not in parameters and not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in signature.values()):
            raise ValueError(
                f"timestep_arg={name!r}: {type(module).__name__}.forward has no such argument (arguments: {parameters})"
            )
        return module

    def _set_context(self, module: torch.nn.Module, name: str | None) -> torch.nn.Module:
        """diffusers 0.40 sets the context through the hook (0.41+ sets the `StateManager` directly)."""
        self.state_manager.set_context(cast(Any, name))
        return module

    def reset_state(self, module: torch.nn.Module) -> torch.nn.Module:
        """End of a pipeline call: forget every history (keeps the stats and the view, whose run has ended)."""
        self.state_manager.reset()
        if self._fallback is not None:
            self._fallback.reset()
        return module

    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        forward = cast(Callable[..., Any], self.fn_ref.original_forward)
        place = self._place(module, args, kwargs)
        if place is None:
            return forward(*args, **kwargs)
        if isinstance(place, ABCache):
            with place.context(self.state_manager.name):
                return place(*args, **kwargs)
        state, i, time = place
        leaves = self._predict(state, i, time)
        if leaves is not None:
            return self._skip(state, i, leaves, time)
        # the model runs here, outside the state, so that torch.compile compiles it
        return self._record(state, i, forward(*args, **kwargs), time)

    # ---------------------------------------------------------------- what the hook shows
    @property
    def stats(self) -> CacheStats:
        """Counters per context since the hook was applied (or `reset_stats`)."""
        return self._stats if self._fallback is None else self._stats + self._fallback.stats

    def reset_stats(self) -> None:
        self._stats = CacheStats()
        if self._fallback is not None:
            self._fallback.reset_stats()
        self.state_manager.clear()

    @property
    def scheduler(self) -> Any:
        """The scheduler the hook follows (None without one)."""
        return None if self._scheduler is None else self._scheduler()

    @property
    def abscissa(self) -> str:
        """The abscissa in use: "sigma", "lambda", "timestep" or "index"."""
        return self.view.abscissa if self.view is not None else resolve_abscissa(self.scheduler, self.config.abscissa)

    @property
    def weighting(self) -> str:
        """abcore's weighting in use ("exp" resolved from the scheduler's prediction_type)."""
        if self.view is not None:
            return self.view.weighting
        return resolve_weighting(self.scheduler, self.config.weighting, self.abscissa)

    @property
    def grid(self) -> np.ndarray | None:
        """The abscissa of each call of the last run (None before it or without a scheduler)."""
        return None if self.view is None or self.view.grid is None else self.view.grid.copy()

    # ---------------------------------------------------------------- placing a call
    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, UserWarning, stacklevel=5)

    def _group(self, module: torch.nn.Module) -> Any:
        """The ranks that decide together: the config's group, "auto" resolved on the module (now)."""
        group = self.config.process_group
        return model_parallel_group(module) if isinstance(group, str) else group

    def _timestep(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        name = self.config.timestep_arg
        if name in kwargs:
            return kwargs[name]
        if self._timestep_position is not None and self._timestep_position < len(args):
            return args[self._timestep_position]
        return None

    def _running_view(self) -> SchedulerView | None:
        """The view of the followed scheduler's current timesteps: a new one (a new run) after `set_timesteps`."""
        scheduler = self.scheduler
        if scheduler is None or getattr(scheduler, "timesteps", None) is None:
            return None
        view = self.view
        if view is None or view.scheduler is not scheduler or view.timesteps is not scheduler.timesteps:
            view = self.view = SchedulerView.of(scheduler, self.config)
            self.state_manager.clear()  # a new run: forget every context (the stats stay)
        return view

    @torch.compiler.disable
    def _place(
        self, module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[ContextState, int, Any] | Any:
        """(state, index, time) of this call; None: run the model uncached; an `ABCache`: let it place the call."""
        states = self.state_manager
        step, num_steps, sigma = states.step_info()
        view = self._running_view()
        index = None
        if view is not None and view.grid is not None:  # the followed scheduler's run
            index = self._scheduler_index(view, step, num_steps, self._timestep(args, kwargs))
            expected = None if index is None or view.sigmas is None or index >= view.sigmas.size else view.sigmas[index]
            if expected is not None and sigma is not None and not np.isclose(expected, sigma, rtol=1e-4, atol=1e-6):
                self._warn_once(
                    "stale",
                    f"ab_cache: the {type(view.scheduler).__name__} the hook follows is not the running one (sigma "
                    f"{expected:.6g} at step {index}, the pipeline passes {sigma:.6g}): caching on the "
                    "pipeline's step_index, sigma and num_inference_steps instead; " + FOLLOW_HINT,
                )
                view, index = None, None
        if index is None and step is not None:  # the pipeline's CacheContext says where the loop is
            if self.view is None or self.view.grid is not None or self.view.num_calls != num_steps:
                abscissa = "index" if self.config.abscissa == "index" else "sigma" if sigma is not None else "timestep"
                scheduler = self.scheduler  # a stale one: remembered with its timesteps, so that it is not read again
                timesteps = None if scheduler is None else getattr(scheduler, "timesteps", None)
                self.view = SchedulerView.of_context(self.config, cast(int, num_steps), abscissa, scheduler, timesteps)
                states.clear()
            view, index = self.view, step
        if index is None:
            if self._scheduler is not None:
                why = "the scheduler has no timesteps" if view is None else "the call is not on its grid"
                self._warn_once("not-running", f"ab_cache: not cached: {why}; " + FOLLOW_HINT)
                return None
            return self._timestep_cache(module)
        return self._state(module, cast(SchedulerView, view), index, args, kwargs, sigma)

    def _scheduler_index(
        self, view: SchedulerView, step: int | None, num_steps: int | None, timestep: Any
    ) -> int | None:
        """The call's index on the scheduler's grid: the pipeline's `CacheContext.step_index` where it describes this
        grid, else the scheduler's (`scheduler_index`), else, before the scheduler steps, this context's next call."""
        if step is not None and num_steps == view.num_calls:
            return step
        index = scheduler_index(view.scheduler, cast(np.ndarray, view.timestep_values), timestep)
        if index == NOT_STARTED:  # a loop that does not step the scheduler: count this context's calls
            last = self.state_manager.get_state().last
            index = 0 if last is None else (last[0] + 1) % view.num_calls
        return index

    def _state(
        self,
        module: torch.nn.Module,
        view: SchedulerView,
        index: int,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        sigma: float | None,
    ) -> tuple[ContextState, int, Any] | None:
        """The context's state at call `index` of `view` (a new one where its run starts or jumps)."""
        states = self.state_manager
        branch = states.get_state()
        key = input_key(args, kwargs)
        stage, position, size = view.locate(index)
        repeat = branch.last[1] + 1 if branch.last is not None and branch.last[0] == index else 0
        branch.last = (index, repeat)
        state, start, known = branch.runs.get((stage, repeat), (None, -1, None))
        if start < 0 or known != key or (state is not None and position != start + state.step):
            start, state = position, None
            remaining = size - position
            if remaining >= self.config.min_steps or self.config.force:
                suffix = (f"_{repeat}" if repeat else "") + (f"/stage{stage}" if np.any(view.stages) else "")
                stats = self._stats.context(states.name + suffix)
                state = ContextState(view.schedule(stage, start), stats, process_group=self._group(module))
            else:
                self._warn_once(
                    "few-steps",
                    f"ab_cache: {remaining} denoising steps is below min_steps={self.config.min_steps}: "
                    "computing every step (pass force=True to cache anyway)",
                )
            branch.runs[(stage, repeat)] = (state, start, key)
        if state is None:
            self._stats.context(states.name).computed += 1
            return None
        time = None
        if view.grid is None:  # a CacheContext run: the abscissa comes with the call
            time = sigma if view.abscissa == "sigma" else self._timestep(args, kwargs)
            if view.abscissa != "index" and time is None:
                return None
            time = None if time is None else float(torch.as_tensor(time).reshape(-1).max())
        return state, position - start, time

    def _timestep_cache(self, module: torch.nn.Module) -> ABCache:
        """Without a scheduler and a step index: `ABCache` on the timestep the denoiser receives."""
        if self._fallback is None:
            ab = self.config.to_ab_config("plain")
            if ab.cooldown:
                self._warn_once(
                    "cooldown",
                    f"ab_cache: cooldown={ab.cooldown} needs the number of steps, which neither a scheduler (pass "
                    "scheduler= or use enable_ab_cache(pipe)) nor the pipeline's cache_context gives: the last steps "
                    "are not forced to compute",
                )
                ab = dataclasses.replace(ab, cooldown=0)
            if ab.compute_mask is not None or ab.calls is not None or ab.speedup is not None:
                raise ValueError(
                    "compute_mask and a call budget (calls, speedup) need the number of steps: "
                    "pass scheduler= to apply_ab_cache"
                )
            forward = cast(Callable[..., Any], self.fn_ref.original_forward)
            self._fallback = ABCache(
                lambda *a, **k: forward(*a, **k), ab, time_fn=self._timestep, process_group=self._group(module)
            )
        return self._fallback

    @torch.compiler.disable
    def _predict(self, state: ContextState, i: int, time: Any) -> Any:
        """The prediction at step i, or None to compute; in adaptive mode decided with the contexts at step i."""
        peers = [s for branch in self.state_manager.branches() for s, _, _ in branch.runs.values() if s is not None]
        return state.predict(i, time, peers)

    # the state's bookkeeping stays out of torch.compile's graph (the model call between is compiled)
    _skip = staticmethod(torch.compiler.disable(ContextState.skip))
    _record = staticmethod(torch.compiler.disable(ContextState.record))

    def __repr__(self) -> str:
        return f"ABCacheHook({self.config!r}, abscissa={self.abscissa!r}, stats={self.stats!r})"


def _invalidate(registry: HookRegistry) -> None:
    """Drop diffusers' cached list of child registries (diffusers 0.41+; 0.40 has no such method)."""
    invalidate = getattr(registry, "invalidate_child_registries_cache", None)
    if invalidate is not None:
        invalidate()


def _other_cache(module: torch.nn.Module) -> str | None:
    """What other cache runs on `module`: diffusers' `enable_cache` config, or a stateful hook on it or its blocks."""
    config = getattr(module, "_cache_config", None)
    if config is not None:
        return type(config).__name__
    for child in module.modules():
        registry = getattr(child, "_diffusers_hook", None)
        for name, hook in ({} if registry is None else registry.hooks).items():
            if hook._is_stateful and name != AB_CACHE_HOOK:
                return f"the hook {name!r}"
    return None


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

    The hook joins diffusers' cache bookkeeping: `module.is_cache_enabled` is True while it is applied, and enabling
    a second cache (diffusers' `enable_cache`, or AB-Cache again) raises.

    Args:
        module (`torch.nn.Module`):
            The denoiser. Its forward must take the timestep (argument `config.timestep_arg`).
        config (`ABCacheConfig`, *optional*):
            The cache settings (default `ABCacheConfig()`); a dict of its fields is accepted.
        scheduler (`SchedulerMixin` or `Callable[[], SchedulerMixin]`, *optional*):
            The pipeline's scheduler (or a function returning the current one), which gives the step index, the grid
            and the abscissa. Without it, the pipeline's `cache_context(..., step_index=, num_inference_steps=)` gives
            the steps where it passes them; else the timestep the denoiser receives is the abscissa and no grid is
            known (no cool-down, mask or few-step guard). [`enable_ab_cache`] passes it for you.

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
    other = _other_cache(module)
    if other is not None:
        raise ValueError(
            f"a cache is already enabled on this {type(module).__name__} ({other}): disable it first "
            "(module.disable_cache() for diffusers' caches)"
        )
    hook = ABCacheHook(config, scheduler)
    registry.register_hook(hook, AB_CACHE_HOOK)
    _invalidate(registry)
    if hasattr(module, "_cache_config"):  # CacheMixin: is_cache_enabled, and enable_cache refuses a second cache
        module._cache_config = config  # type: ignore[assignment]
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
        module = self.module_ref()
        if module is not None:
            HookRegistry.check_if_exists_or_initialize(module).reset_stateful_hooks()


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
    if isinstance(getattr(module, "_cache_config", None), ABCacheConfig):
        module._cache_config = None  # type: ignore[assignment]
    if offload_forward is not None:
        module.__dict__["_old_forward"] = module.__dict__["forward"]
        module.__dict__["forward"] = offload_forward
    if isinstance(module.__dict__.get("_reset_stateful_cache"), _ResetEntryPoint):
        del module._reset_stateful_cache
