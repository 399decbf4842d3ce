"""`HostStepper`: AB-Cache for a sampling loop that stays in Python (MaxDiffusion's Wan, flaxdiff).

Such a pipeline calls a compiled model and its scheduler's ``step`` once per step from a host loop;
the stepper answers, per step index i, "compute or predict" and keeps the outputs:

    out = stepper.predict(i)                        None: the step computes
    if out is None:
        out = stepper.record(i, model(x, t_i))      f_i, corrected with the sampler's LinearSteps
    x = scheduler.step(out, t_i, x)                 any step, linear or not

This is abcore's transition, executed on the host with ``xp=numpy``: `predict` runs `abcore.decide`
(and `abcore.complete` when it predicts), `record` applies the decision's correction weights and runs
`abcore.complete`. In fixed mode (no tolerance) a decision depends on the schedule and the rule state
only, never on the data, so it is made on the host without reading a device value; the arrays are
touched only by jitted weighted sums over a fixed-shape buffer of the last ``order`` computed outputs
(`weighted_sum`, `push`): out_i = sum_j w_j H_j (Eq. 3.5) at a predicted step, and
f_n + sum_l c_l [f_n, H_0, ...]_l at a computed one when the step is linear (``steps`` given and
``config.corrects``). Nothing is derived here: w, e and c are `abcore.Decision`'s.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
from dataclasses import dataclass
from typing import Any

import abcore
import jax
import jax.numpy as jnp
import numpy as np
from abcore import ABConfig, LinearSteps

from abcache_jax._history import PyTree, all_finite, push, same_layout, sum_of_squares, weighted_sum


@dataclass(frozen=True, eq=False)
class _Segment:
    """Steps [start, stop) of the run, executed as a run of their own (step start + j is its step j)."""

    start: int
    stop: int
    schedule: abcore.Schedule


def _cast_like(tree: PyTree, buffer: PyTree) -> PyTree:
    return jax.tree.map(lambda v, b: v.astype(b.dtype), tree, buffer)


@jax.jit
def _predict(outputs: PyTree, weights: jax.Array) -> PyTree:
    """sum_j w_j H_j in the outputs' dtypes (accumulated as `weighted_sum` does)."""
    return _cast_like(weighted_sum(outputs, weights), outputs)


@functools.partial(jax.jit, static_argnames=("tolerance", "check_finite"))
def _attempt(
    outputs: PyTree, weights: jax.Array, error_weights: jax.Array, tolerance: float | None, check_finite: bool
) -> tuple[PyTree, jax.Array]:
    """The prediction and whether it is accepted: `abcore.joint` on its embedded error (adaptive), finiteness."""
    pred = _cast_like(weighted_sum(outputs, weights), outputs)
    ok = jnp.asarray(True)
    if tolerance is not None:
        delta = weighted_sum(outputs, error_weights)
        ok = abcore.joint(sum_of_squares(delta), sum_of_squares(pred), tolerance, xp=jnp)
    if check_finite:
        ok = ok & all_finite(pred)
    return pred, ok


@functools.partial(jax.jit, static_argnames=("order",))
def _first(output: PyTree, order: int) -> PyTree:
    """A buffer of `order` entries holding `output` as H_0 (zeros behind it, which the weights never read)."""
    return jax.tree.map(lambda f: jnp.zeros((order, *f.shape), f.dtype).at[0].set(f), output)


@jax.jit
def _push(outputs: PyTree, output: PyTree) -> PyTree:
    return push(outputs, output)


@jax.jit
def _corrected(outputs: PyTree, output: PyTree, correction: jax.Array) -> tuple[PyTree, PyTree]:
    """(f + c_0 f + sum_j c_{j+1} H_j in f's dtypes, the buffer with f pushed as H_0)."""
    rest = weighted_sum(outputs, correction[1:])
    out = jax.tree.map(
        lambda f, r: (f.astype(r.dtype) + (correction[0].astype(r.dtype) * f.astype(r.dtype) + r)).astype(f.dtype),
        output,
        rest,
    )
    return out, push(outputs, output)


def _describe(tree: PyTree) -> str:
    return str(jax.tree.map(lambda v: f"{jnp.result_type(v)}{list(np.shape(v))}", tree))


class HostStepper:
    """AB-Cache for one sampling run driven by a host loop: ``predict(i)``, and ``record(i, f)`` when it computes.

    Executes abcore's step rule exactly as `abcore.sample` and `abcache_jax.sample` do (same computed
    steps, outputs to 1e-10 in float64), one step index at a time, with any sampler step in between:

    .. code-block:: python

        stepper = aj.HostStepper(config, sigmas)  # sigmas: the n + 1 grid values
        for i in range(n):
            out = stepper.predict(i)
            if out is None:  # the rule computes this step
                out = stepper.record(i, model(x, sigmas[i]))
            x = scheduler.step(out, i, x)

    Fixed mode (``config.tolerance`` None): the decision comes from the schedule and the rule state on
    the host (`abcore.decide` on numpy); no device value is read, so the loop never waits for the device
    and it may even be traced under ``jax.jit``. A prediction is a jitted weighted sum
    sum_j w_j H_j over a fixed-shape buffer of the last ``order`` computed outputs (Eq. 3.5, error O(h^k)).
    Adaptive mode (``tolerance`` set): a step the schedule does not force is predicted only when
    `abcore.joint` accepts the embedded error estimate p_k - p_{k-1}, a device value: `predict` reads one
    boolean from the device (one sync) at each such candidate step, and none at the forced ones.

    Boundaries (Wan 2.2's two experts, or any change of model): ``boundaries=(b,)`` splits the run into
    steps [0, b) and [b, n), and each part is executed as a run of its own, exactly as if ``sample`` were
    called on ``grid[0 : b + 1]`` and then on ``grid[b:]`` (with ``steps`` and a ``compute_mask`` sliced the
    same way): the history is emptied at b, so no output of one model predicts or corrects an output of
    the next; step b + j is step j of the second part's schedule (warm-up from b, its interval counted
    from b, its cool-down before the part ends; the predicted steps pending at b stay uncorrected, which
    the first part's cool-down avoids). The sampler's own state (a multistep scheduler's past outputs)
    is the user's and is not touched.

    One stepper serves one run of one cache context (batch CFG into one output, as Wan does): make a new
    one per run; the compiled weighted sums are shared by all steppers.

    Args:
        config: an `abcore.ABConfig` (fixed, or adaptive with ``tolerance``).
        grid: the n + 1 sampler times on the rule's abscissa (sigma for flow matching), like
            ``sample``'s grid; step i is called at grid[i]; the last value is never called.
        steps: the sampler's `abcore.LinearSteps` (n entries, x' = a x + b out) when its step is linear,
            which enables the correction (``config.correct``); None (the default) for a non-linear or
            multistep scheduler such as UniPC: no correction (``correct=True`` then raises).
        boundaries: strictly increasing step indices in [1, n) where the history starts afresh.
        check_finite: a non-finite prediction runs the model instead, as in `abcore.sample`. It reads
            the prediction's finiteness from the device, so in fixed mode it costs one sync per
            predicted step (default False: no sync); in adaptive mode it is part of the one sync.

    Raises:
        TypeError: config is not an `abcore.ABConfig`, steps not an `abcore.LinearSteps`.
        ValueError: naming the parameter, for a bad grid (not 1-D, not real, not strictly monotonic,
            fewer than 2 values), steps of the wrong length, ``correct=True`` without steps, a schedule
            that does not fit the run or a part of it (``boundaries``), or bad boundaries.
    """

    def __init__(
        self,
        config: ABConfig,
        grid: Any,
        *,
        steps: LinearSteps | None = None,
        boundaries: Any = (),
        check_finite: bool = False,
    ) -> None:
        if not isinstance(config, ABConfig):
            raise TypeError(f"config must be an abcore.ABConfig, got {type(config).__name__}")
        g = abcore.as_grid(grid, "grid")
        g.flags.writeable = False
        n = g.size - 1
        abcore.schedule(config, g[:-1], steps)  # the whole run: steps' length, correct=True, the schedule's fit
        if not isinstance(check_finite, bool):
            raise ValueError(f"check_finite must be a bool, got {check_finite!r}")
        cuts = _boundaries(boundaries, n)
        self._config = config
        self._grid = g
        self._boundaries = cuts
        self._check_finite = check_finite
        self._segments = tuple(
            _segment(config, g, steps, start, stop) for start, stop in zip((0, *cuts), (*cuts, n), strict=True)
        )
        self._computed = np.zeros(n, dtype=bool)
        self._next = 0
        self._segment_index = -1
        self._rule: abcore.RuleState | None = None
        self._outputs: PyTree = None
        self._decision: Any = None  # abcore.decide's Decision of a step left to compute

    @property
    def config(self) -> ABConfig:
        return self._config

    @property
    def grid(self) -> np.ndarray:
        """The n + 1 grid values (float64, read-only)."""
        return self._grid

    @property
    def num_steps(self) -> int:
        return int(self._grid.size - 1)

    @property
    def boundaries(self) -> tuple[int, ...]:
        return self._boundaries

    @property
    def next_step(self) -> int:
        """The index the next `predict` call must have (n once the run is over)."""
        return self._next

    @property
    def computed(self) -> np.ndarray:
        """(n,) bool: the steps that ran the model so far (a copy; False for steps not run yet)."""
        return self._computed.copy()

    def predict(self, i: int) -> PyTree | None:
        """The output of step i predicted from the history, or None when step i must compute.

        None means: call the model and pass its output to ``record(i, output)`` before the next step.
        In fixed mode no device value is read; in adaptive mode one boolean at each candidate step.
        """
        i = self._index(i)
        if self._decision is not None:
            step = self._next
            raise ValueError(f"i: step {step} must compute: call record({step}, output) before predict({i})")
        if i != self._next:
            raise ValueError(f"i must be the next step, {self._next}, got {i}: call predict once per step, in order")
        segment = self._enter(i)
        local = i - segment.start
        rule = self._rule
        assert rule is not None
        decision = abcore.decide(segment.schedule, rule, local)
        if not bool(decision.compute):  # a numpy bool: the rule ran on the host
            if self._config.adaptive or self._check_finite:
                pred, ok = _attempt(
                    self._outputs,
                    decision.weights,
                    decision.error_weights,
                    self._config.tolerance,
                    self._check_finite,
                )
                accepted = bool(ok)  # the one device-to-host read of a candidate step
            else:
                pred, accepted = _predict(self._outputs, decision.weights), True
            if accepted:
                self._rule = abcore.complete(segment.schedule, rule, local, False)
                self._next = i + 1
                return pred
        self._decision = decision
        return None

    def record(self, i: int, output: PyTree) -> PyTree:
        """Store the model's output f_i of a step `predict(i)` left to compute; returns the output to step with.

        That is f_i itself, or with the correction (``steps`` given and ``config.corrects``)
        f_i + sum_l c_l [f_i, H_0, ...]_l, which makes the sampler's own step i correct the predicted
        steps since the last computed one. The buffer keeps the raw f_i. Reads no device value.
        """
        i = self._index(i)
        decision = self._decision
        if decision is None or i != self._next:
            raise ValueError(
                f"i: record({i}, output) must follow predict({i}) returning None; the next step is {self._next}"
            )
        segment = self._segments[self._segment_index]
        output = self._check_output(output)
        if self._outputs is None:
            out, self._outputs = output, _first(output, self._config.order)
        elif segment.schedule.correct:
            out, self._outputs = _corrected(self._outputs, output, decision.correction)
        else:
            out, self._outputs = output, _push(self._outputs, output)
        assert self._rule is not None
        self._rule = abcore.complete(segment.schedule, self._rule, i - segment.start, True)
        self._computed[i] = True
        self._decision = None
        self._next = i + 1
        return out

    def _index(self, i: Any) -> int:
        if isinstance(i, bool) or not isinstance(i, (int, np.integer)):
            raise ValueError(f"i must be a step index (a Python or numpy integer), got {i!r}")
        if not 0 <= i < self.num_steps:
            raise ValueError(f"i must be a step index in [0, {self.num_steps}), got {i}")
        return int(i)

    def _enter(self, i: int) -> _Segment:
        """The segment of step i; at its first step the rule and the buffer start afresh."""
        index = self._segment_index
        if index < 0 or i >= self._segments[index].stop:
            index = self._segment_index = index + 1
            self._rule = abcore.begin(self._segments[index].schedule)
            self._outputs = None
        return self._segments[index]

    def _check_output(self, output: PyTree) -> PyTree:
        leaves = jax.tree.leaves(output)
        if not leaves or not all(jnp.issubdtype(jnp.result_type(leaf), jnp.inexact) for leaf in leaves):
            raise ValueError(
                f"output must be a pytree of floating-point arrays to extrapolate, got {_describe(output)}"
            )
        output = jax.tree.map(jnp.asarray, output)
        if self._outputs is not None:
            expected = jax.tree.map(lambda b: jax.ShapeDtypeStruct(b.shape[1:], b.dtype), self._outputs)
            got = jax.tree.map(lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype), output)
            if not same_layout(got, expected):
                raise ValueError(
                    f"output must have the structure, shapes and dtypes of the outputs recorded before "
                    f"({_describe(expected)}), got {_describe(got)}"
                )
        return output


def _boundaries(boundaries: Any, n: int) -> tuple[int, ...]:
    values = (boundaries,) if isinstance(boundaries, (int, np.integer)) else boundaries
    try:
        cuts = tuple(values)
    except TypeError:
        raise ValueError(f"boundaries must be step indices in [1, {n}), got {boundaries!r}") from None
    if any(isinstance(b, bool) or not isinstance(b, (int, np.integer)) or not 1 <= b < n for b in cuts):
        raise ValueError(f"boundaries must be step indices in [1, {n}), got {boundaries!r}")
    if any(b >= c for b, c in itertools.pairwise(cuts)):
        raise ValueError(f"boundaries must be strictly increasing, got {boundaries!r}")
    return tuple(int(b) for b in cuts)


def _segment(config: ABConfig, grid: np.ndarray, steps: LinearSteps | None, start: int, stop: int) -> _Segment:
    """The schedule of steps [start, stop) as a run of its own (mask and steps sliced)."""
    n = grid.size - 1
    try:
        if config.compute_mask is not None and (start, stop) != (0, n):
            config = dataclasses.replace(config, compute_mask=config.compute_mask[start:stop])
        part = steps
        if steps is not None and (start, stop) != (0, n):
            part = LinearSteps(steps.a[start:stop], steps.b[start:stop])
        schedule = abcore.schedule(config, grid[start:stop], part)
    except ValueError as error:
        raise ValueError(f"boundaries: steps [{start}, {stop}) run as a run of their own, and {error}") from error
    return _Segment(start, stop, schedule)
