"""Step functions for `sample`: the solver update x_{i+1} = step_fn(x_i, out_i, t_i, t_{i+1}).

Each works on the grid its rule extrapolates on, so that predicted outputs are extrapolated on
the real times (abcore's convention), and each is linear in the output, x' = a x + b out, with
the coefficients of an `abcore.LinearSteps` (pass it as ``steps=`` to enable the correction):
- `flow_euler_step`: grid = sigma, output = velocity; ``LinearSteps.euler(grid)``;
- `ddim_eps_step`: grid = lambda = log(alpha / sigma) on a VP schedule, output = eps;
  ``LinearSteps.ddim(*vp_alpha_sigma(grid))``.
Arithmetic runs in at least float32 and the result keeps x's dtype (bf16 stays bf16).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from abcache_jax._history import PyTree, accumulation_dtype


def _leafwise(fn: Any, x: PyTree, out: PyTree) -> PyTree:
    def apply(xi: jax.Array, oi: jax.Array) -> jax.Array:
        acc = jnp.promote_types(accumulation_dtype(xi.dtype), accumulation_dtype(oi.dtype))
        return fn(xi.astype(acc), oi.astype(acc), acc).astype(xi.dtype)

    return jax.tree.map(apply, x, out)


def flow_euler_step(x: PyTree, velocity: PyTree, sigma: Any, sigma_next: Any) -> PyTree:
    """Euler step of the flow-matching ODE dx/dsigma = v: x + (sigma_next - sigma) v (order 1).

    For x_sigma = (1 - sigma) x0 + sigma noise and v = noise - x0 (FLUX, SD3, Wan);
    times run from sigma = 1 down to 0.
    """
    return _leafwise(
        lambda xi, vi, acc: xi + (jnp.asarray(sigma_next, acc) - jnp.asarray(sigma, acc)) * vi, x, velocity
    )


def vp_alpha_sigma(lam: Any) -> tuple[jax.Array, jax.Array]:
    """alpha, sigma of a variance-preserving schedule at lambda = log(alpha / sigma).

    alpha^2 = sigmoid(2 lambda), sigma^2 = sigmoid(-2 lambda), so alpha^2 + sigma^2 = 1.
    """
    lam = jnp.asarray(lam)
    return jnp.sqrt(jax.nn.sigmoid(2.0 * lam)), jnp.sqrt(jax.nn.sigmoid(-2.0 * lam))


def ddim_eps_step(x: PyTree, eps: PyTree, lam: Any, lam_next: Any) -> PyTree:
    """Deterministic DDIM step (eta = 0) for an eps-prediction model, on the lambda abscissa.

    x_next = alpha' x0 + sigma' eps with x0 = (x - sigma eps) / alpha, written as the
    first-order DPM-Solver update x_next = (alpha'/alpha) x - sigma' (e^h - 1) eps,
    h = lambda' - lambda (order 1). Use grid = abcore.lambda_from_alphas_cumprod(...).
    """

    def update(xi: jax.Array, ei: jax.Array, acc: Any) -> jax.Array:
        lo, hi = jnp.asarray(lam, acc), jnp.asarray(lam_next, acc)
        alpha, _ = vp_alpha_sigma(lo)
        alpha_next, sigma_next = vp_alpha_sigma(hi)
        return (alpha_next / alpha) * xi - sigma_next * jnp.expm1(hi - lo) * ei

    return _leafwise(update, x, eps)


def linear_step(x: PyTree, out: PyTree, a: Any, b: Any) -> PyTree:
    """x' = a x + b out leaf by leaf: the step of an `abcore.LinearSteps` (``step_fn=None``)."""
    return _leafwise(lambda xi, oi, acc: jnp.asarray(a, acc) * xi + jnp.asarray(b, acc) * oi, x, out)
