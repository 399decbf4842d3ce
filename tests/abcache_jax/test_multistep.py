"""`abcache_jax.multistep_table` executes abcore's table on jax.numpy: parity, dtype, jit, grad, errors."""

import abcache_jax as aj
import abcore
import jax
import jax.numpy as jnp
import numpy as np
import pytest

GRIDS = {
    "increasing": np.cumsum(np.random.default_rng(0).uniform(0.5, 1.5, 12)),
    "sigmas": np.linspace(1.0, 0.0, 11) ** 2,  # decreasing, steps shrinking towards 0
}


@pytest.mark.parametrize("name", list(GRIDS))
@pytest.mark.parametrize("order", [1, 2, 3, 4, 5])
def test_matches_abcore_numpy_in_float64(x64, name, order):
    grid = GRIDS[name]
    table = aj.multistep_table(jnp.asarray(grid), order)
    assert table.dtype == jnp.float64 and table.shape == (grid.size - 1, order)
    np.testing.assert_allclose(np.asarray(table), abcore.multistep_table(grid, order), rtol=1e-12, atol=1e-12)


def test_float32_stays_float32_and_close():
    grid = GRIDS["sigmas"]
    table = aj.multistep_table(jnp.asarray(grid, jnp.float32), 3)
    assert table.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(table), abcore.multistep_table(grid, 3), rtol=1e-4, atol=1e-5)


def test_jit_with_static_order_matches_eager(x64):
    grid = jnp.asarray(GRIDS["increasing"])
    jitted = jax.jit(aj.multistep_table, static_argnums=1)
    np.testing.assert_allclose(np.asarray(jitted(grid, 4)), np.asarray(aj.multistep_table(grid, 4)), rtol=1e-14)


def test_grad_wrt_grid_matches_finite_differences(x64):
    grid = GRIDS["increasing"][:7]
    probe = np.random.default_rng(1).normal(size=(6, 3))

    @jax.jit
    def loss(g):
        return jnp.sum(aj.multistep_table(g, 3) * probe)

    grad = np.asarray(jax.jit(jax.grad(loss))(jnp.asarray(grid)))
    eps = 1e-6
    fd = [(loss(grid + eps * e) - loss(grid - eps * e)) / (2 * eps) for e in np.eye(grid.size)]
    assert np.all(np.isfinite(grad))
    np.testing.assert_allclose(grad, np.asarray(fd), rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("grid", [np.zeros((3, 2)), np.array([1.0]), np.arange(4)])
def test_bad_grid_names_grid(grid):
    with pytest.raises(ValueError, match="grid"):
        aj.multistep_table(grid, 2)


@pytest.mark.parametrize("order", [0, -1, 2.0, True, None])
def test_bad_order_names_order(order):
    with pytest.raises(ValueError, match="order"):
        aj.multistep_table(np.linspace(0.0, 1.0, 5), order)
