"""`sample`: a jit-compiled AB-Cache sampling loop that executes abcore's step rule in a `lax.scan`.

One scan step i, with t = grid[i], the run's `abcore.Schedule` s and the rule state r:

    d = abcore.decide(s, r, i, t)                     compute flag, weights w, e, c
    predicted:  out_i = sum_j w_j H_j                 Eq. 3.5, if `abcore.joint` accepts and finite
    computed:   f = model_fn(params, x_i, t)
                out_i = f + sum_l c_l [f, H_0, ..]_l  c = d.correction (the correction, with steps)
    r = abcore.complete(s, r, i, computed, t)
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

import abcore
import jax
import jax.numpy as jnp
import numpy as np
from abcore import ABConfig, CachePlan, LinearSteps, as_grid, make_plan
from jax import lax
from jax._src import core as _jax_core

from abcache_jax._history import (
    History,
    PyTree,
    all_finite,
    init_history,
    push,
    same_layout,
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
    grid: Any  # (n + 1,) numpy, or a traced array (then the spec is never a cache key)
    steps: LinearSteps | None
    unroll: int | bool
    check_finite: bool
    keep_outputs: bool

    @property
    def key(self) -> tuple:
        grid = self.grid.tobytes()
        return (self.step_fn, self.config, grid, self.steps, self.unroll, self.check_finite, self.keep_outputs)


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
    if not same_layout(x_next, expected):
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
    n = grid.shape[0] - 1
    sched = abcore.schedule(config, None, spec.steps, num_steps=n)  # the times come from the (maybe traced) grid

    def step_fn(x: PyTree, out: PyTree, t: jax.Array, t_next: jax.Array, a: Any = 1.0, b: Any = 1.0) -> PyTree:
        return linear_step(x, out, a, b) if spec.step_fn is None else spec.step_fn(x, out, t, t_next)

    out_shape = _check_signatures(model_fn, step_fn, params, x, grid[0])
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), out_shape)
    tolerance = 0.0 if config.tolerance is None else config.tolerance

    def body(carry: tuple[PyTree, History], step: tuple) -> tuple[tuple[PyTree, History], tuple]:
        x, history = carry
        i, t, t_next = step
        decision = abcore.decide(sched, history.rule, i, t, xp=jnp)

        def attempt(outputs: PyTree) -> tuple[PyTree, jax.Array]:
            pred = _cast(weighted_sum(outputs, decision.weights), out_shape)
            ok = jnp.asarray(True)
            if config.adaptive:
                delta = weighted_sum(outputs, decision.error_weights)
                ok = abcore.joint(sum_of_squares(delta), sum_of_squares(pred), tolerance, xp=jnp)
            if spec.check_finite:  # a non-finite prediction computes instead, as in abcore.sample
                ok = ok & all_finite(pred)
            return pred, ok

        def skip(outputs: PyTree) -> tuple[PyTree, jax.Array]:
            return zeros, jnp.asarray(False)

        pred, ok = lax.cond(any_over_batch(decision.compute), skip, attempt, history.outputs)

        def run_model(outputs: PyTree) -> tuple[PyTree, PyTree]:
            f = _cast(model_fn(params, x, t), out_shape)
            out = _corrected(f, outputs, decision.correction) if sched.correct else f
            return out, push(outputs, f)

        def use_prediction(outputs: PyTree) -> tuple[PyTree, PyTree]:
            return pred, outputs

        compute = any_over_batch(~ok)
        out, outputs = lax.cond(compute, run_model, use_prediction, history.outputs)
        history = History(outputs, abcore.complete(sched, history.rule, i, compute, t, xp=jnp))
        x_next = step_fn(x, out, t, t_next, *sched.coefficients(i, jnp))
        return (x_next, history), (compute, out if spec.keep_outputs else None)

    xs = (jnp.asarray(np.arange(n)), grid[:-1], grid[1:])  # a literal (not an iota): unrolled, XLA folds the flags
    carry = (x, init_history(out_shape, sched))
    (x, _), (computed, outputs) = lax.scan(body, carry, xs, unroll=spec.unroll)
    return Trajectory(x, computed, outputs)


def _grid(grid: Any, config_or_plan: ABConfig | CachePlan) -> Any:
    """The n + 1 grid values: a validated float64 numpy array, or a traced array checked for shape only.

    The scan reads the grid as data (each step's node, and the times model_fn and step_fn get), so a
    traced grid works in every mode; its values cannot be checked at trace time (they must be finite
    and strictly monotonic), nor can a `CachePlan` be checked against them.
    """
    if not isinstance(grid, jax.core.Tracer):
        return as_grid(grid, "grid")
    if isinstance(config_or_plan, CachePlan):
        raise ValueError(
            "config_or_plan: a CachePlan is checked against the grid's values, but grid is a traced array; "
            "pass plan.config, or a concrete grid (close over it)"
        )
    real = jnp.issubdtype(grid.dtype, jnp.floating) or jnp.issubdtype(grid.dtype, jnp.integer)
    if grid.ndim != 1 or grid.shape[0] < 2 or not real:
        raise ValueError(f"grid must be a 1-D real array of n + 1 >= 2 values, got a traced {grid.dtype}{grid.shape}")
    return grid


def _under_a_trace(*trees: PyTree) -> bool:
    """True when sample runs under an outer jit / vmap / grad trace, or is handed a tracer.

    A cached program that is called again under another outer trace would reuse the trace of its
    first call, with the tracers its model_fn closed over then (an UnexpectedTracerError), so the
    program cache is used only at the top level.
    """
    if any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree.leaves(trees)):
        return True
    trace_state_clean = getattr(_jax_core, "trace_state_clean", None)  # jax has no public name for it
    return trace_state_clean is None or not trace_state_clean()


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
    estimate fails `abcore.joint` (sums over the whole, possibly sharded, batch),
    computes instead. With `steps` the predicted steps are corrected (``config.correct``): the
    output of computed step n is f_n + sum_l c_l [f_n, H]_l, c = `abcore.theory.correction_weights`.

    Args:
        model_fn: ``model_fn(params, x, t) -> output pytree`` (e.g. ``module.apply``); traced once
            per schedule. A single-array output must be shaped like x. The compiled programs are
            cached per function (per module for a bound method) and freed with it. Under an outer
            ``jit`` / ``vmap`` / ``grad`` trace the loop is traced inline instead (model_fn may close
            over that trace's values; the outer program is the one compiled and cached).
        params: passed to model_fn unchanged (traced, so new weights do not recompile).
        x: the initial sample, an array or pytree; its sharding is kept.
        grid: the n + 1 sampler times on the rule's abscissa (sigma for flow matching,
            lambda = log(alpha / sigma) for eps models); the model is never called at the last.
            Under an outer trace it may be a traced array (then only its shape is checked, and
            ``config_or_plan`` must be an `abcore.ABConfig`).
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
        ValueError: naming the parameter, for a bad grid (not real, not 1-D, non-monotonic), a
            traced grid with a `CachePlan`, steps of the wrong length, correct=True without steps,
            a schedule that does not fit the grid, or model_fn / step_fn outputs that do not fit x.
    """
    g = _grid(grid, config_or_plan)
    n = g.shape[0] - 1
    config = _resolve(config_or_plan, g, steps)
    abcore.schedule(config, None, steps, num_steps=n)  # checks the steps, the schedule's fit and correct=True
    if step_fn is None and steps is None:
        raise ValueError("step_fn is required unless steps=abcore.LinearSteps(...) gives the step")
    if not isinstance(check_finite, bool) or not isinstance(keep_outputs, bool):
        raise ValueError(f"check_finite and keep_outputs must be bools, got {check_finite!r}, {keep_outputs!r}")
    spec = _Spec(step_fn, config, g, steps, unroll, check_finite, keep_outputs)
    if _under_a_trace(params, x, g):  # traced inline: the outer trace owns the program
        return _run(functools.partial(lambda f: f, model_fn), None, spec, params, x)
    return _program(model_fn, spec)(params, x)
