"""`sample`: a jit-compiled AB-Cache sampling loop on `lax.scan`.

One scan step i runs, with t = times[i]:

    out_i = model_fn(params, x_i, t)               at a computed step,
    out_i = sum_j w_ij H_j                         at a predicted step (Eq. 3.6),
    x_{i+1} = step_fn(x_i, out_i, t, times[i + 1]),

where H is the `CacheState` buffer of the last ``order`` computed outputs, newest first,
and w_i the weights abcore derives on the real step times (paper, Section 3.3). The
choice between the two is a `lax.cond`, so a predicted step never evaluates the model.
The plan (which steps must compute, and in fixed mode the weights) is static data
built by abcore when `sample` is traced; `jax.jit` compiles once per plan.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from abcore import ABConfig, CachePlan, accept_prediction, as_times, history_weights, make_plan
from jax import lax

from abcache_jax._state import (
    CacheState,
    PyTree,
    _time_dtype,
    all_finite,
    extrapolate,
    init_state,
    mark_predicted,
    push,
    sum_of_squares,
    weighted_sum,
)

ModelFn = Callable[[PyTree, PyTree, jax.Array], PyTree]
StepFn = Callable[[PyTree, PyTree, jax.Array, jax.Array], PyTree]


class Trajectory(NamedTuple):
    """Result of `sample`.

    x: the final sample. computed: (n,) bool, which steps ran the model. state: the
    final `CacheState` (sharded like the model outputs). outputs: the (n, ...) stacked
    outputs used at every step when ``keep_outputs=True``, else None.
    """

    x: PyTree
    computed: jax.Array
    state: CacheState
    outputs: PyTree  # None unless keep_outputs


@dataclass(frozen=True, eq=False)
class _Program:
    """Everything static about one sampling run; hashed by content so jit caches per plan."""

    model_fn: ModelFn
    step_fn: StepFn
    config: ABConfig
    times: np.ndarray  # (n + 1,)
    forced: np.ndarray  # (n,) bool: steps that compute whatever the data
    weights: np.ndarray  # (n, order): fixed-mode prediction weights (unused in adaptive mode)
    unroll: int | bool
    fallback: bool
    keep_outputs: bool
    key: tuple = field(init=False, repr=False)

    def __post_init__(self) -> None:
        arrays = tuple(a.tobytes() for a in (self.times, self.forced, self.weights))
        flags = (self.unroll, self.fallback, self.keep_outputs)
        object.__setattr__(self, "key", (self.model_fn, self.step_fn, self.config, *arrays, *flags))

    def __hash__(self) -> int:
        return hash(self.key)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Program) and self.key == other.key


def _concrete_times(times: Any) -> np.ndarray:
    if isinstance(times, jax.core.Tracer):
        raise ValueError(
            "times must be concrete (a numpy array, list or concrete jax array): the cache plan is built "
            "from it at trace time; close over it instead of passing it as a traced argument"
        )
    if np.ndim(times) != 1:
        raise ValueError(f"times must be a 1-D array of n + 1 step times, got shape {np.shape(times)}")
    t = as_times(times, "times")
    if t.size < 2:
        raise ValueError(f"times must hold at least 2 entries (n steps need n + 1), got {t.size}")
    return t


@functools.lru_cache(maxsize=64)
def _schedule(config: ABConfig, step_times: bytes) -> tuple[np.ndarray, np.ndarray]:
    """(forced, weights) for `config` on the step times: abcore's plan, or its forced mask when adaptive."""
    t = np.frombuffer(step_times, dtype=np.float64)
    n = t.size
    if config.adaptive:
        forced = np.array([config.forced_compute(i, n) for i in range(n)], dtype=bool)
        return forced, np.zeros((n, config.order))
    plan = make_plan(config, t)
    return plan.compute, plan.weights


def _resolve(config_or_plan: ABConfig | CachePlan, t: np.ndarray) -> tuple[ABConfig, np.ndarray, np.ndarray]:
    n = t.size - 1
    if isinstance(config_or_plan, ABConfig):
        forced, weights = _schedule(config_or_plan, t[:-1].tobytes())
        return config_or_plan, forced, weights
    if isinstance(config_or_plan, CachePlan):
        plan = config_or_plan
        if plan.config.adaptive:
            raise ValueError("config_or_plan: a CachePlan must come from a fixed (non-adaptive) config")
        if plan.num_steps != n or not np.array_equal(np.asarray(plan.times, np.float64), t[:-1]):
            raise ValueError(
                f"config_or_plan: the plan's {plan.num_steps} step times must equal times[:-1] ({n} steps)"
            )
        compute = np.asarray(plan.compute, dtype=bool)
        weights = np.asarray(plan.weights, dtype=np.float64)
        if compute.shape != (n,) or not compute[0] or weights.shape != (n, plan.config.order):
            raise ValueError(
                f"config_or_plan: the plan needs compute of shape ({n},) starting with True and weights of shape "
                f"({n}, {plan.config.order}), got {compute.shape} and {weights.shape}"
            )
        return plan.config, compute, weights
    raise TypeError(f"config_or_plan must be an abcore.ABConfig or abcore.CachePlan, got {type(config_or_plan)!r}")


def _describe(tree: PyTree) -> str:
    return str(jax.tree.map(lambda s: f"{s.dtype}{list(s.shape)}", tree))


def _check_signatures(program: _Program, params: PyTree, x: PyTree, t: jax.Array) -> PyTree:
    """Trace-time checks of model_fn and step_fn against x; returns the model output's shapes."""
    out = jax.eval_shape(program.model_fn, params, x, t)
    if not all(jnp.issubdtype(s.dtype, jnp.inexact) for s in jax.tree.leaves(out)):
        raise ValueError(f"model_fn must return floating-point arrays to extrapolate, got {_describe(out)}")
    single = jax.tree_util.treedef_is_leaf(jax.tree.structure(x)) and jax.tree_util.treedef_is_leaf(
        jax.tree.structure(out)
    )
    if single and out.shape != np.shape(x):
        raise ValueError(
            f"model_fn(params, x, t) returned shape {out.shape} but x has shape {np.shape(x)}; "
            "a model whose output is not shaped like x must return a pytree (e.g. a tuple) that step_fn unpacks"
        )
    x_next = jax.eval_shape(program.step_fn, x, out, t, t)
    expected = jax.eval_shape(lambda v: v, x)
    same_structure = jax.tree.structure(x_next) == jax.tree.structure(expected)  # type: ignore[operator]
    if not same_structure or any(
        (a.shape, a.dtype) != (b.shape, b.dtype)
        for a, b in zip(jax.tree.leaves(x_next), jax.tree.leaves(expected), strict=True)
    ):
        raise ValueError(
            f"step_fn(x, out, t, t_next) must return x's structure, shapes and dtypes: "
            f"got {_describe(x_next)}, x is {_describe(expected)}"
        )
    return out


@functools.partial(jax.jit, static_argnums=0)
def _run(program: _Program, params: PyTree, x: PyTree) -> Trajectory:
    config = program.config
    order = config.order
    times = jnp.asarray(program.times, _time_dtype())
    out_shape = _check_signatures(program, params, x, times[0])
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), out_shape)
    adaptive = config.adaptive
    tolerance = config.tolerance if config.tolerance is not None else 0.0

    def body(carry, step):
        x, state, off_plan = carry
        t, t_next, forced, plan_weights = step

        def attempt(state: CacheState) -> tuple[PyTree, jax.Array]:
            if adaptive:
                w, e = history_weights(state.times, state.valid, t, order, config.weighting, xp=jnp)
                pred = extrapolate(state, w)
                delta = weighted_sum(state.outputs, e)
                ok = accept_prediction(sum_of_squares(delta), sum_of_squares(pred), tolerance, xp=jnp)
            else:
                w = plan_weights
                if program.fallback:  # after a fallback the history is off the plan: weights from abcore in-graph
                    live, _ = history_weights(state.times, state.valid, t, order, config.weighting, xp=jnp)
                    w = jnp.where(off_plan, live, plan_weights)
                pred = extrapolate(state, w)
                ok = jnp.asarray(True)
            if program.fallback:  # a non-finite prediction computes instead, as in abcore.sample
                ok = ok & all_finite(pred)
            return pred, ok

        def skip(state: CacheState) -> tuple[PyTree, jax.Array]:
            return zeros, jnp.asarray(False)

        must = forced
        if adaptive:
            must = must | (jnp.sum(state.valid) < 2) | (state.consecutive >= config.predicted_limit)
        pred, use_prediction = lax.cond(must, skip, attempt, state)

        def run_model(operand: tuple[PyTree, CacheState]) -> tuple[PyTree, CacheState]:
            x, state = operand
            out = program.model_fn(params, x, t)
            out = jax.tree.map(lambda o, s: o.astype(s.dtype), out, out_shape)
            return out, push(state, out, t)

        def use(operand: tuple[PyTree, CacheState]) -> tuple[PyTree, CacheState]:
            return pred, mark_predicted(operand[1])

        out, state = lax.cond(use_prediction, use, run_model, (x, state))
        off_plan = off_plan | (~forced & ~use_prediction)
        x_next = program.step_fn(x, out, t, t_next)
        return (x_next, state, off_plan), (~use_prediction, out if program.keep_outputs else None)

    steps = (
        times[:-1],
        times[1:],
        jnp.asarray(program.forced),
        jnp.asarray(program.weights, _time_dtype()),
    )
    carry = (x, init_state(out_shape, order), jnp.asarray(False))
    (x, state, _), (computed, outputs) = lax.scan(body, carry, steps, unroll=program.unroll)
    return Trajectory(x, computed, state, outputs)


def sample(
    model_fn: ModelFn,
    params: PyTree,
    x: PyTree,
    times: Any,
    step_fn: StepFn,
    config_or_plan: ABConfig | CachePlan,
    *,
    unroll: int | bool = 1,
    fallback: bool = True,
    keep_outputs: bool = False,
) -> Trajectory:
    """Run a sampler with AB-Cache under `jax.jit`: x_{i+1} = step_fn(x_i, out_i, times[i], times[i+1]).

    out_i = model_fn(params, x_i, times[i]) at computed steps; at predicted steps it is
    the order-k Lagrange extrapolation sum_j w_j H_j through the last k computed outputs
    at their real times (Eq. 3.6, error O(h^k)), with weights from abcore: the rows of
    `abcore.make_plan` in fixed mode, `abcore.history_weights` on the buffer's times in
    adaptive mode (``config.tolerance`` set), where a step is predicted only if
    `abcore.accept_prediction` passes on the embedded error estimate p_k - p_{k-1}
    (sums over the whole, possibly sharded, batch). Decisions match `abcore.sample`.

    Args:
        model_fn: ``model_fn(params, x, t) -> output pytree`` (e.g. ``module.apply``);
            traced once per plan. An output that is a single array must be shaped like x.
        params: passed to model_fn unchanged (traced, so new weights do not recompile).
        x: the initial sample, an array or pytree; its sharding is kept.
        times: n + 1 concrete step times on the extrapolation abscissa (sigma for
            flow matching, lambda = log(alpha / sigma) for eps models); the model is
            never called at the last one.
        step_fn: ``step_fn(x, out, t, t_next) -> x_next`` with x's shapes and dtypes
            (`flow_euler_step`, `ddim_eps_step`).
        config_or_plan: an `abcore.ABConfig` (fixed or adaptive) or an `abcore.CachePlan`
            made on ``times[:-1]``.
        unroll: passed to `lax.scan`. With ``unroll=True`` XLA folds the plan's constant
            compute flags, so the program holds one model call per computed step.
        fallback: a non-finite prediction runs the model instead, as abcore.sample does
            (default). False drops that guard: then with ``unroll=True`` predicted steps
            contain no model call at all, which `cost_analysis` shows.
        keep_outputs: also return the (n, ...) stacked outputs used at every step.

    Returns:
        `Trajectory(x, computed, state, outputs)`.

    Raises:
        ValueError: at trace time for bad times (not 1-D, non-monotonic, traced), a plan
            that does not fit the grid, or model_fn / step_fn outputs that do not fit x.
    """
    t = _concrete_times(times)
    config, forced, weights = _resolve(config_or_plan, t)
    if not isinstance(fallback, bool) or not isinstance(keep_outputs, bool):
        raise ValueError(f"fallback and keep_outputs must be bools, got {fallback!r}, {keep_outputs!r}")
    program = _Program(model_fn, step_fn, config, t, forced, weights, unroll, fallback, keep_outputs)
    return _run(program, params, x)
