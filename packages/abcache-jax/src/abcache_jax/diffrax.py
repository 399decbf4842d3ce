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
    controllers raise). Dense output (``SaveAt(ts=...)``, ``sol.evaluate``) is the linear
    interpolation y(t) = y_n + (t - t_n) / (t_{n+1} - t_n) (y_{n+1} - y_n) between step endpoints:
    degree 1, interpolation error O(h^2) whatever k; for order k save at step times
    (``StepTo(ts=...)`` through them). To resume a solve after a jump, pass ``made_jump`` as an
    array (as `SaveAt(made_jump=True)` returns it): diffrax 0.7.2 applies a Python
    ``made_jump=True`` to every step, which makes every step an RK4 step.

        solver = AdamsBashforth(3)
        sol = diffrax.diffeqsolve(diffrax.ODETerm(lambda t, y, args: -y), solver,
                                  t0=0.0, t1=1.0, dt0=0.01, y0=1.0)

    **Arguments:** ``order``: the number of steps k, an int in 1..5 (stored as ``k``).
    """

    k: int = eqx.field(static=True)

    term_structure: ClassVar = diffrax.AbstractTerm
    interpolation_cls: ClassVar[Callable[..., diffrax.LocalLinearInterpolation]] = diffrax.LocalLinearInterpolation

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

        def adams_bashforth() -> PyTree:  # slope = sum_j (w_j / h) f_{n-j}
            c = abcore.theory.multistep_weights(ts, t0, t1, xp=jnp) / _step(t0, t1)
            return jax.tree.map(
                lambda b: jnp.tensordot(c.astype(b.dtype), b, axes=1, precision=jax.lax.Precision.HIGHEST), fs
            )

        def runge_kutta_4() -> PyTree:
            tm = t0 + 0.5 * (t1 - t0)
            half = terms.contr(t0, tm)
            k2 = terms.vf(tm, _add(y0, terms.prod(f0, half)), args)
            k3 = terms.vf(tm, _add(y0, terms.prod(k2, half)), args)
            k4 = terms.vf(t1, _add(y0, terms.prod(k3, control)), args)
            return jax.tree.map(lambda a, b, c, d: (a + 2 * b + 2 * c + d) / 6, f0, k2, k3, k4)

        slope = adams_bashforth() if self.k == 1 else jax.lax.cond(count >= self.k - 1, adams_bashforth, runge_kutta_4)
        y1 = _add(y0, terms.prod(slope, control))
        state = (ts, fs, jnp.minimum(count + 1, self.k).astype(jnp.int32))
        return y1, None, dict(y0=y0, y1=y1), state, diffrax.RESULTS.successful

    def func(self, terms: PyTree, t0: Any, y0: PyTree, args: PyTree) -> PyTree:
        return terms.vf(t0, y0, args)


def _step(t0: Any, t1: Any) -> jax.Array:
    """t1 - t0, or 1 for an empty step (never divide by zero)."""
    h = jnp.asarray(t1 - t0)
    return jnp.where(h == 0, jnp.ones_like(h), h)


def _add(a: PyTree, b: PyTree) -> PyTree:
    return jax.tree.map(lambda x, y: x + y, a, b)
