"""`sample`: a jit-compiled AB-Cache sampling loop that executes abcore's step rule in a `lax.scan`.

One scan step i, with t = grid[i], node = abcore.node_of(config, i, t) and the rule state r:

    d = abcore.decide(config, r, node, forced_i)      forced = config.forced_mask(n), static
    predicted:  out_i = sum_j w_j H_j                 w = d.weights (Eq. 3.5), if accepted and finite
    computed:   f = model_fn(params, x_i, t)
                out_i = f + sum_l c_l [f, H_0, ..]_l  c = abcore.correction_weights (when correcting)
    x_{i+1} = step_fn(x_i, out_i, t, grid[i + 1])

where H is the `History` of raw computed outputs, newest first. Every decision and weight comes from
abcore's rule run on `jax.numpy`; nothing is re-derived here. The choice between the branches is a
`lax.cond` on an `any_over_batch` predicate, so a predicted step never evaluates the model, also
under `jax.vmap`.
"""

from __future__ import annotations

import functools
import inspect
import types
import warnings
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from abcore import (
    ABConfig,
    CachePlan,
    LinearSteps,
    accept_prediction,
    after_predicted,
    as_grid,
    check_steps,
    correction_weights,
    decide,
    make_plan,
    node_of,
)
from jax import lax

from abcache_jax._history import (
    History,
    PyTree,
    all_finite,
    init_history,
    push,
    sum_of_squares,
    time_dtype,
    weighted_sum,
)
from abcache_jax._steps import linear_step

ModelFn = Callable[[PyTree, PyTree, jax.Array], PyTree]
StepFn = Callable[[PyTree, PyTree, jax.Array, jax.Array], PyTree]


class Trajectory(NamedTuple):
    """Result of `sample`, like `abcore.Trajectory`.

    x: the final sample. computed: (n,) bool, which steps ran the model. outputs: the (n, ...)
    stacked outputs the sampler used at every step when ``keep_outputs=True``, else None.
    """

    x: PyTree
    computed: jax.Array
    outputs: PyTree


@jax.custom_batching.custom_vmap
def any_over_batch(pred: jax.Array) -> jax.Array:
    """`pred` itself; under `jax.vmap`, any(pred) over the mapped axis, as an unbatched value.

    A `lax.cond` on a batched predicate becomes a select that runs both branches; on this one it
    stays a cond: a vmapped batch calls the model when any element needs to, as one batch does.
    """
    return pred


@any_over_batch.def_vmap
def _any_over_batch_rule(axis_size: int, in_batched: list[bool], pred: jax.Array) -> tuple[jax.Array, bool]:
    (batched,) = in_batched
    return (jnp.any(pred, axis=0) if batched else pred), False


@dataclass(frozen=True, eq=False)
class _Spec:
    """Everything static about one run except the model (which the program reaches weakly)."""

    step_fn: StepFn | None
    config: ABConfig
    grid: np.ndarray  # (n + 1,)
    a: np.ndarray  # (n,) step coefficients, ones without steps
    b: np.ndarray
    correct: bool
    unroll: int | bool
    check_finite: bool
    keep_outputs: bool

    @property
    def key(self) -> tuple:
        arrays = tuple(v.tobytes() for v in (self.grid, self.a, self.b))
        return (self.step_fn, self.config, *arrays, self.correct, self.unroll, self.check_finite, self.keep_outputs)


# Compiled programs per model owner: id(owner) -> (weak reference to owner, {key: jitted program}).
# The owner is model_fn itself, or its __self__ for a bound method (`module.apply` is a new object
# at each access); the programs reach it only through the weak reference, so a dropped closure
# frees its programs (and their executables and captured constants).
_PROGRAMS: dict[int, tuple[Callable[[], Any], dict[tuple, Callable[..., Trajectory]]]] = {}
_MAX_PROGRAMS_PER_OWNER = 32


def _evict(key: int, ref: Any) -> None:
    if _PROGRAMS.get(key, (None,))[0] is ref:
        del _PROGRAMS[key]


def _program(model_fn: ModelFn, spec: _Spec) -> Callable[..., Trajectory]:
    owner, func = (model_fn.__self__, model_fn.__func__) if inspect.ismethod(model_fn) else (model_fn, None)
    entry = _PROGRAMS.get(id(owner))
    if entry is None or entry[0]() is not owner:
        try:
            ref: Callable[[], Any] = weakref.ref(owner, functools.partial(_evict, id(owner)))
        except TypeError:  # not weakly referenceable: held for good
            ref = functools.partial(lambda o: o, owner)
        entry = _PROGRAMS[id(owner)] = (ref, {})
    programs = entry[1]
    key = (func, *spec.key)
    if key not in programs:
        if len(programs) >= _MAX_PROGRAMS_PER_OWNER:
            programs.pop(next(iter(programs)))
        programs[key] = jax.jit(functools.partial(_run, entry[0], func, spec))
    return programs[key]


def _describe(tree: PyTree) -> str:
    return str(jax.tree.map(lambda s: f"{s.dtype}{list(s.shape)}", tree))


def _check_signatures(model_fn: ModelFn, step_fn: StepFn, params: PyTree, x: PyTree, t: jax.Array) -> PyTree:
    """Trace-time checks of model_fn and step_fn against x; returns the model output's shapes."""
    out = jax.eval_shape(model_fn, params, x, t)
    if not all(jnp.issubdtype(s.dtype, jnp.inexact) for s in jax.tree.leaves(out)):
        raise ValueError(f"model_fn must return floating-point arrays to extrapolate, got {_describe(out)}")
    leaf = jax.tree_util.treedef_is_leaf
    if leaf(jax.tree.structure(x)) and leaf(jax.tree.structure(out)) and out.shape != np.shape(x):
        raise ValueError(
            f"model_fn(params, x, t) returned shape {out.shape} but x has shape {np.shape(x)}; "
            "a model whose output is not shaped like x must return a pytree (e.g. a tuple) that step_fn unpacks"
        )
    x_next = jax.eval_shape(step_fn, x, out, t, t)
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


def _cast(tree: PyTree, like: PyTree) -> PyTree:
    return jax.tree.map(lambda o, s: jnp.asarray(o).astype(s.dtype), tree, like)


def _corrected(f: PyTree, outputs: PyTree, c: jax.Array) -> PyTree:
    """f + c_0 f + sum_j c_{j+1} H_j, accumulated like `weighted_sum`, in f's dtypes."""
    rest = weighted_sum(outputs, c[1:])
    return jax.tree.map(
        lambda fi, ri: (fi.astype(ri.dtype) + (c[0].astype(ri.dtype) * fi.astype(ri.dtype) + ri)).astype(fi.dtype),
        f,
        rest,
    )


def _run(owner_ref: Callable[[], Any], func: Any, spec: _Spec, params: PyTree, x: PyTree) -> Trajectory:
    owner = owner_ref()
    if owner is None:
        raise RuntimeError("abcache_jax.sample: the model function was garbage-collected during tracing")
    model_fn = owner if func is None else types.MethodType(func, owner)
    config = spec.config
    dtype = time_dtype()
    grid = jnp.asarray(spec.grid, dtype)

    def step_fn(x: PyTree, out: PyTree, t: jax.Array, t_next: jax.Array, a: Any = 1.0, b: Any = 1.0) -> PyTree:
        return linear_step(x, out, a, b) if spec.step_fn is None else spec.step_fn(x, out, t, t_next)

    out_shape = _check_signatures(model_fn, step_fn, params, x, grid[0])
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), out_shape)
    tolerance = 0.0 if config.tolerance is None else config.tolerance

    def body(carry: tuple[PyTree, History], step: tuple) -> tuple[tuple[PyTree, History], tuple]:
        x, history = carry
        i, t, t_next, forced, a, b = step
        node = node_of(config, i, t)
        decision = decide(config, history.rule, node, forced, xp=jnp)

        def attempt(history: History) -> tuple[PyTree, jax.Array]:
            pred = _cast(weighted_sum(history.outputs, decision.weights), out_shape)
            ok = jnp.asarray(True)
            if config.adaptive:
                delta = weighted_sum(history.outputs, decision.error_weights)
                ok = accept_prediction(sum_of_squares(delta), sum_of_squares(pred), tolerance, xp=jnp)
            if spec.check_finite:  # a non-finite prediction computes instead, as in abcore.sample
                ok = ok & all_finite(pred)
            return pred, ok

        def skip(history: History) -> tuple[PyTree, jax.Array]:
            return zeros, jnp.asarray(False)

        pred, ok = lax.cond(any_over_batch(decision.compute), skip, attempt, history)

        def run_model(operand: tuple[PyTree, History]) -> tuple[PyTree, History]:
            x, history = operand
            f = _cast(model_fn(params, x, t), out_shape)
            out = f
            if spec.correct:
                out = _corrected(f, history.outputs, correction_weights(config, history.rule, node, a, b, xp=jnp))
            return out, push(history, f, node)

        def use_prediction(operand: tuple[PyTree, History]) -> tuple[PyTree, History]:
            history = operand[1]
            return pred, history._replace(rule=after_predicted(history.rule, node, a, b, xp=jnp))

        compute = any_over_batch(~ok)
        out, history = lax.cond(compute, run_model, use_prediction, (x, history))
        x_next = step_fn(x, out, t, t_next, a, b)
        return (x_next, history), (compute, out if spec.keep_outputs else None)

    n = grid.shape[0] - 1
    xs = (
        jnp.arange(n, dtype=dtype),
        grid[:-1],
        grid[1:],
        jnp.asarray(config.forced_mask(n)),
        jnp.asarray(spec.a, dtype),
        jnp.asarray(spec.b, dtype),
    )
    carry = (x, init_history(out_shape, config))
    (x, _), (computed, outputs) = lax.scan(body, carry, xs, unroll=spec.unroll)
    return Trajectory(x, computed, outputs)


def _concrete_grid(grid: Any) -> np.ndarray:
    if isinstance(grid, jax.core.Tracer):
        raise ValueError(
            "grid must be concrete (a numpy array, list or concrete jax array): the schedule is built "
            "from it at trace time; close over it instead of passing it as a traced argument"
        )
    return as_grid(grid, "grid")


def _resolve(config_or_plan: ABConfig | CachePlan, g: np.ndarray, steps: LinearSteps | None) -> ABConfig:
    """The config to run; a `CachePlan` must be the fold of its config on grid[:-1] (and `steps`)."""
    if isinstance(config_or_plan, ABConfig):
        return config_or_plan
    if not isinstance(config_or_plan, CachePlan):
        raise TypeError(
            f"config_or_plan must be an abcore.ABConfig or abcore.CachePlan, got {type(config_or_plan).__name__}"
        )
    plan = config_or_plan
    n = g.size - 1
    if plan.num_steps != n or not np.array_equal(np.asarray(plan.times, np.float64), g[:-1]):
        raise ValueError(f"config_or_plan: the plan's {plan.num_steps} call times must equal grid[:-1] ({n} steps)")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = make_plan(plan.config, g[:-1], steps)
    if not all(
        np.array_equal(getattr(plan, name), getattr(expected, name)) for name in ("compute", "weights", "corrections")
    ):
        raise ValueError(
            "config_or_plan: the plan is not its config's plan on this grid and steps "
            "(make it with abcore.make_plan(config, grid[:-1], steps))"
        )
    return plan.config


def sample(
    model_fn: ModelFn,
    params: PyTree,
    x: PyTree,
    grid: Any,
    step_fn: StepFn | None,
    config_or_plan: ABConfig | CachePlan,
    *,
    steps: LinearSteps | None = None,
    unroll: int | bool = 1,
    check_finite: bool = True,
    keep_outputs: bool = False,
) -> Trajectory:
    """Run a sampler with AB-Cache under `jax.jit`: x_{i+1} = step_fn(x_i, out_i, grid[i], grid[i+1]).

    Executes abcore's step rule exactly as `abcore.sample` does (same decisions, values to 1e-10
    in float64): out_i = model_fn(params, x_i, grid[i]) at computed steps, the extrapolation
    sum_j w_j H_j through the last k computed outputs (Eq. 3.5, error O(h^k)) at predicted ones;
    a non-finite prediction, or in adaptive mode (``config.tolerance``) one whose embedded error
    estimate fails `abcore.accept_prediction` (sums over the whole, possibly sharded, batch),
    computes instead. With `steps` the predicted steps are corrected (``config.correct``): the
    output of computed step n is f_n + sum_l c_l [f_n, H]_l, c = `abcore.correction_weights`.

    Args:
        model_fn: ``model_fn(params, x, t) -> output pytree`` (e.g. ``module.apply``); traced once
            per schedule. A single-array output must be shaped like x. The compiled programs are
            cached per function (per module for a bound method) and freed with it.
        params: passed to model_fn unchanged (traced, so new weights do not recompile).
        x: the initial sample, an array or pytree; its sharding is kept.
        grid: the n + 1 concrete sampler times on the rule's abscissa (sigma for flow matching,
            lambda = log(alpha / sigma) for eps models); the model is never called at the last.
        step_fn: ``step_fn(x, out, t, t_next) -> x_next`` with x's shapes and dtypes
            (`flow_euler_step`, `ddim_eps_step`), or None for ``steps``' own a x + b out.
        config_or_plan: an `abcore.ABConfig` (fixed or adaptive) or the `abcore.CachePlan` of
            one on ``grid[:-1]`` (run as its config).
        steps: the sampler's `abcore.LinearSteps` (n entries, x' = a x + b out), which enables
            the correction: ``LinearSteps.euler(grid)`` for `flow_euler_step`,
            ``LinearSteps.ddim(*vp_alpha_sigma(grid))`` for `ddim_eps_step`.
        unroll: passed to `lax.scan`. With ``unroll=True`` XLA folds the schedule's constant
            flags, so the program holds one model call per computed step.
        check_finite: a non-finite prediction runs the model instead, as abcore.sample does (default).
            False drops that guard: then with ``unroll=True`` predicted steps contain no model call.
        keep_outputs: also return the (n, ...) stacked outputs used at every step.

    Under `jax.vmap` a step computes for the whole batch when any element needs it.

    Returns:
        `Trajectory(x, computed, outputs)`.

    Raises:
        ValueError: naming the parameter, for a bad grid (not real, not 1-D, non-monotonic,
            traced), steps of the wrong length, correct=True without steps, a schedule that does
            not fit the grid, or model_fn / step_fn outputs that do not fit x.
    """
    g = _concrete_grid(grid)
    n = g.size - 1
    check_steps(steps, n)
    config = _resolve(config_or_plan, g, steps)
    correct = config.corrects(steps is not None)
    config.check_num_steps(n)
    if step_fn is None and steps is None:
        raise ValueError("step_fn is required unless steps=abcore.LinearSteps(...) gives the step")
    if not isinstance(check_finite, bool) or not isinstance(keep_outputs, bool):
        raise ValueError(f"check_finite and keep_outputs must be bools, got {check_finite!r}, {keep_outputs!r}")
    a, b = (steps.a, steps.b) if steps is not None else (np.ones(n), np.ones(n))
    spec = _Spec(step_fn, config, g, a, b, correct, unroll, check_finite, keep_outputs)
    return _program(model_fn, spec)(params, x)
