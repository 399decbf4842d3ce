"""`CacheEngine`: routes model calls to per-context histories and executes abcore's step rule on them.

At step i a context either calls the model, or returns f^ = sum_j w_j H_j, the Lagrange
extrapolation through its last k = config.order computed outputs (paper, Eq. 3.5; Eq. 3.6 with
an exponential weighting). Every decision and weight is abcore's: the `make_plan` table on an
announced grid in fixed mode, else `abcore.decide` on the context's `RuleState` (host numpy).
With the sampler's `LinearSteps` a computed step returns f_n + sum_l c_l [f_n, H]_l, c from
`abcore.correction_weights`, while the history keeps the raw f_n.
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

from abcache_torch._history import History, any_non_finite, squared_sum
from abcache_torch._stats import CacheStats

T = TypeVar("T")
DEFAULT_CONTEXT = "default"


@dataclasses.dataclass
class Joint:
    """An adaptive decision at `step` made for every context at that step (`predicted` leaves, or None: compute)."""

    step: int
    node: float
    predicted: list[torch.Tensor] | None


@dataclasses.dataclass
class Cursor:
    """Where one context stands in its generation: the step index, abcore's `RuleState`, and what is pending.

    pending: (node, correction weights or None) of the compute step `predict` announced, until `store`.
    on_plan: whether the history is the one the announced plan foresaw (a fallback leaves it).
    joint: the adaptive decision another context took for this one at its next step.
    last_time, direction: the previous time and the grid direction (new generations without a grid).
    """

    rule: abcore.RuleState
    step: int = 0
    pending: tuple[float, np.ndarray | None] | None = None
    on_plan: bool = True
    joint: Joint | None = None
    last_time: float | None = None
    direction: float = 0.0

    def advance(self, config: abcore.ABConfig, node: float, time: float, computed: bool, a: float, b: float) -> None:
        """Move past the current step: `abcore.after_computed` or `after_predicted` on the rule state."""
        if computed:
            self.rule = abcore.after_computed(self.rule, node)
        else:
            self.rule = abcore.after_predicted(self.rule, node, a, b)
        if self.last_time is not None and self.step == 1:
            self.direction = math.copysign(1.0, time - self.last_time)
        self.step += 1
        self.last_time = time

    def starts_generation(self, time: float) -> bool:
        """True when `time` cannot continue this generation (it repeats or moves against the grid)."""
        if self.last_time is None:
            return False
        delta = time - self.last_time
        return delta == 0.0 or delta * self.direction < 0.0


@dataclasses.dataclass
class _Context:
    history: History
    cursor: Cursor
    key: Hashable = None


def _as_time(time: Any) -> float:
    """A step time as a float; a tensor (0-d, or a batch of equal values) is read from the device."""
    if isinstance(time, torch.Tensor):
        if time.numel() == 0:
            raise ValueError("time must hold a value, got an empty tensor")
        low, high = (float(v) for v in torch.aminmax(time.detach().reshape(-1)))
        if low != high:
            raise ValueError(f"time: the batch holds different times ({low} .. {high}); one cache step needs one time")
        time = low
    if isinstance(time, bool) or not isinstance(time, numbers.Real):
        raise TypeError(f"time must be a real number (or None with an announced grid), got {type(time).__name__}")
    value = float(time)
    if not math.isfinite(value):
        raise ValueError(f"time must be finite, got {value!r}")
    return value


def _close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-5, abs_tol=1e-8)


class CacheEngine:
    """The cache engine: one `History` and one `Cursor` per context name.

    Args:
        config: the abcore schedule (order, interval, warm-up, cool-down, mask, tolerance, correction).
        times: the step times (abscissa values: sigma, t or lambda) of the coming generations,
            one per model call; announces the grid (see `set_grid`).
        num_steps: the number of steps, when only that is known (enables cool-down and masks;
            the weights come step by step from the real times).
        steps: the sampler's `abcore.LinearSteps` (x_{j+1} = a_j x_j + b_j out_j, one entry per
            step): enables the correction of predicted steps (``config.correct``).
        check_finite: test every prediction for NaN / inf and compute the step when one is found
            (counted in ``stats.fallbacks``); one boolean read from the device per predicted step.
        process_group: the `torch.distributed` group whose ranks must agree on every decision
            (default: the world, when `torch.distributed` is initialised with several ranks).

    Adaptive mode decides once per step for all contexts: the first context to reach step i tests
    the embedded error of every context at step i with a history (`abcore.accept_prediction` on
    their sums, all-reduced over the ranks), and the others reuse the decision, so cond and uncond
    make the same calls.

    Memory: each context stores at most ``config.order`` outputs (references, not copies).
    """

    def __init__(
        self,
        config: abcore.ABConfig,
        times: Sequence[float] | np.ndarray | torch.Tensor | None = None,
        *,
        num_steps: int | None = None,
        steps: abcore.LinearSteps | None = None,
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
        self.set_grid(times, num_steps=num_steps, steps=steps)

    # ----------------------------------------------------------------------------- grid and state
    def set_grid(
        self,
        times: Sequence[float] | np.ndarray | torch.Tensor | None,
        *,
        num_steps: int | None = None,
        steps: abcore.LinearSteps | None = None,
    ) -> None:
        """Announce (or forget, with None) the step times of the coming generations; resets all histories.

        With `times`, a fixed config executes `abcore.make_plan(config, times, steps)` and the step
        index of a context comes from its call counter (a generation is ``len(times)`` calls), so
        `predict` accepts ``time=None``. A given time is checked against the grid; the grid's first
        time restarts the generation. `steps` (or `num_steps`) alone fixes the number of steps.
        """
        if steps is not None and not isinstance(steps, abcore.LinearSteps):
            raise TypeError(f"steps must be an abcore.LinearSteps or None, got {type(steps).__name__}")
        t = None if times is None else abcore.as_times(times, "times")
        given = {"times": None if t is None else t.size, "num_steps": num_steps}
        given["steps"] = None if steps is None else steps.num_steps
        sizes = {name: value for name, value in given.items() if value is not None}
        if num_steps is not None and (isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1):
            raise ValueError(f"num_steps must be an integer >= 1 or None, got {num_steps!r}")
        if len(set(sizes.values())) > 1:
            raise ValueError(f"the number of steps disagrees: {sizes}")
        n = next(iter(sizes.values()), None)
        if n is not None:
            self.config.check_num_steps(n)
        self._times, self._num_steps, self._steps = t, n, steps
        self._forced = None if n is None else self.config.forced_mask(n)
        self._plan = None if t is None or self.config.adaptive else abcore.make_plan(self.config, t, steps)
        self._correct = steps is not None and self.config.corrects(True)
        self._tables: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}
        self.reset()

    def validate(self) -> None:
        """Raise ValueError when the config needs what was not announced (called before every first step).

        Cool-down and compute_mask need the number of steps; ``correct=True`` needs the `steps`.
        """
        c = self.config
        if self._num_steps is None and (c.cooldown or c.compute_mask is not None):
            what = f"cooldown={c.cooldown}" if c.cooldown else "compute_mask"
            raise ValueError(
                f"{what} needs the number of steps: pass num_steps= or times= (set_grid), or use cooldown=0"
                + ("" if c.cooldown else " and no compute_mask")
            )
        c.corrects(self._steps is not None)

    @property
    def times(self) -> np.ndarray | None:
        return None if self._times is None else self._times.copy()

    @property
    def grid_announced(self) -> bool:
        """Whether the times are announced (steps then come from the call counter)."""
        return self._times is not None

    @property
    def num_steps(self) -> int | None:
        return self._num_steps

    @property
    def steps(self) -> abcore.LinearSteps | None:
        return self._steps

    @property
    def plan(self) -> abcore.CachePlan | None:
        """The fixed plan executed on the announced grid (None when deciding step by step)."""
        return self._plan

    def reset(self) -> None:
        """Forget all histories and cursors (keeps the stats)."""
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
        ctx = self._contexts.get(self._name(context))
        return 0 if ctx is None else len(ctx.history)

    # ----------------------------------------------------------------------------- one step
    def step(self, time: Any, compute: Callable[[], T], context: str | None = None, *, key: Hashable = None) -> T:
        """Run one step at `time`: the (corrected) `compute()` at compute steps, the prediction otherwise.

        time: the step's abscissa (a float; a tensor is read with `.item()`), or None when a grid is
            announced (the context's call counter gives the step).
        compute: the model call; its result (tensor, tuple, list, dict or dataclass of tensors) is
            stored and returned (corrected when the steps are known). At predicted steps it is not
            called, and the result has the same structure with every tensor leaf sum_j w_j H_j.
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
        ctx = self._context(name, key)
        time_value, node = self._locate(ctx, time)
        cursor = ctx.cursor
        cursor.pending = None
        step = cursor.step
        leaves = self._prediction(name, ctx, node)
        if leaves is not None:
            self._stats.context(name).predicted += 1
            cursor.advance(self.config, node, time_value, False, *self._coefficients(step))
            return True, ctx.history.unflatten(leaves)
        if self._plan is not None and not self._plan.compute[step]:
            cursor.on_plan = False  # a fallback: the history now holds an output the plan did not foresee
        cursor.pending = (time_value, self._correction(cursor, node))
        return False, None

    def store(self, result: T, context: str | None = None) -> T:
        """Second half of `step`: store the raw model output of the announced compute step, return it corrected."""
        name = self._name(context)
        ctx = self._contexts.get(name)
        if ctx is None or ctx.cursor.pending is None:
            raise ValueError(f"context {name!r} has no pending compute step: call predict() first")
        cursor, history = ctx.cursor, ctx.history
        time_value, c = ctx.cursor.pending
        cursor.pending = None
        node = abcore.node_of(self.config, float(cursor.step), time_value)
        output = result
        if not history.matches(result):
            # outputs of another structure or shape: drop the old ones (no correction), keep the grid position
            history.clear()
            cursor.rule = abcore.init_state(self.config, self.config.max_run)
            cursor.on_plan = False
        elif c is not None:
            output = history.correct(result, c.tolist())
        history.push(result)
        cursor.advance(self.config, node, time_value, True, 1.0, 1.0)
        self._stats.context(name).computed += 1
        return cast(T, output)

    # ----------------------------------------------------------------------------- internals
    def _name(self, context: str | None) -> str:
        name = self.current_context if context is None else context
        if not isinstance(name, str):
            raise TypeError(f"context must be a str or None, got {type(name).__name__}")
        return name

    def _fresh(self, key: Hashable = None) -> _Context:
        return _Context(History(self.config.order), Cursor(abcore.init_state(self.config, self.config.max_run)), key)

    def _context(self, name: str, key: Hashable) -> _Context:
        ctx = self._contexts.get(name)
        if ctx is None or (ctx.key != key and (len(ctx.history) or ctx.cursor.step)):
            if ctx is None:
                self.validate()
            ctx = self._contexts[name] = self._fresh(key)
        ctx.key = key
        return ctx

    def _restart(self, ctx: _Context) -> None:
        fresh = self._fresh(ctx.key)
        ctx.history, ctx.cursor = fresh.history, fresh.cursor

    def _locate(self, ctx: _Context, time: Any) -> tuple[float, float]:
        """(time, node) of the context's next step, restarting its generation when the time says so."""
        n = self._num_steps
        if n is not None and ctx.cursor.step >= n:
            self._restart(ctx)
        value = None if time is None else _as_time(time)
        if self._times is not None:
            step = ctx.cursor.step
            if value is not None and not _close(value, self._times[step]):
                if step > 0 and _close(value, self._times[0]):
                    self._restart(ctx)
                else:
                    raise ValueError(
                        f"time {value!r} is not step {step} of the announced grid (expected {self._times[step]!r}); "
                        "call reset() between generations or announce the right grid with set_grid"
                    )
            value = float(self._times[ctx.cursor.step])
        elif value is None:
            raise ValueError("time is required when no grid of times is announced (pass times to set_grid)")
        elif ctx.cursor.starts_generation(value):
            self._restart(ctx)
        return value, float(abcore.node_of(self.config, float(ctx.cursor.step), value))

    def _coefficients(self, step: int) -> tuple[float, float]:
        steps = self._steps
        return (1.0, 1.0) if steps is None else (float(steps.a[step]), float(steps.b[step]))

    def _forced_at(self, step: int) -> bool:
        return bool(self._forced[step]) if self._forced is not None else self.config.forced_compute(step, None)

    def _correction(self, cursor: Cursor, node: float) -> np.ndarray | None:
        """c over [f_n, H_0, ...] at the compute step (the plan's row on the plan), or None when zero."""
        if not self._correct:
            return None
        if self._plan is not None and cursor.on_plan:
            c = self._plan.corrections[cursor.step]
        else:
            c = abcore.correction_weights(self.config, cursor.rule, node, *self._coefficients(cursor.step))
        return c if np.any(c != 0.0) else None

    def _prediction(self, name: str, ctx: _Context, node: float) -> list[torch.Tensor] | None:
        """The predicted leaves of the context's next step, or None when it computes."""
        cursor, history = ctx.cursor, ctx.history
        if self.config.adaptive:
            return self._joint(name, ctx, node)
        if self._plan is not None and cursor.on_plan:
            if self._plan.compute[cursor.step]:
                return None
            leaves = history.predict_leaves(self._table(history)[cursor.step])
        else:
            decision = abcore.decide(self.config, cursor.rule, node, self._forced_at(cursor.step))
            if decision.compute:
                return None
            leaves = history.predict_leaves([float(w) for w in decision.weights])
        if self.check_finite and self._all_reduce(any_non_finite(leaves)).item() > 0:  # the one host read
            self._stats.context(name).fallbacks += 1
            return None
        return leaves

    def _joint(self, name: str, ctx: _Context, node: float) -> list[torch.Tensor] | None:
        """Adaptive mode: the decision at this step, taken once for every context at the same step."""
        step = ctx.cursor.step
        joint, ctx.cursor.joint = ctx.cursor.joint, None
        if joint is not None and joint.step == step and joint.node == node:
            return joint.predicted
        if not len(ctx.history):
            return None
        forced = self._forced_at(step)
        group = [
            (other, c) for other, c in sorted(self._contexts.items())
            if c.cursor.step == step and c.cursor.pending is None and len(c.history)
        ]  # fmt: skip
        decisions = [abcore.decide(self.config, c.cursor.rule, node, forced) for _, c in group]
        predicted: list[list[torch.Tensor]] | None = None
        if not any(bool(d.compute) for d in decisions):
            predicted, checks = [], []
            for (_, c), d in zip(group, decisions):
                pred = c.history.predict_leaves([float(w) for w in d.weights])
                delta = c.history.predict_leaves([float(e) for e in d.error_weights])
                predicted.append(pred)
                checks += [squared_sum(delta), squared_sum(pred)]
                if self.check_finite:
                    checks.append(any_non_finite(pred))
            width = 3 if self.check_finite else 2
            values = self._all_reduce(torch.stack(checks)).reshape(-1, width).cpu().numpy()  # the one host read
            delta_sq, pred_sq = values[:, 0], values[:, 1]
            if self.check_finite and np.any(values[:, 2] > 0):
                for (other, _), bad in zip(group, values[:, 2] > 0):
                    if bad:
                        self._stats.context(other).fallbacks += 1
                predicted = None
            elif not abcore.accept_prediction(delta_sq, pred_sq, cast(float, self.config.tolerance)):
                predicted = None
            else:
                for (other, _), d_sq, p_sq in zip(group, delta_sq, pred_sq):
                    self._stats.context(other).note_error(math.sqrt(d_sq / p_sq) if p_sq > 0 else 0.0)
        mine = None
        for i, (other, c) in enumerate(group):
            leaves = None if predicted is None else predicted[i]
            if other == name:
                mine = leaves
            else:
                c.cursor.joint = Joint(step, node, leaves)
        return mine

    def _table(self, history: History) -> torch.Tensor:
        """The plan's weights as a device tensor (one host-to-device copy per grid, device and dtype)."""
        assert self._plan is not None
        first = history.entries[0]
        dtype = (
            torch.float64 if any(leaf.dtype in (torch.float64, torch.complex128) for leaf in first) else torch.float32
        )
        table = self._tables.get((first[0].device, dtype))
        if table is None:
            table = torch.tensor(self._plan.weights, dtype=dtype, device=first[0].device)
            self._tables[(first[0].device, dtype)] = table
        return table

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
        return f"CacheEngine({self.config!r}, {grid}, contexts={sorted(self._contexts)}, stats={self._stats!r})"
