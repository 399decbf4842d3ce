"""`sample` called inside a user's own jit / vmap / grad: closures over traced values, and traced grids."""

import abcache_jax as aj
import abcore
import jax
import jax.numpy as jnp
import numpy as np
import pytest

CONFIG = abcore.ABConfig()  # order 2, a budget of 5 + n // 5 calls: 10 at 28 steps, 7 at 10
X0 = jnp.linspace(-1.0, 1.0, 8).reshape(2, 4)
W = jnp.asarray([0.5, 1.0, 1.5, 2.0])


def grid(n):
    return np.linspace(1.0, 0.0, n + 1)


class Model:
    """Keras's pattern: the weight is an attribute set inside the outer trace, read by a bound method."""

    def velocity(self, params, x, sigma):
        return -x * self.w + jnp.sin(3.0 * sigma)


MODEL = Model()  # one owner across calls: the compiled program cache keys on it


def cached_run(w, n):
    """The velocity closes over w (a tracer under an outer transformation); params are None."""
    MODEL.w = w
    return aj.sample(
        MODEL.velocity, None, X0, grid(n), aj.flow_euler_step, CONFIG, steps=abcore.LinearSteps.euler(grid(n))
    )


def explicit_run(w, n):
    """The same run with w passed as params (the oracle: nothing closed over)."""
    return aj.sample(
        lambda p, x, s: -x * p + jnp.sin(3.0 * s), w, X0, grid(n), aj.flow_euler_step, CONFIG,
        steps=abcore.LinearSteps.euler(grid(n)),
    )  # fmt: skip


TRANSFORMS = {
    "jit": lambda run, n: jax.jit(lambda w: run(w, n).x)(W),
    "vmap": lambda run, n: jax.vmap(lambda w: run(w, n).x)(jnp.stack([W, 2.0 * W])),
    "grad": lambda run, n: jax.grad(lambda w: jnp.sum(run(w, n).x ** 2))(W),
}


@pytest.mark.parametrize("transform", list(TRANSFORMS))
def test_closure_over_a_traced_weight_across_repeated_calls(transform):
    # 28 -> 10 -> 28 steps: the third call used to reuse the first call's program, and with it the
    # tracer its model_fn closed over then (UnexpectedTracerError).
    apply = TRANSFORMS[transform]
    results = [np.asarray(apply(cached_run, n)) for n in (28, 10, 28)]
    np.testing.assert_array_equal(results[2], results[0])
    for n, got in zip((28, 10), results, strict=False):
        np.testing.assert_allclose(got, np.asarray(apply(explicit_run, n)), rtol=1e-6, atol=1e-7)
        assert np.all(np.isfinite(got))


def test_calls_under_jit_make_the_planned_model_calls():
    calls: list[float] = []

    def velocity(params, x, sigma):
        jax.debug.callback(lambda s: calls.append(float(s)), sigma)
        return -x * params + sigma

    for n in (28, 10, 28):
        calls.clear()
        out = jax.jit(lambda w, n=n: aj.sample(velocity, w, X0, grid(n), aj.flow_euler_step, CONFIG))(W)
        jax.effects_barrier()
        assert len(calls) == int(np.asarray(out.computed).sum()) == CONFIG.num_computed(n)


@pytest.mark.parametrize(
    "config",
    [
        abcore.ABConfig(order=2, interval=3, warmup=2, cooldown=1, abscissa="index"),
        abcore.ABConfig(order=3, interval=4, warmup=3, cooldown=2),
        abcore.ABConfig(order=2, interval=4, warmup=2, cooldown=0, tolerance=0.05),
        abcore.ABConfig(order=2, interval=3, warmup=2, cooldown=1, predictor="binomial"),
    ],
    ids=["index", "time", "adaptive", "binomial"],
)
@pytest.mark.parametrize("with_steps", [False, True], ids=["plain", "corrected"])
def test_traced_grid_equals_the_concrete_grid(x64, denoiser, config, with_steps):
    # The scan reads the grid as data (nodes, and the times model_fn and step_fn get), so a grid that
    # is a traced argument of the user's jit gives the concrete grid's decisions and values.
    apply, params = denoiser(4, jnp.float64)
    sigmas = np.linspace(1.0, 0.0, 17) ** 1.5
    steps = abcore.LinearSteps.euler(sigmas) if with_steps else None
    x0 = jnp.asarray(np.random.default_rng(2).normal(size=(3, 4)))
    concrete = aj.sample(apply, params, x0, sigmas, aj.flow_euler_step, config, steps=steps, keep_outputs=True)
    run = jax.jit(lambda g: aj.sample(apply, params, x0, g, aj.flow_euler_step, config, steps=steps, keep_outputs=True))
    traced = run(jnp.asarray(sigmas))
    np.testing.assert_array_equal(np.asarray(traced.computed), np.asarray(concrete.computed))
    assert not np.asarray(concrete.computed).all()
    np.testing.assert_allclose(np.asarray(traced.x), np.asarray(concrete.x), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(np.asarray(traced.outputs), np.asarray(concrete.outputs), rtol=1e-12, atol=1e-14)
    # another grid through the same compiled function
    other = np.linspace(1.0, 0.0, 17)
    got = run(jnp.asarray(other))
    want = aj.sample(apply, params, x0, other, aj.flow_euler_step, config, steps=steps)
    np.testing.assert_allclose(np.asarray(got.x), np.asarray(want.x), rtol=1e-12, atol=1e-14)


def test_traced_grid_refusals_name_the_parameter():
    sigmas = grid(8)
    plan = abcore.make_plan(CONFIG, sigmas[:-1])
    with pytest.raises(ValueError, match=r"config_or_plan: a CachePlan .* traced"):
        jax.jit(lambda g: aj.sample(lambda p, x, s: -x, None, X0, g, aj.flow_euler_step, plan).x)(sigmas)
    with pytest.raises(ValueError, match="grid must be a 1-D real array"):
        jax.jit(lambda g: aj.sample(lambda p, x, s: -x, None, X0, g, aj.flow_euler_step, CONFIG).x)(jnp.ones((9, 2)))
    with pytest.raises(ValueError, match="grid must be a 1-D real array"):
        jax.jit(lambda g: aj.sample(lambda p, x, s: -x, None, X0, g, aj.flow_euler_step, CONFIG).x)(jnp.ones(9, bool))
