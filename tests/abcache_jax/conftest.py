"""abcache-jax test setup.

Eight host CPU devices for the sharding tests: XLA reads XLA_FLAGS when jax initialises
its backend, so this runs before any jax import in this folder (test_sharding.py falls
back to a fresh interpreter if jax was initialised earlier by another folder's tests).
"""

import os

_FLAG = "--xla_force_host_platform_device_count=8"
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_FLAG}".strip()

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402


class Denoiser(nn.Module):
    """A tiny Flax MLP denoiser: out = Dense(tanh(Dense([x, sin(t), cos(t)]))), per sample."""

    features: int
    hidden: int = 16

    @nn.compact
    def __call__(self, x: jax.Array, t: jax.Array) -> jax.Array:
        t = jnp.broadcast_to(jnp.asarray(t, x.dtype), x.shape[:-1] + (1,))
        h = jnp.concatenate([x, jnp.sin(t), jnp.cos(t)], axis=-1)
        h = jnp.tanh(nn.Dense(self.hidden, dtype=x.dtype, param_dtype=x.dtype)(h))
        return nn.Dense(self.features, dtype=x.dtype, param_dtype=x.dtype)(h)


def make_denoiser(features: int = 4, dtype=jnp.float32, seed: int = 0):
    """(model_fn, params): model_fn(params, x, t) -> output shaped like x."""
    module = Denoiser(features)
    x = jnp.zeros((1, features), dtype)
    params = module.init(jax.random.PRNGKey(seed), x, jnp.asarray(0.0, dtype))
    return module.apply, params


@pytest.fixture
def x64():
    """float64 for the duration of one test (the flag is global: restored afterwards)."""
    with jax.enable_x64(True):
        yield


@pytest.fixture
def rng():
    return np.random.default_rng(0)


@pytest.fixture
def denoiser():
    """make_denoiser(features, dtype, seed) -> (model_fn, params) of the tiny Flax `Denoiser`."""
    return make_denoiser
