"""`ABCache`: wrap a denoiser so that it is called exactly as before and runs only at compute steps."""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from typing import Any

import abcore
import torch

from abcache_torch._engine import CacheEngine
from abcache_torch._stats import CacheStats

TIME_KEYWORDS = ("timestep", "timesteps", "sigma", "t")

TimeFn = Callable[[tuple[Any, ...], dict[str, Any]], Any]


def input_key(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Hashable:
    """Shapes, dtypes and devices of the tensor arguments, and ``return_dict``: a change starts a new generation.

    ``return_dict`` is part of it because it chooses the structure of the output a prediction rebuilds.
    """
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    tensors += [kwargs[k] for k in sorted(kwargs) if isinstance(kwargs[k], torch.Tensor)]
    key = tuple((tuple(a.shape), a.dtype, a.device) for a in tensors)
    return (*key, ("return_dict", kwargs["return_dict"])) if "return_dict" in kwargs else key


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
        config: an ``abcore.ABConfig`` (default ``ABConfig()``: order 2, interval 5, warm-up 2,
            cool-down 4, which needs `times` or `num_steps`).
        time_arg: where the step time is in a call: a positional index or a keyword name. Default:
            the keyword ``timestep``, ``timesteps``, ``sigma`` or ``t`` when given, else the second
            positional argument.
        time_fn: ``time_fn(args, kwargs) -> time`` instead of `time_arg` (e.g. to map a timestep to lambda).
        times: the step times of each generation as `time_fn` / `time_arg` gives them, one per call.
            Announcing them executes ``abcore.make_plan`` (cool-down and masks included); a generation
            is ``len(times)`` calls per context, and a call at the grid's first time restarts one.
        num_steps: the number of steps when the times are not known in advance (enables cool-down).
        steps: the sampler's ``abcore.LinearSteps`` (``LinearSteps.euler(sigmas)``, ``.ddim(...)``),
            which enables the correction (``config.correct``; ``correct=True`` requires them).
        check_finite: recompute the step when a prediction is not finite (counted in
            ``stats.fallbacks``; one boolean read from the device per predicted step).
        process_group: the ``torch.distributed`` group whose ranks must agree in adaptive mode.

    The time of every call is read as a Python float, a tensor one (0-d, or a batch of equal values)
    included: one host read per call, which is what lets an interrupted generation be noticed (a loop
    that cannot afford it calls `CacheEngine.predict(None)` / `store`, or `abcache_torch.sample`).
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
        times: Sequence[float] | None = None,
        num_steps: int | None = None,
        steps: abcore.LinearSteps | None = None,
        check_finite: bool = True,
        process_group: Any = None,
    ) -> None:
        if not callable(model):
            raise TypeError(f"model must be callable (an nn.Module or a function), got {type(model).__name__}")
        if config is None:
            config = abcore.ABConfig()
        if time_arg is not None and time_fn is not None:
            raise ValueError("time_arg and time_fn are exclusive: give one of them")
        if time_arg is not None:
            if isinstance(time_arg, bool) or not isinstance(time_arg, (int, str)):
                raise TypeError(f"time_arg must be a positional index (int) or a keyword (str), got {time_arg!r}")
            if isinstance(time_arg, int) and time_arg < 0:
                raise ValueError(f"time_arg must be a positional index >= 0, got {time_arg}")
        if time_fn is not None and not callable(time_fn):
            raise TypeError(f"time_fn must be callable as time_fn(args, kwargs), got {type(time_fn).__name__}")
        self.model = model
        self.time_arg = time_arg
        self.time_fn = time_fn
        self.engine = CacheEngine(
            config, times, num_steps=num_steps, steps=steps, check_finite=check_finite, process_group=process_group
        )
        self.engine.validate()  # cool-down / mask / correct=True without what they need: fail here, not later

    def __getattr__(self, name: str) -> Any:
        model = self.__dict__.get("model")
        if model is None or name.startswith("__"):
            raise AttributeError(name)
        return getattr(model, name)

    @property
    def config(self) -> abcore.ABConfig:
        return self.engine.config

    @property
    def stats(self) -> CacheStats:
        return self.engine.stats

    def context(self, name: str) -> Any:
        """``with cache.context("uncond"): cache(x, t, ...)``: route calls to the history `name`."""
        return self.engine.context(name)

    def reset(self) -> None:
        """Start a new generation in every context (keeps the stats)."""
        self.engine.reset()

    def reset_stats(self) -> None:
        self.engine.reset_stats()

    def set_grid(
        self,
        times: Sequence[float] | None = None,
        *,
        num_steps: int | None = None,
        steps: abcore.LinearSteps | None = None,
    ) -> None:
        """Announce (or forget) the step times (and steps) of the coming generations; resets the histories."""
        self.engine.set_grid(times, num_steps=num_steps, steps=steps)
        self.engine.validate()

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
        time = self.read_time(args, kwargs)  # a tensor time is read from the device (see the class docstring)
        return self.engine.step(time, lambda: self.model(*args, **kwargs), key=input_key(args, kwargs))

    def __repr__(self) -> str:
        name = type(self.model).__name__
        return f"ABCache({name}, {self.config!r}, stats={self.stats!r})"
