"""`multistep_table`: abcore's exact variable-step Adams-Bashforth weights of a schedule, on `jax.numpy`."""

from __future__ import annotations

from typing import Any

import abcore
import jax
import jax.numpy as jnp


def multistep_table(grid: Any, order: int) -> jax.Array:
    """The (n, order) variable-step Adams-Bashforth weights of the grid t_0..t_n (paper, Appendix A).

    W[i, j] = integral_{t_i}^{t_{i+1}} l_j(t) dt, l_j the Lagrange basis through t_i, ..., t_{i-m+1}
    (m = min(order, i + 1); W[i, j] = 0 for j >= m), so that x_{i+1} = x_i + sum_j W[i, j] f(t_{i-j}),
    local error O(h^(m+1)) (the start-up rows make it globally second order; see abcore). This executes `abcore.multistep_table(grid, order,
    xp=jnp)` in the grid's floating dtype: jit-able with `order` static, differentiable with respect
    to the grid. The grid must be strictly monotonic (not checked: it may be traced).
    """
    g = jnp.asarray(grid)
    if g.ndim != 1 or g.shape[0] < 2:
        raise ValueError(f"grid must be 1-D with at least 2 entries (n steps need n + 1), got shape {g.shape}")
    if not jnp.issubdtype(g.dtype, jnp.floating):
        raise ValueError(f"grid must have a floating dtype, got {g.dtype}")
    return abcore.multistep_table(g, order, xp=jnp)
