"""`ABCache`: wrap a denoiser so that it is called exactly as before and runs only at compute steps.

It is the one place that maps a call's time to a step index; each cache context's steps then run the
`ContextState` transition (abcore's rule).
"""

from __future__ import annotations

import contextlib
import math
import numbers
import warnings
from collections.abc import Callable, Hashable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import abcore
import numpy as np
import torch

from abcache_torch._state import ContextState
from abcache_torch._stats import CacheStats

TIME_KEYWORDS = ("timestep", "timesteps", "sigma", "t")
DEFAULT_CONTEXT = "default"

TimeFn = Callable[[tuple[Any, ...], dict[str, Any]], Any]


def input_key(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Hashable:
    """Shapes, dtypes and devices of the tensor arguments, and ``return_dict``: a change starts a new generation.

    ``return_dict`` is part of it because it chooses the structure of the output a prediction rebuilds.
    """
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    tensors += [kwargs[k] for k in sorted(kwargs) if isinstance(kwargs[k], torch.Tensor)]
    key = tuple((tuple(a.shape), a.dtype, a.device) for a in tensors)
    return (*key, ("return_dict", kwargs["return_dict"])) if "return_dict" in kwargs else key


def as_time(time: Any) -> float:
    """A step time as a float; a tensor (0-d, or a batch of equal values) is read from the device."""
    if isinstance(time, torch.Tensor):
        if time.numel() == 0:
            raise ValueError("time must hold a value, got an empty tensor")
        low, high = (float(v) for v in torch.aminmax(time.detach().reshape(-1).double()))
        if low != high:
            raise ValueError(f"time: the batch holds different times ({low} .. {high}); one cache step needs one time")
        time = low
    if isinstance(time, bool) or not isinstance(time, numbers.Real):
        raise TypeError(f"time must be a real number, got {type(time).__name__}")
    value = float(time)
    if not math.isfinite(value):
        raise ValueError(f"time must be finite, got {value!r}")
    return value


def _close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-5, abs_tol=1e-8)


@dataclass
class _Context:
    """A context's state and what places its calls: the inputs' key, the last time and the grid direction."""

    state: ContextState
    key: Hashable = None
    last_time: float | None = None
    direction: float = 0.0
    restarts: list[int] = field(default_factory=list)  # the lengths of its last generations

    def starts_generation(self, time: float) -> bool:
        """True when `time` cannot continue this generation (it repeats or moves against the grid)."""
        if self.last_time is None:
            return False
        delta = time - self.last_time
        return delta == 0.0 or delta * self.direction < 0.0

    def moved(self, time: float) -> None:
        if self.last_time is not None and self.state.step == 1:
            self.direction = math.copysign(1.0, time - self.last_time)
        self.last_time = time


class ABCache:
    """AB-Cache around any PyTorch denoiser (an `nn.Module` or a callable), called exactly like it.

    At compute steps it calls the model and stores the output; at the other steps it returns
    sum_j w_j H_j, the Lagrange extrapolation through the last ``config.order`` computed outputs at
    their real step times (paper, Eq. 3.5), with weights from abcore's step rule. With the sampler's
    `steps` a computed step returns f_n + sum_l c_l [f_n, H]_l, the correction of the predicted
    steps before it (the history keeps the raw f_n). Outputs may be tensors, tuples, lists, dicts
    or dataclass outputs (diffusers' ``Transformer2DModelOutput``).

    Args:
        model: the denoiser. Unknown attributes of the wrapper are looked up on it.
        config: an ``abcore.ABConfig`` (default ``ABConfig()``: order 2 and a budget of 5 + n // 5 calls on
            n steps, placed by the sampler's sensitivity with `steps`, else evenly; the budget needs `times` or
            `num_steps`, without them it falls back, with a warning, to one call in 5 after a warm-up of 2;
            ``ABConfig(interval=5)`` is the previous default, the fixed schedule).
        time_arg: where the step time is in a call: a positional index or a keyword name. Default:
            the keyword ``timestep``, ``timesteps``, ``sigma`` or ``t`` when given, else the second
            positional argument.
        time_fn: ``time_fn(args, kwargs) -> time`` instead of `time_arg` (e.g. to map a timestep to lambda).
        times: the step times of each generation as `time_fn` / `time_arg` gives them, one per call.
            They make the run's ``abcore.schedule`` (cool-down and masks included); a generation is
            ``len(times)`` calls per context, and a call at the grid's first time restarts one.
        num_steps: the number of steps when the times are not known in advance (enables cool-down); a
            generation that goes on past it is a ValueError.
        steps: the sampler's ``abcore.LinearSteps`` (``LinearSteps.euler(sigmas)``, ``.ddim(...)``),
            which enables the correction (``config.correct``; ``correct=True`` requires them).
        check_finite: recompute the step when a prediction is not finite (counted in
            ``stats.fallbacks``; one boolean read from the device per predicted step).
        process_group: the ``torch.distributed`` group whose ranks must take the same decisions (model-parallel
            ranks), or None (default): this process decides alone and makes no collective call.

    The time of every call is read as a Python float, a tensor one (0-d, or a batch of equal values)
    included: one host read per call, which is what lets an interrupted generation be noticed (a loop
    that cannot afford it runs `abcache_torch.sample`, or `ContextState` itself).
    Separate CFG calls need ``with cache.context("cond"):`` / ``("uncond")``; without a context every
    call goes to the history "default" (batched CFG needs nothing).
    """

    def __init__(
        self,
        model: Callable[..., Any],
        config: abcore.ABConfig | None = None,
        *,
        time_arg: int | str | None = None,
        time_fn: TimeFn | None = None,
        times: Sequence[float] | np.ndarray | torch.Tensor | None = None,
        num_steps: int | None = None,
        steps: abcore.LinearSteps | None = None,
        check_finite: bool = True,
        process_group: Any = None,
    ) -> None:
        if not callable(model):
            raise TypeError(f"model must be callable (an nn.Module or a function), got {type(model).__name__}")
        if time_arg is not None and time_fn is not None:
            raise ValueError("time_arg and time_fn are exclusive: give one of them")
        if time_arg is not None:
            if isinstance(time_arg, bool) or not isinstance(time_arg, (int, str)):
                raise TypeError(f"time_arg must be a positional index (int) or a keyword (str), got {time_arg!r}")
            if isinstance(time_arg, int) and time_arg < 0:
                raise ValueError(f"time_arg must be a positional index >= 0, got {time_arg}")
        if time_fn is not None and not callable(time_fn):
            raise TypeError(f"time_fn must be callable as time_fn(args, kwargs), got {type(time_fn).__name__}")
        if not isinstance(check_finite, bool):
            raise TypeError(f"check_finite must be a bool, got {check_finite!r}")
        self.model = model
        self.time_arg = time_arg
        self.time_fn = time_fn
        self.check_finite = check_finite
        self.process_group = process_group
        self.stats = CacheStats()
        self._stack: list[str] = []
        self._warned: set[str] = set()
        self.set_grid(times, num_steps=num_steps, steps=steps, config=abcore.ABConfig() if config is None else config)

    def __getattr__(self, name: str) -> Any:
        model = self.__dict__.get("model")
        if model is None or name.startswith("__"):
            raise AttributeError(name)
        return getattr(model, name)

    @property
    def config(self) -> abcore.ABConfig:
        return self.schedule.config

    @contextlib.contextmanager
    def context(self, name: str) -> Iterator[None]:
        """``with cache.context("uncond"): cache(x, t, ...)``: route the calls inside to the history `name`."""
        if not isinstance(name, str):
            raise TypeError(f"name must be a str, got {type(name).__name__}")
        self._stack.append(name)
        try:
            yield
        finally:
            self._stack.pop()

    def reset(self) -> None:
        """Start a new generation in every context (keeps the stats)."""
        self._contexts: dict[str, _Context] = {}

    def reset_stats(self) -> None:
        self.stats = CacheStats()
        for name, ctx in self._contexts.items():
            ctx.state.stats = self.stats.context(name)

    def set_grid(
        self,
        times: Sequence[float] | np.ndarray | torch.Tensor | None = None,
        *,
        num_steps: int | None = None,
        steps: abcore.LinearSteps | None = None,
        config: abcore.ABConfig | None = None,
    ) -> None:
        """Announce (or forget) the step times, `num_steps` and steps of the coming generations (as in the
        constructor); resets the histories. ValueError when the config needs what is not given (``abcore.schedule``).
        """
        if config is not None and not isinstance(config, abcore.ABConfig):
            raise TypeError(f"config must be an abcore.ABConfig, got {type(config).__name__}")
        self.schedule = abcore.schedule(config or self.config, times, steps, num_steps=num_steps)
        self.reset()

    def read_time(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """The raw step time of a call (a number or a tensor), as `time_fn` / `time_arg` locate it."""
        if self.time_fn is not None:
            return self.time_fn(args, kwargs)
        if isinstance(self.time_arg, str):
            if self.time_arg not in kwargs:
                raise TypeError(f"time_arg: the call has no keyword {self.time_arg!r} (keywords: {sorted(kwargs)})")
            return kwargs[self.time_arg]
        if isinstance(self.time_arg, int):
            if self.time_arg >= len(args):
                raise TypeError(f"time_arg: the call has {len(args)} positional arguments, no index {self.time_arg}")
            return args[self.time_arg]
        for name in TIME_KEYWORDS:
            if name in kwargs:
                return kwargs[name]
        if len(args) >= 2:
            return args[1]
        raise TypeError(
            "time_arg: cannot find the step time (no keyword timestep / sigma / t, no second positional "
            "argument); pass time_arg or time_fn"
        )

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        name = self._stack[-1] if self._stack else DEFAULT_CONTEXT
        ctx = self._context(name, input_key(args, kwargs))
        raw = self.read_time(args, kwargs)
        try:
            value = as_time(raw)  # a tensor time is read from the device
        except (TypeError, ValueError) as error:
            raise type(error)(f"{error} (read from {self._time_source()}; pass time_arg= or time_fn=)") from None
        i, time = self._place(name, ctx, value)
        state = ctx.state
        # adaptive: the contexts at step i decide together; one not yet called at i is taken at this call's time
        leaves = state.predict(i, time, [c.state for c in self._contexts.values()])
        if leaves is None:
            return state.record(i, self.model(*args, **kwargs), time)
        return state.skip(i, leaves, time)

    def _context(self, name: str, key: Hashable) -> _Context:
        ctx = self._contexts.get(name)
        if ctx is None or (ctx.key != key and ctx.state.step):
            state = ContextState(
                self.schedule,
                self.stats.context(name),
                check_finite=self.check_finite,
                process_group=self.process_group,
            )
            ctx = self._contexts[name] = _Context(state, key)
        ctx.key = key  # a context still at step 0 (its first call raised) takes the new inputs
        return ctx

    def _place(self, name: str, ctx: _Context, value: float) -> tuple[int, float | None]:
        """(step index, time) of the context's call at time `value`; restarts its generation where the time says so."""
        sched, state = self.schedule, ctx.state
        n, i = sched.num_steps, state.step
        if sched.times is not None:
            if n is not None and i >= n:
                i = 0
            if not _close(value, sched.times[i]):
                if not _close(value, sched.times[0]):
                    raise ValueError(
                        f"time {value!r} is not step {i} of the announced grid (expected {sched.times[i]!r}); "
                        "call reset() between generations or announce the right grid with set_grid"
                    )
                i = 0
            if i == 0 and state.step:
                state.restart()
            return i, None
        if ctx.starts_generation(value) or (n is not None and i >= n):
            if n is not None and i >= n and not ctx.starts_generation(value):
                raise ValueError(
                    f"num_steps={n}, but context {name!r} goes on past its last step (time {value!r} continues the "
                    "generation): announce the right num_steps, or call reset() between generations"
                )
            self._note_restart(name, ctx)
            state.restart()
            ctx.last_time, ctx.direction = None, 0.0
        ctx.moved(value)
        return state.step, value

    def _note_restart(self, name: str, ctx: _Context) -> None:
        """Warn once when a context keeps restarting after a step or two: it then caches nothing."""
        ctx.restarts = [*ctx.restarts[-2:], ctx.state.step]
        if len(ctx.restarts) == 3 and max(ctx.restarts) <= 2 and name not in self._warned:
            self._warned.add(name)
            warnings.warn(
                f"ABCache: in context {name!r} the time read from {self._time_source()} repeats or goes back every "
                "call or two, so every call starts a new generation and nothing is cached. Pass time_arg= or time_fn= "
                "if the time is elsewhere; a sampler with two model calls per step (Heun) needs a context per call: "
                "with cache.context('stage2')",
                UserWarning,
                stacklevel=3,
            )

    def _time_source(self) -> str:
        if self.time_fn is not None:
            return "time_fn"
        if self.time_arg is not None:
            return f"time_arg={self.time_arg!r}"
        return "the keyword timestep / timesteps / sigma / t, else the second positional argument"

    def __repr__(self) -> str:
        name = type(self.model).__name__
        return f"ABCache({name}, {self.config!r}, stats={self.stats!r})"
