"""A variable-step Adams-Bashforth solver for diffrax (extra ``diffrax``: ``pip install "abcache-jax[diffrax]"``).

The weights are abcore's (`abcore.theory.multistep_weights` on `jax.numpy`); this module only keeps the
history and plumbs diffrax's solver interface.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import abcore
import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp

PyTree = Any
_State = tuple[jax.Array, PyTree, jax.Array]  # last k step-start times, their f values, steps since reset

MAX_ORDER = 5  # the RK4 start-up (local error O(h^5)) keeps the global order k up to k = 5


# b_i(theta) = sum_p _RK4_DENSE[i, p] theta^(p+1): classical RK4's continuous extension of order 3
_RK4_DENSE = ((1.0, -1.5, 2.0 / 3.0), (0.0, 1.0, -2.0 / 3.0), (0.0, 1.0, -2.0 / 3.0), (0.0, -0.5, 2.0 / 3.0))


class _MultistepInterpolation(diffrax.AbstractLocalInterpolation):
    """Dense output of one `AdamsBashforth` step over [t0, t1]: y(t) = y0 + sum_m c_m(t) increments_m.

    increments_m is the m-th vector field times the whole step's control (newest history entry first,
    or RK4's k_1..k_4), zero-padded. Adams-Bashforth: c_m(t) = W_m(t) / h with
    W_m(t) = integral_{t0}^{t} l_m (`abcore.theory.multistep_weights` through ``ts``);
    RK4 start-up (``startup``): c_m = b_m(theta), theta = (t - t0) / h.
    """

    t0: Any  # type: ignore[misc]  # diffrax declares them as AbstractVars
    t1: Any  # type: ignore[misc]
    y0: PyTree
    ts: jax.Array
    increments: PyTree
    startup: jax.Array

    def evaluate(self, t0: Any, t1: Any = None, left: bool = True) -> PyTree:
        del left
        if t1 is not None:
            return jax.tree.map(lambda a, b: a - b, self.evaluate(t1), self.evaluate(t0))
        h = _step(self.t0, self.t1)
        size = jax.tree.leaves(self.increments)[0].shape[0]
        c = abcore.theory.multistep_weights(self.ts, self.t0, t0, xp=jnp) / h
        c = jnp.pad(c, (0, size - c.shape[0]))
        if size > 1:
            theta = (t0 - self.t0) / h
            powers = jnp.stack([theta, theta**2, theta**3])
            b = jnp.asarray(_RK4_DENSE, powers.dtype) @ powers
            c = jnp.where(self.startup, jnp.pad(b, (0, size - 4)), c)
        return jax.tree.map(
            lambda y, inc: y + jnp.tensordot(c.astype(inc.dtype), inc, axes=1, precision=jax.lax.Precision.HIGHEST),
            self.y0,
            self.increments,
        )


class AdamsBashforth(diffrax.AbstractSolver):
    """Variable-step Adams-Bashforth-k for ODE terms (AB-Cache paper, Appendix A).

    Step n over [t_n, t_{n+1}] with the last k step starts t_n, t_{n-1}, ..., t_{n-k+1}:

        y_{n+1} = y_n + sum_{j<k} w_j f(t_{n-j}, y_{n-j}),   w_j = integral_{t_n}^{t_{n+1}} l_j(t) dt,

    l_j the Lagrange basis through those times, so the weights fit arbitrary non-uniform steps
    (`abcore.theory.multistep_weights`; on equal steps w = h * `abcore.theory.adams_bashforth_weights(k)`).
    Local error O(h^(k+1)), global order k, one vector-field evaluation per step. Start-up: the first
    k - 1 steps after the start or a jump (``made_jump``) are classical RK4 steps (local error O(h^5),
    three extra evaluations each), so the global order is k for k = 1..5. AB-1 is `diffrax.Euler`.

    The terms are any whose control is the time step (``contr(t0, t1) = t1 - t0``): a
    `diffrax.ODETerm`, or the adjoint term `diffrax.BacksolveAdjoint` solves backwards with this
    solver (so ``term_structure`` is `diffrax.AbstractTerm`, like diffrax's own ODE solvers).
    No error estimate, so use it with `diffrax.ConstantStepSize` or `diffrax.StepTo` (adaptive
    controllers raise). Dense output (``SaveAt(ts=...)``, ``sol.evaluate``) has the solver's order:
    inside an Adams-Bashforth step it is the step's own polynomial, y(t) = y_n + sum_j W_j(t) f_{n-j}
    with W_j(t) = integral_{t_n}^{t} l_j (degree k in t, equal to y_{n+1} at t_{n+1}, error O(h^k));
    inside an RK4 start-up step, RK4's continuous extension y_n + h sum_i b_i(theta) k_i,
    b_1 = theta - 3 theta^2 / 2 + 2 theta^3 / 3, b_2 = b_3 = theta^2 - 2 theta^3 / 3,
    b_4 = -theta^2 / 2 + 2 theta^3 / 3 (order 3). To resume a solve after a jump, pass ``made_jump`` as an
    array (as `SaveAt(made_jump=True)` returns it): diffrax 0.7.2 applies a Python
    ``made_jump=True`` to every step, which makes every step an RK4 step.

        solver = AdamsBashforth(3)
        sol = diffrax.diffeqsolve(diffrax.ODETerm(lambda t, y, args: -y), solver,
                                  t0=0.0, t1=1.0, dt0=0.01, y0=1.0)

    **Arguments:** ``order``: the number of steps k, an int in 1..5 (stored as ``k``).
    """

    k: int = eqx.field(static=True)

    term_structure: ClassVar = diffrax.AbstractTerm
    interpolation_cls: ClassVar[Callable[..., diffrax.AbstractLocalInterpolation]] = _MultistepInterpolation

    def __init__(self, order: int) -> None:
        if isinstance(order, bool) or not isinstance(order, int) or not 1 <= order <= MAX_ORDER:
            raise ValueError(f"order must be an int in 1..{MAX_ORDER}, got {order!r}")
        self.k = order

    def order(self, terms: PyTree) -> int:
        return self.k

    def _fresh_times(self, t0: Any, t1: Any) -> jax.Array:
        """t0, t0 - h, ..., t0 - (k-1) h: distinct stand-ins for the not-yet-computed history."""
        t0 = jnp.asarray(t0)
        return t0 - _step(t0, t1) * jnp.arange(self.k, dtype=t0.dtype)

    def init(self, terms: PyTree, t0: Any, t1: Any, y0: PyTree, args: PyTree) -> _State:
        f_like = eqx.filter_eval_shape(terms.vf, t0, y0, args)
        fs = jax.tree.map(lambda f: jnp.zeros((self.k, *f.shape), f.dtype), f_like)
        return self._fresh_times(t0, t1), fs, jnp.asarray(0, jnp.int32)

    def step(
        self, terms: PyTree, t0: Any, t1: Any, y0: PyTree, args: PyTree, solver_state: _State, made_jump: Any
    ) -> tuple[PyTree, None, dict[str, PyTree], _State, Any]:
        ts, fs, count = solver_state
        count = jnp.where(made_jump, 0, count)
        f0 = terms.vf(t0, y0, args)
        ts = jnp.where(
            count == 0, self._fresh_times(t0, t1), jnp.concatenate([jnp.asarray(t0, ts.dtype)[None], ts[:-1]])
        )
        fs = jax.tree.map(lambda f, b: jnp.concatenate([f[None], b[:-1]]), f0, fs)
        control = terms.contr(t0, t1)

        size = 1 if self.k == 1 else max(self.k, 4)  # the vector fields the dense output combines

        def stacked(fields: list[PyTree]) -> PyTree:
            fields = fields + [jax.tree.map(jnp.zeros_like, f0)] * (size - len(fields))
            return jax.tree.map(lambda *leaves: jnp.stack(leaves), *fields)

        def adams_bashforth() -> tuple[PyTree, PyTree, jax.Array]:  # slope = sum_j (w_j / h) f_{n-j}
            c = abcore.theory.multistep_weights(ts, t0, t1, xp=jnp) / _step(t0, t1)
            slope = jax.tree.map(
                lambda b: jnp.tensordot(c.astype(b.dtype), b, axes=1, precision=jax.lax.Precision.HIGHEST), fs
            )
            return slope, stacked([jax.tree.map(lambda b, j=j: b[j], fs) for j in range(self.k)]), jnp.asarray(False)

        def runge_kutta_4() -> tuple[PyTree, PyTree, jax.Array]:
            tm = t0 + 0.5 * (t1 - t0)
            half = terms.contr(t0, tm)
            k2 = terms.vf(tm, _add(y0, terms.prod(f0, half)), args)
            k3 = terms.vf(tm, _add(y0, terms.prod(k2, half)), args)
            k4 = terms.vf(t1, _add(y0, terms.prod(k3, control)), args)
            slope = jax.tree.map(lambda a, b, c, d: (a + 2 * b + 2 * c + d) / 6, f0, k2, k3, k4)
            return slope, stacked([f0, k2, k3, k4]), jnp.asarray(True)

        if self.k == 1:
            slope, fields, startup = adams_bashforth()
        else:
            slope, fields, startup = jax.lax.cond(count >= self.k - 1, adams_bashforth, runge_kutta_4)
        y1 = _add(y0, terms.prod(slope, control))
        increments = jax.vmap(lambda f: terms.prod(f, control))(fields)  # each field over the whole step
        dense_info = dict(y0=y0, ts=ts, increments=increments, startup=startup)
        state = (ts, fs, jnp.minimum(count + 1, self.k).astype(jnp.int32))
        return y1, None, dense_info, state, diffrax.RESULTS.successful

    def func(self, terms: PyTree, t0: Any, y0: PyTree, args: PyTree) -> PyTree:
        return terms.vf(t0, y0, args)


def _step(t0: Any, t1: Any) -> jax.Array:
    """t1 - t0, or 1 for an empty step (never divide by zero)."""
    h = jnp.asarray(t1 - t0)
    return jnp.where(h == 0, jnp.ones_like(h), h)


def _add(a: PyTree, b: PyTree) -> PyTree:
    return jax.tree.map(lambda x, y: x + y, a, b)
