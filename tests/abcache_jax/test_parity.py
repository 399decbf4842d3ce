"""Parity with abcore.sample (the reference executor) over abcore.testing.config_sweep(), in float64.

Every config of the sweep, with the correction's LinearSteps given, on the parity model and a
shifted grid: computed flags equal, outputs and final x to 1e-10. Plus DDIM on lambda, and the
correction's exactness: outputs polynomial of degree <= order in time are recovered exactly.
"""

import abcache_jax as aj
import abcore
import abcore.testing
import jax.numpy as jnp
import numpy as np
import pytest

pytestmark = pytest.mark.usefixtures("x64")

GRID = abcore.testing.make_grid("shifted", 12)
X0 = np.linspace(-1.5, 1.5, 12).reshape(3, 4)
CONFIGS = abcore.testing.config_sweep()


def _numpy_model(x, t):
    return abcore.testing.parity_model(x, t)


def _jax_model(params, x, t):
    return abcore.testing.parity_model(x, t, jnp)


def _assert_same(got, ref, tol=1e-10):
    np.testing.assert_array_equal(np.asarray(got.computed), ref.computed)
    np.testing.assert_allclose(np.asarray(got.outputs), np.stack(ref.outputs), rtol=0, atol=tol)
    np.testing.assert_allclose(np.asarray(got.x), ref.x, rtol=0, atol=tol)


@pytest.mark.parametrize("config", CONFIGS, ids=[f"c{i}" for i in range(len(CONFIGS))])
def test_config_sweep_matches_reference(config):
    steps = abcore.LinearSteps.euler(GRID)
    ref = abcore.sample(_numpy_model, X0, GRID, None, config, steps=steps)
    got = aj.sample(_jax_model, None, jnp.asarray(X0), GRID, aj.flow_euler_step, config, steps=steps, keep_outputs=True)
    assert got.x.dtype == jnp.float64
    _assert_same(got, ref)


def _ddim():
    abar = np.cumprod(1.0 - np.linspace(1e-4, 0.02, 1000))
    lam = abcore.lambda_from_alphas_cumprod(abar[np.linspace(999, 0, 13).astype(int)])
    alphas, sigmas = (np.asarray(v) for v in aj.vp_alpha_sigma(lam))
    return lam, abcore.LinearSteps.ddim(alphas, sigmas, "epsilon")


@pytest.mark.parametrize(
    "config",
    [
        abcore.ABConfig(),
        abcore.ABConfig(order=3, interval=3, warmup=3, cooldown=1),
        abcore.ABConfig(tolerance=0.2, cooldown=1),
    ],
    ids=["default", "order3", "adaptive"],
)
def test_ddim_parity_with_correction(config):
    lam, steps = _ddim()
    np.testing.assert_allclose(steps.apply(0, X0, X0), np.asarray(aj.ddim_eps_step(X0, X0, lam[0], lam[1])))

    def model(x, t):  # an eps model on lambda
        return abcore.testing.parity_model(x, 0.1 * t)

    ref = abcore.sample(model, X0, lam, None, config, steps=steps)
    got = aj.sample(
        lambda p, x, t: abcore.testing.parity_model(x, 0.1 * t, jnp),
        None,
        jnp.asarray(X0),
        lam,
        aj.ddim_eps_step,
        config,
        steps=steps,
        keep_outputs=True,
    )
    _assert_same(got, ref)
    assert not ref.computed.all()


@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize("sampler", ["flow", "ddim"])
def test_correction_is_exact_on_polynomial_outputs(order, sampler):
    """Outputs p(t) of degree <= order: the corrected cached sampler ends where the full one does."""
    if sampler == "flow":
        grid, steps, step_fn = GRID, abcore.LinearSteps.euler(GRID), aj.flow_euler_step
    else:
        (grid, steps), step_fn = _ddim(), aj.ddim_eps_step
    coefficients = np.linspace(0.7, -0.4, order + 1)

    def model(params, x, t):
        return jnp.broadcast_to(jnp.polyval(jnp.asarray(coefficients), t), x.shape)

    x0 = jnp.asarray(X0)
    full = aj.sample(model, None, x0, grid, step_fn, abcore.ABConfig(order=1, interval=1, warmup=1, cooldown=0))
    config = abcore.ABConfig(order=order, interval=4, warmup=order, cooldown=1)
    cached = aj.sample(model, None, x0, grid, step_fn, config, steps=steps)
    plain = aj.sample(model, None, x0, grid, step_fn, config)
    assert not np.asarray(cached.computed).all() and bool(cached.computed[-1])
    scale = float(np.abs(np.asarray(full.x)).max())
    np.testing.assert_allclose(np.asarray(cached.x), np.asarray(full.x), rtol=0, atol=1e-12 * scale)
    assert float(np.abs(np.asarray(plain.x) - np.asarray(full.x)).max()) > 1e-6 * scale  # uncorrected is not


def test_linear_steps_without_step_fn():
    """step_fn=None runs steps' own x' = a x + b out, like abcore.sample."""
    steps = abcore.LinearSteps.euler(GRID)
    config = abcore.ABConfig()
    ref = abcore.sample(_numpy_model, X0, GRID, None, config, steps=steps)
    got = aj.sample(_jax_model, None, jnp.asarray(X0), GRID, None, config, steps=steps, keep_outputs=True)
    _assert_same(got, ref)
