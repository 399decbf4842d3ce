"""Empirical order: the cached sampler's deviation from the uncached one shrinks as O(h^k).

On x' = -x + p sin(3t + x), Euler steps of size h = 1/n; every other step predicts the
field by order-k extrapolation (local error O(h^k) per predicted step, each weighted
by h, over O(1/h) steps: O(h^k) globally). The fitted slope of log(deviation) against
log(h) must be k within 0.35.
"""

import abcache_jax as aj
import abcore
import jax
import jax.numpy as jnp
import numpy as np
import pytest

STEPS = (16, 32, 64, 128)


def _field(params, x, t):
    return -x + params * jnp.sin(3.0 * t + x)


def _final(n, config):
    grid = np.linspace(0.0, 1.0, n + 1)
    return aj.sample(_field, 1.0, jnp.linspace(-1.0, 1.0, 4), grid, aj.flow_euler_step, config).x


@pytest.fixture(scope="module")
def uncached():
    with jax.enable_x64(True):
        return {n: _final(n, abcore.ABConfig(order=1, interval=1, warmup=1, cooldown=0)) for n in STEPS}


@pytest.mark.parametrize("k", [1, 2, 3])
def test_deviation_from_uncached_is_order_k(x64, uncached, k):
    config = abcore.ABConfig(order=k, interval=2, warmup=k, cooldown=0)
    deviation = [float(jnp.max(jnp.abs(_final(n, config) - uncached[n]))) for n in STEPS]
    assert all(d > 0 for d in deviation)
    slope = np.polyfit(np.log(1.0 / np.array(STEPS)), np.log(deviation), 1)[0]
    assert abs(slope - k) < 0.35, (slope, deviation)
