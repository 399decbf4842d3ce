"""`CacheState`: the cache engine, one history of computed outputs per context.

At step i with time t_i a context either calls the model (and stores its output) or returns

    p(t_i) = sum_j w_j H_j,

the Lagrange extrapolation (paper, Eq. 3.5; Eq. 3.6 with an exponential weighting) through its
last k = config.order computed outputs H_j (newest first) at their real times. The weights
w_j and the compute / predict decisions come from abcore (`make_plan` when the grid of times
is announced, `plan_step` / `record` otherwise); this module only moves tensors.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import numbers
from collections.abc import Callable, Hashable, Iterator, Sequence
from typing import Any, TypeVar, cast

import abcore
import numpy as np
import torch

from abcache_torch._stats import CacheStats, ContextStats
from abcache_torch._tree import TreeDef, flatten

T = TypeVar("T")
DEFAULT_CONTEXT = "default"
_EMPTY_PLANNER = abcore.PlannerState()


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 for float64 outputs, complex128 / complex64 for complex ones, float32 otherwise."""
    if dtype in (torch.float64, torch.complex128):
        return dtype
    if dtype.is_complex:
        return torch.complex64
    return torch.float32


def extrapolate(history: Sequence[Sequence[torch.Tensor]], weights: Any) -> list[torch.Tensor]:
    """sum_j weights[j] * history[j][leaf] for every leaf, accumulated in float32 (float64 for float64).

    history: the stored outputs newest first, each a list of tensor leaves; weights: a 1-D
    tensor (on the leaves' device) or a sequence of floats with at least len(history) entries.
    Pure tensor arithmetic (no host synchronisation, no data-dependent branching): compiles
    with `torch.compile(..., fullgraph=True)`. Each result has its leaf's dtype and device.
    """
    if len(history) == 0:
        raise ValueError("history is empty: a prediction needs at least one computed output")
    out = []
    for leaves in zip(*history):
        acc = accumulation_dtype(leaves[0].dtype)
        total = weights[0] * leaves[0].to(acc)
        for j in range(1, len(leaves)):
            total = total + weights[j] * leaves[j].to(acc)
        out.append(total.to(leaves[0].dtype))
    return out


@dataclasses.dataclass
class _Context:
    """The per-context history: stored leaves (newest first), their structure, the planner."""

    entries: list[list[torch.Tensor]] = dataclasses.field(default_factory=list)
    treedef: TreeDef | None = None
    signature: Hashable = None
    key: Hashable = None
    planner: abcore.PlannerState = _EMPTY_PLANNER
    off_plan: bool = False  # a fallback or a fresh history left the announced plan: plan step by step
    pending: abcore.StepDecision | None = None  # a compute step announced by `predict`, awaiting `store`


def _as_time(time: Any) -> float:
    if isinstance(time, torch.Tensor):
        if time.numel() == 0:
            raise ValueError("time must hold a value, got an empty tensor")
        time = time.reshape(-1)[0].item()
    if isinstance(time, bool) or not isinstance(time, numbers.Real):
        raise TypeError(f"time must be a real number (or None with an announced grid), got {type(time).__name__}")
    value = float(time)
    if not math.isfinite(value):
        raise ValueError(f"time must be finite, got {value!r}")
    return value


def _squared_sum(leaves: list[torch.Tensor]) -> torch.Tensor:
    """sum |leaf|^2 over all leaves, as a float64 scalar tensor on the leaves' device."""
    return torch.stack([(leaf.to(accumulation_dtype(leaf.dtype)).abs() ** 2).sum().double() for leaf in leaves]).sum()


def _check_leaves(leaves: list[torch.Tensor], result: Any) -> None:
    if not leaves:
        raise TypeError(
            "output: the model output must be a tensor or a tuple / list / dict / dataclass holding tensors, "
            f"got {type(result).__name__}"
        )
    for leaf in leaves:
        if not (leaf.is_floating_point() or leaf.is_complex()):
            raise TypeError(f"output: tensor leaves must be floating point or complex to extrapolate, got {leaf.dtype}")


class CacheState:
    """The cache engine: one history of at most ``config.order`` computed outputs per context name.

    Args:
        config: the abcore schedule (order, interval, warm-up, cool-down, mask, tolerance).
        times: the step times (abscissa values: sigma, t or lambda) of the coming generations,
            one per model call; announces the grid (see `set_grid`).
        num_steps: the number of steps, when only that is known (enables cool-down and masks;
            the weights still come step by step from the real times).
        check_finite: test every prediction for NaN / inf and recompute the step when one is
            found (counted in ``stats.fallbacks``). The test reads one boolean from the device,
            the only host synchronisation of a fixed-plan predicted step; False removes it.
        process_group: the `torch.distributed` group whose ranks must agree on every decision
            (default: the world, when `torch.distributed` is initialised with several ranks).

    Memory: each context stores at most ``config.order`` outputs (references, not copies: do not
    modify a model output in place while a cache holds it).
    """

    def __init__(
        self,
        config: abcore.ABConfig,
        times: Sequence[float] | None = None,
        *,
        num_steps: int | None = None,
        check_finite: bool = True,
        process_group: Any = None,
    ) -> None:
        if not isinstance(config, abcore.ABConfig):
            raise TypeError(f"config must be an abcore.ABConfig, got {type(config).__name__}")
        if not isinstance(check_finite, bool):
            raise TypeError(f"check_finite must be a bool, got {check_finite!r}")
        self.config = config
        self.check_finite = check_finite
        self.process_group = process_group
        self._contexts: dict[str, _Context] = {}
        self._stack: list[str] = []
        self._stats = CacheStats()
        self.set_grid(times, num_steps=num_steps)

    # ----------------------------------------------------------------------------- grid and state
    def set_grid(self, times: Sequence[float] | None, *, num_steps: int | None = None) -> None:
        """Announce (or forget, with None) the step times of the coming generations; resets all histories.

        With `times` announced, a fixed config is executed from `abcore.make_plan`: the step index
        of a context comes from its call counter (a generation is ``len(times)`` calls), so
        `step` accepts ``time=None`` and the predicted path never reads a tensor. A float time is
        still checked against the grid (its first time restarts the generation).
        """
        self._plan: abcore.CachePlan | None = None
        self._times: np.ndarray | None = None
        self._tables: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}
        if times is not None:
            if isinstance(times, torch.Tensor):
                times = times.detach().cpu().tolist()
            t = np.asarray(times, dtype=np.float64)
            if t.ndim != 1 or t.size == 0 or not np.all(np.isfinite(t)):
                raise ValueError(f"times must be a non-empty 1-D sequence of finite values, got {times!r}")
            if num_steps is not None and num_steps != t.size:
                raise ValueError(f"num_steps={num_steps!r} disagrees with len(times)={t.size}")
            if self.config.adaptive:
                d = np.diff(t)  # decisions depend on the outputs: planned step by step
                if not (np.all(d > 0) or np.all(d < 0)):
                    raise ValueError(f"times must be strictly increasing or strictly decreasing, got {t.tolist()}")
            else:
                self._plan = abcore.make_plan(self.config, t)
            self._times = t
            num_steps = int(t.size)
        elif num_steps is not None and (isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1):
            raise ValueError(f"num_steps must be an integer >= 1 or None, got {num_steps!r}")
        if num_steps is not None and self.config.compute_mask is not None:
            self.config.forced_compute(0, num_steps)  # validates the mask length
        self._num_steps = num_steps
        self.reset()

    @property
    def times(self) -> np.ndarray | None:
        return None if self._times is None else self._times.copy()

    @property
    def grid_announced(self) -> bool:
        """Whether `set_grid` announced the times (steps then come from the call counter)."""
        return self._times is not None

    @property
    def num_steps(self) -> int | None:
        return self._num_steps

    @property
    def plan(self) -> abcore.CachePlan | None:
        """The fixed plan executed on the announced grid (None when planning step by step)."""
        return self._plan

    def reset(self) -> None:
        """Forget all histories and per-generation planner state (keeps the stats)."""
        self._contexts.clear()

    @property
    def stats(self) -> CacheStats:
        return self._stats

    def reset_stats(self) -> None:
        self._stats = CacheStats()

    @contextlib.contextmanager
    def context(self, name: str) -> Iterator[None]:
        """Route the steps inside the block to the history `name` (e.g. "cond" and "uncond" for CFG)."""
        if not isinstance(name, str):
            raise TypeError(f"name must be a str, got {type(name).__name__}")
        self._stack.append(name)
        try:
            yield
        finally:
            self._stack.pop()

    @property
    def current_context(self) -> str:
        """The context a step without an explicit one uses: the innermost `context(name)`, else "default"."""
        return self._stack[-1] if self._stack else DEFAULT_CONTEXT

    def history_length(self, context: str | None = None) -> int:
        """Number of outputs stored for `context` (at most config.order)."""
        ctx = self._contexts.get(self.current_context if context is None else context)
        return 0 if ctx is None else len(ctx.entries)

    # ----------------------------------------------------------------------------- one step
    def step(self, time: Any, compute: Callable[[], T], context: str | None = None, *, key: Hashable = None) -> T:
        """Run one step at `time`: `compute()` at compute steps, the extrapolated output otherwise.

        time: the step's abscissa (a float; a tensor is read with `.item()`), or None when a grid is
            announced (the context's call counter gives the step).
        compute: the model call; its result (tensor, tuple, list, dict or dataclass of tensors) is
            stored and returned unchanged. At predicted steps it is not called, and the result has
            the same structure with every tensor leaf replaced by sum_j w_j H_j.
        context: the history to use (default: the innermost `context(name)`, else "default").
        key: a hashable summary of the inputs (e.g. their shapes); a change starts a fresh history.

        Equivalent to `predict` followed, at a compute step, by ``store(compute())``.
        """
        if not callable(compute):
            raise TypeError(f"compute must be callable, got {type(compute).__name__}")
        name = self._name(context)
        predicted, output = self.predict(time, name, key=key)
        return output if predicted else self.store(compute(), name)

    def predict(self, time: Any, context: str | None = None, *, key: Hashable = None) -> tuple[bool, Any]:
        """First half of `step`: ``(True, prediction)`` at a predicted step, else ``(False, None)``.

        After ``(False, None)`` the caller runs the model itself (e.g. so that a compiled model is
        called outside this engine) and passes its output to `store`.
        """
        name = self._name(context)
        ctx = self._contexts.setdefault(name, _Context())
        if ctx.key != key and (ctx.entries or ctx.planner.step):
            ctx = self._contexts[name] = _Context()
        ctx.key = key
        stats = self._stats.context(name)
        decision = self._decide(ctx, None if time is None else _as_time(time))
        if not decision.compute and ctx.entries:
            outcome = self._predict(ctx, decision, stats)
            if outcome is not None:
                stats.predicted += 1
                ctx.planner = abcore.record(self.config, ctx.planner, decision, False)
                return True, ctx.treedef.unflatten(outcome)  # type: ignore[union-attr]
            ctx.off_plan = True  # the history now holds an output the plan did not foresee
        ctx.pending = decision
        return False, None

    def store(self, result: T, context: str | None = None) -> T:
        """Second half of `step`: store the model output of the compute step `predict` announced."""
        name = self._name(context)
        ctx = self._contexts.get(name)
        if ctx is None or ctx.pending is None:
            raise ValueError(f"context {name!r} has no pending compute step: call predict() first")
        decision, ctx.pending = ctx.pending, None
        leaves, treedef = flatten(result)
        _check_leaves(leaves, result)
        signature = (treedef.spec, tuple((leaf.shape, leaf.dtype, leaf.device) for leaf in leaves))
        if ctx.signature is not None and signature != ctx.signature:
            # outputs of another structure or shape: drop the old ones, keep the grid position
            ctx.entries = []
            ctx.planner = dataclasses.replace(ctx.planner, history_times=(), history_steps=())
            ctx.off_plan = True
        ctx.entries = [[leaf.detach() if leaf.requires_grad else leaf for leaf in leaves], *ctx.entries]
        ctx.entries = ctx.entries[: self.config.order]
        ctx.treedef, ctx.signature = treedef, signature
        ctx.planner = abcore.record(self.config, ctx.planner, decision, True)
        self._stats.context(name).computed += 1
        return result

    def _name(self, context: str | None) -> str:
        name = self.current_context if context is None else context
        if not isinstance(name, str):
            raise TypeError(f"context must be a str or None, got {type(name).__name__}")
        return name

    def _decide(self, ctx: _Context, time: float | None) -> abcore.StepDecision:
        """The decision for the context's next step (starting a new generation when due)."""
        n = self._num_steps
        if n is not None and ctx.planner.step >= n:
            self._restart(ctx)
        if self._times is not None:
            step = ctx.planner.step
            if time is not None and not math.isclose(time, self._times[step], rel_tol=1e-5, abs_tol=1e-8):
                if step > 0 and math.isclose(time, self._times[0], rel_tol=1e-5, abs_tol=1e-8):
                    self._restart(ctx)
                    step = 0
                else:
                    raise ValueError(
                        f"time {time!r} is not step {step} of the announced grid (expected {self._times[step]!r}); "
                        "call reset() between generations or announce the right grid with set_grid"
                    )
            time = float(self._times[step])
            if self._plan is not None and not ctx.off_plan:
                row = self._plan.weights[step]
                sources = tuple(int(s) for s in self._plan.sources[step] if s >= 0)
                return abcore.StepDecision(step, time, bool(self._plan.compute[step]), row, row * 0.0, sources)
        elif time is None:
            raise ValueError("time is required when no grid of times is announced (pass times to set_grid)")
        elif ctx.planner.is_new_generation(time):
            self._restart(ctx)
        return abcore.plan_step(self.config, ctx.planner, time, n)

    @staticmethod
    def _restart(ctx: _Context) -> None:
        key = ctx.key
        ctx.__init__()  # type: ignore[misc]
        ctx.key = key

    def _weights(self, ctx: _Context, decision: abcore.StepDecision, row: np.ndarray) -> Any:
        """The weights as the extrapolation consumes them: a device table row on the plan, floats otherwise."""
        m = len(ctx.entries)
        if self._plan is None or ctx.off_plan:
            return [float(w) for w in row[:m]]
        first = ctx.entries[0][0]
        dtype = torch.float64 if any(leaf.dtype == torch.float64 for leaf in ctx.entries[0]) else torch.float32
        table = self._tables.get((first.device, dtype))
        if table is None:  # one host-to-device copy per grid, device and dtype
            table = torch.as_tensor(self._plan.weights, dtype=dtype, device=first.device)
            self._tables[(first.device, dtype)] = table
        return table[decision.index]

    def _predict(self, ctx: _Context, decision: abcore.StepDecision, stats: ContextStats) -> list[torch.Tensor] | None:
        """The predicted leaves, or None when the step must compute (non-finite, or adaptive rejection)."""
        pred = extrapolate(ctx.entries, self._weights(ctx, decision, decision.weights))
        checks: list[torch.Tensor] = []
        if self.check_finite:
            checks.append(torch.stack([(~torch.isfinite(p)).any() for p in pred]).any().to(torch.float64))
        if self.config.adaptive:
            delta = extrapolate(ctx.entries, [float(e) for e in decision.error_weights[: len(ctx.entries)]])
            checks += [_squared_sum(delta), _squared_sum(pred)]
        if not checks:
            return pred
        values = self._all_reduce(torch.stack(checks)).tolist()  # the one host read of a checked step
        if self.check_finite and values.pop(0) > 0:
            stats.fallbacks += 1
            return None
        if self.config.adaptive:
            delta_sq, pred_sq = values
            if not abcore.accept_prediction(delta_sq, pred_sq, cast(float, self.config.tolerance)):
                return None
            stats.note_error(math.sqrt(delta_sq / pred_sq) if pred_sq > 0 else 0.0)
        return pred

    def _all_reduce(self, values: torch.Tensor) -> torch.Tensor:
        """Sum `values` over the ranks of the process group (identity without torch.distributed)."""
        dist = torch.distributed
        if not (dist.is_available() and dist.is_initialized()):
            return values
        if dist.get_world_size(self.process_group) < 2:
            return values
        values = values.clone()
        dist.all_reduce(values, op=dist.ReduceOp.SUM, group=self.process_group)
        return values

    def __repr__(self) -> str:
        grid = "step by step" if self._times is None else f"{self._times.size} announced steps"
        return f"CacheState({self.config!r}, {grid}, contexts={sorted(self._contexts)}, stats={self._stats!r})"
