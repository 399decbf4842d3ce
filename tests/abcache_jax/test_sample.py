"""abcache_jax.sample: parity with abcore.sample on a Flax model, model-call counts, compiled cost, bad input."""

import gc
import weakref
from typing import Any

import abcache_jax as aj
import abcore
import abcore.testing
import jax
import jax.numpy as jnp
import numpy as np
import pytest

N = 20
SIGMAS = np.linspace(1.0, 0.0, N + 1)  # flow matching: the abscissa is sigma
_ABAR = np.cumprod(1.0 - np.linspace(1e-4, 0.02, 1000))
LAMBDAS = abcore.lambda_from_alphas_cumprod(_ABAR[np.linspace(999, 0, N + 1).astype(int)])  # eps: lambda
SAMPLERS = {"flow": (SIGMAS, aj.flow_euler_step), "eps": (LAMBDAS, aj.ddim_eps_step)}


def _reference(apply, params, x0, grid, step_fn, config):
    """abcore's numpy executor on the same model and step function."""

    def model(x, t):
        return np.asarray(apply(params, jnp.asarray(x), t))

    def step(x, out, t, t_next):
        return np.asarray(step_fn(jnp.asarray(x), jnp.asarray(out), t, t_next))

    return abcore.sample(model, x0, grid, step, config)


def _assert_parity(make_denoiser, sampler, config, rtol=1e-10):
    grid, step_fn = SAMPLERS[sampler]
    apply, params = make_denoiser(4, jnp.float64)
    x0 = np.random.default_rng(1).normal(size=(3, 4))
    ref = _reference(apply, params, x0, grid, step_fn, config)
    got = aj.sample(apply, params, jnp.asarray(x0), grid, step_fn, config, keep_outputs=True)
    np.testing.assert_array_equal(np.asarray(got.computed), ref.computed)
    assert got.x.dtype == jnp.float64
    np.testing.assert_allclose(np.asarray(got.x), ref.x, rtol=rtol, atol=0)
    np.testing.assert_allclose(np.asarray(got.outputs), np.stack(ref.outputs), rtol=rtol, atol=1e-14)
    return ref, got


FIXED = [
    ("flow", abcore.ABConfig(order=2, interval=3, warmup=2, cooldown=0)),
    ("flow", abcore.ABConfig(order=3, interval=4, warmup=3, cooldown=2)),
    ("flow", abcore.ABConfig(order=1, interval=2, warmup=1, cooldown=0)),
    ("flow", abcore.ABConfig()),
    ("flow", abcore.ABConfig(order=2, compute_mask=(True, True, False, True, False, False, True) + (False,) * 13)),
    ("eps", abcore.ABConfig(order=2, interval=3, warmup=2, cooldown=0)),
    ("eps", abcore.ABConfig(order=3, interval=3, warmup=3, cooldown=0, weighting="exp-eps")),
]


@pytest.mark.parametrize(("sampler", "config"), FIXED)
def test_fixed_parity_with_numpy_reference(x64, denoiser, sampler, config):
    ref, _ = _assert_parity(denoiser, sampler, config)
    np.testing.assert_array_equal(ref.computed, abcore.make_plan(config, SAMPLERS[sampler][0][:-1]).compute)


ADAPTIVE = [
    ("flow", abcore.ABConfig(order=3, interval=4, warmup=3, cooldown=0, tolerance=0.01)),
    ("flow", abcore.ABConfig(order=2, interval=4, warmup=2, cooldown=0, tolerance=0.1)),
    ("eps", abcore.ABConfig(order=2, interval=4, warmup=2, cooldown=0, tolerance=0.03)),
    ("eps", abcore.ABConfig(order=3, interval=4, warmup=3, cooldown=0, tolerance=0.1, weighting="exp-eps")),
]


@pytest.mark.parametrize(("sampler", "config"), ADAPTIVE)
def test_adaptive_parity_with_numpy_reference(x64, denoiser, sampler, config):
    ref, _ = _assert_parity(denoiser, sampler, config)
    forced = np.array([config.forced_compute(i, N) for i in range(N)])
    assert not ref.computed.all(), "some candidate steps must be predicted"
    assert (ref.computed & ~forced).any(), "some candidate steps must be rejected by the error test"


def test_cache_plan_input_matches_config_input(x64, denoiser):
    config = abcore.ABConfig(order=2, interval=3, warmup=2, cooldown=0)
    plan = abcore.make_plan(config, SIGMAS[:-1])
    apply, params = denoiser(4, jnp.float64)
    x0 = jnp.ones((2, 4))
    a = aj.sample(apply, params, x0, SIGMAS, aj.flow_euler_step, plan)
    b = aj.sample(apply, params, x0, SIGMAS, aj.flow_euler_step, config)
    np.testing.assert_array_equal(np.asarray(a.x), np.asarray(b.x))
    np.testing.assert_array_equal(np.asarray(a.computed), plan.compute)


def _overflow_at_step_3(grid: np.ndarray, config: abcore.ABConfig, **kwargs: Any) -> tuple[Any, Any]:
    """abcore's reference and abcache_jax on a model whose output at grid[3] (a computed step of interval 3) is
    1.7e308, so that the extrapolation at step 4 overflows and both executors call the model instead."""
    t_bad = grid[3]

    def apply(params, x, t):
        return jnp.where(jnp.abs(t - t_bad) < 1e-12, 1.7e308, jnp.sin(x * params + t))

    def step(x, out, t, t_next):
        return x + (t_next - t) * jnp.tanh(out)

    x0 = np.linspace(-1.0, 1.0, 6).reshape(2, 3)
    with np.errstate(over="ignore"):
        ref = _reference(apply, 1.3, x0, grid, step, config)
    return ref, aj.sample(apply, 1.3, jnp.asarray(x0), grid, step, config, **kwargs)


def test_nonfinite_prediction_falls_back_like_the_reference(x64):
    """An output of 1.7e308 makes the next extrapolation overflow: both executors call the model instead."""
    config = abcore.ABConfig(order=2, interval=3, warmup=2, cooldown=0)
    ref, got = _overflow_at_step_3(SIGMAS, config)
    plan = abcore.make_plan(config, SIGMAS[:-1])
    assert (ref.computed & ~plan.compute).any(), "the overflow must force extra model calls"
    np.testing.assert_array_equal(np.asarray(got.computed), ref.computed)
    np.testing.assert_allclose(np.asarray(got.x), ref.x, rtol=1e-10, atol=0)


def _counting_model():
    calls = {"run": 0, "trace": 0}

    def tick():
        calls["run"] += 1

    def apply(params, x, t):
        calls["trace"] += 1
        jax.debug.callback(tick)
        return jnp.tanh(x @ params + t)

    return apply, calls


@pytest.mark.parametrize(
    "config",
    [
        abcore.ABConfig(order=2, interval=3, warmup=2, cooldown=0),
        abcore.ABConfig(order=2, interval=4, warmup=2, cooldown=0, tolerance=0.05),
    ],
    ids=["fixed", "adaptive"],
)
def test_model_runs_only_at_computed_steps_and_compiles_once(config):
    apply, calls = _counting_model()
    params = jnp.eye(4) * 0.5
    x0 = jnp.linspace(-1.0, 1.0, 12).reshape(3, 4)
    first = aj.sample(apply, params, x0, SIGMAS, aj.flow_euler_step, config)
    jax.effects_barrier()
    computed = np.asarray(first.computed)
    assert calls["run"] == computed.sum() < N
    if not config.adaptive:
        assert computed.sum() == config.num_computed(N) == 8
    traces = calls["trace"]
    second = aj.sample(apply, params * 0.9, x0 + 0.1, SIGMAS, aj.flow_euler_step, config)
    jax.effects_barrier()
    assert calls["trace"] == traces, "new data on the same plan must not retrace"
    assert calls["run"] == computed.sum() + np.asarray(second.computed).sum()


def test_compiled_flops_grow_with_computed_steps_not_steps():
    """With unroll=True (and no fallback guard) the program holds exactly one model call per computed step."""
    width = 64
    params = jnp.full((width, width), 1.0 / width)
    x0 = jnp.ones((8, width))

    def apply(params, x, t):
        return jnp.tanh(x @ params + t)

    def cost(compiled) -> float:
        return float(dict(compiled.cost_analysis() or {})["flops"])

    model_flops = cost(jax.jit(apply).lower(params, x0, 0.0).compile())

    def flops(n, m):
        mask = tuple(bool(np.isin(i, np.arange(m) * n // m)) for i in range(n))  # m computed of n
        config = abcore.ABConfig(order=2, compute_mask=mask)
        assert sum(mask) == m
        grid = np.linspace(1.0, 0.0, n + 1)
        run = jax.jit(
            lambda p, x: aj.sample(apply, p, x, grid, aj.flow_euler_step, config, unroll=True, check_finite=False).x
        )
        return cost(run.lower(params, x0).compile())

    # flops = a * computed + b * steps: solve from three programs.
    f_12_4, f_24_4, f_24_8 = flops(12, 4), flops(24, 4), flops(24, 8)
    per_computed = (f_24_8 - f_24_4) / 4
    per_step = (f_24_4 - f_12_4) / 12
    assert abs(per_computed - model_flops) < 0.1 * model_flops
    assert per_step < 0.1 * model_flops
    assert f_12_4 < 4 * model_flops + 12 * 0.1 * model_flops


def test_pytree_outputs(x64):
    """A dict output is cached leaf by leaf: same trajectory as the equivalent single-array model."""
    config = abcore.ABConfig(order=3, interval=3, warmup=3, cooldown=0)

    def tree_model(params, x, t):
        v = jnp.sin(x * params) + t
        return {"v": v, "twice": (2.0 * v).astype(jnp.float32)}

    def tree_step(x, out, t, t_next):
        return x + (t_next - t) * 0.5 * (out["v"] + 0.5 * out["twice"].astype(x.dtype))

    x0 = jnp.linspace(-1.0, 1.0, 8).reshape(2, 4)
    got = aj.sample(tree_model, 1.5, x0, SIGMAS, tree_step, config, keep_outputs=True)
    ref = aj.sample(lambda p, x, t: tree_model(p, x, t)["v"], 1.5, x0, SIGMAS, aj.flow_euler_step, config)
    np.testing.assert_allclose(np.asarray(got.x), np.asarray(ref.x), rtol=1e-6)
    assert got.outputs["v"].shape == (N, 2, 4)
    assert got.outputs["twice"].dtype == jnp.float32


def test_bf16_model_outputs(denoiser):
    """bf16 in, bf16 out; predicted outputs are the float32-accumulated extrapolation cast to bf16."""
    config = abcore.ABConfig(order=3, interval=3, warmup=3, cooldown=0)
    apply, params32 = denoiser(8, jnp.float32)
    params = jax.tree.map(lambda p: p.astype(jnp.bfloat16), params32)
    x0 = jax.random.normal(jax.random.PRNGKey(0), (4, 8), jnp.bfloat16)
    got = aj.sample(apply, params, x0, SIGMAS, aj.flow_euler_step, config, keep_outputs=True)
    assert got.x.dtype == jnp.bfloat16 and got.outputs.dtype == jnp.bfloat16
    plan = abcore.make_plan(config, SIGMAS[:-1])
    outs = np.asarray(got.outputs.astype(jnp.float32), dtype=np.float64)
    history: list = []
    for i in range(N):
        if plan.compute[i]:
            history = [outs[i], *history][: config.order]
            continue
        expected = sum(w * h for w, h in zip(plan.weights[i], history))
        ulp = 2.0 ** (np.floor(np.log2(np.abs(expected) + 1e-30)) - 7)
        assert np.all(np.abs(outs[i] - expected) <= ulp), f"step {i}"
    ref = aj.sample(apply, params32, x0.astype(jnp.float32), SIGMAS, aj.flow_euler_step, config)
    np.testing.assert_allclose(np.asarray(got.x, np.float32), np.asarray(ref.x), atol=0.1)


def _apply(params, x, t):
    return jnp.tanh(x * params + t)


def test_bad_input_raises_naming_the_parameter():
    x0 = jnp.ones((2, 3))
    config = abcore.ABConfig()
    with pytest.raises(ValueError, match="order"):
        abcore.ABConfig(order=0)
    with pytest.raises(ValueError, match="grid"):
        aj.sample(_apply, 1.0, x0, np.ones((3, 2)), aj.flow_euler_step, config)
    with pytest.raises(ValueError, match="grid"):
        aj.sample(_apply, 1.0, x0, [1.0, 0.5, 0.7], aj.flow_euler_step, config)
    with pytest.raises(ValueError, match="grid"):
        jax.jit(lambda t: aj.sample(_apply, 1.0, x0, t, aj.flow_euler_step, config).x)(jnp.ones((5, 2)))
    with pytest.raises(ValueError, match="model_fn"):
        aj.sample(lambda p, x, t: x[:, :2], 1.0, x0, SIGMAS, aj.flow_euler_step, config)
    with pytest.raises(ValueError, match="step_fn"):
        aj.sample(_apply, 1.0, x0, SIGMAS, lambda x, o, t, tn: (x + o).astype(jnp.bfloat16), config)
    with pytest.raises(ValueError, match="config_or_plan"):
        aj.sample(_apply, 1.0, x0, SIGMAS, aj.flow_euler_step, abcore.make_plan(config, SIGMAS[:-2]))
    with pytest.raises(TypeError, match="config_or_plan"):
        aj.sample(_apply, 1.0, x0, SIGMAS, aj.flow_euler_step, {"order": 2})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="grid"):
        aj.sample(_apply, 1.0, x0, "1.0 0.5 0.0", aj.flow_euler_step, config)
    with pytest.raises(ValueError, match="grid"):
        aj.sample(_apply, 1.0, x0, [1.0], aj.flow_euler_step, config)
    with pytest.raises(ValueError, match="'steps': 19"):
        aj.sample(_apply, 1.0, x0, SIGMAS, aj.flow_euler_step, config, steps=abcore.LinearSteps.euler(SIGMAS[:-1]))
    with pytest.raises(TypeError, match="steps"):
        aj.sample(_apply, 1.0, x0, SIGMAS, aj.flow_euler_step, config, steps=np.diff(SIGMAS))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"correct=True needs .* steps="):
        aj.sample(_apply, 1.0, x0, SIGMAS, aj.flow_euler_step, abcore.ABConfig(correct=True))
    with pytest.raises(ValueError, match="step_fn"):
        aj.sample(_apply, 1.0, x0, SIGMAS, None, config)
    with pytest.raises(ValueError, match="config_or_plan"):  # a plan made with steps needs the same steps
        plan = abcore.make_plan(config, SIGMAS[:-1], abcore.LinearSteps.euler(SIGMAS))
        aj.sample(_apply, 1.0, x0, SIGMAS, aj.flow_euler_step, plan)
    with pytest.raises(ValueError, match="cooldown"):  # the fixed schedule's cool-down is longer than the run
        aj.sample(_apply, 1.0, x0, SIGMAS[:4], aj.flow_euler_step, abcore.ABConfig(interval=5))
    with pytest.raises(ValueError, match="cooldown"):  # a warm-up and cool-down that do not fit the budget
        aj.sample(_apply, 1.0, x0, SIGMAS, aj.flow_euler_step, abcore.ABConfig(calls=3, cooldown=4))
    # the default budget fits any run: min(n, 5 + n // 5) calls, every step of a 3-step run
    assert np.asarray(aj.sample(_apply, 1.0, x0, SIGMAS[:4], aj.flow_euler_step, config).computed).all()


def test_off_plan_weights_follow_the_rule_after_a_fallback(x64):
    """After a non-finite fallback on the index abscissa the rule predicts with [2, -1], as abcore.sample does.

    (The old executor re-derived the weights on the times there: [2.133, -1.133] on this grid.)
    """
    grid = abcore.testing.make_grid("shifted", 12)
    config = abcore.ABConfig(order=2, interval=3, warmup=2, cooldown=0, abscissa="index")
    ref, got = _overflow_at_step_3(grid, config, keep_outputs=True)  # computed 0, 1, 3, 6, 9; then 4 too
    np.testing.assert_array_equal(np.asarray(got.computed), ref.computed)
    assert ref.computed[4] and not ref.computed[5]
    outputs = np.asarray(got.outputs)
    np.testing.assert_allclose(outputs, np.stack(ref.outputs), rtol=1e-12)
    np.testing.assert_allclose(outputs[5], 2.0 * outputs[4] - outputs[3], rtol=1e-12)
    np.testing.assert_allclose(np.asarray(got.x), ref.x, rtol=1e-10, atol=0)


def test_vmap_predicted_steps_do_not_run_the_model():
    """Under jax.vmap (fallback on: a data-dependent predicate) the model runs only at computed steps."""
    config = abcore.ABConfig(order=2, interval=3, warmup=2, cooldown=0)
    called: list[float] = []

    def apply(params, x, t):
        jax.debug.callback(lambda t: called.append(float(t)), t)  # t is unbatched: once per evaluation
        return jnp.tanh(x * params + t)

    xs = jnp.linspace(-1.0, 1.0, 3 * 2 * 4).reshape(3, 2, 4)
    run = jax.vmap(lambda x: aj.sample(apply, 0.7, x, SIGMAS, aj.flow_euler_step, config))
    got = run(xs)
    jax.effects_barrier()
    plan = abcore.make_plan(config, SIGMAS[:-1])
    np.testing.assert_array_equal(np.asarray(got.computed), np.broadcast_to(plan.compute, (3, N)))
    np.testing.assert_allclose(called, SIGMAS[:-1][plan.compute], rtol=1e-6)
    for k in range(3):
        one = aj.sample(apply, 0.7, xs[k], SIGMAS, aj.flow_euler_step, config)
        np.testing.assert_allclose(np.asarray(got.x[k]), np.asarray(one.x), rtol=1e-6)


def test_any_over_batch_reduces_under_vmap():
    flags = jnp.asarray([False, True, False])
    assert bool(aj.any_over_batch(flags[1]))
    np.testing.assert_array_equal(jax.vmap(aj.any_over_batch)(flags), [True, True, True])
    np.testing.assert_array_equal(jax.vmap(aj.any_over_batch)(jnp.zeros(3, bool)), [False] * 3)


def _held_programs() -> int:
    return sum(len(programs) for _, programs in aj._sample._PROGRAMS.values())


def test_compile_cache_frees_dropped_closures():
    """Fresh closures get fresh programs, held only while the closure lives."""
    config = abcore.ABConfig(order=2, interval=3, warmup=2, cooldown=0)
    x0 = jnp.ones((2, 3))
    gc.collect()
    owners, held = len(aj._sample._PROGRAMS), _held_programs()
    refs = []
    for k in range(5):
        fn = lambda p, x, t, k=k: jnp.tanh(x * p + t + k)  # noqa: E731
        aj.sample(fn, 1.0, x0, SIGMAS, aj.flow_euler_step, config).x.block_until_ready()
        refs.append(weakref.ref(fn))
    assert len(aj._sample._PROGRAMS) == owners + 1  # the last closure is still alive
    del fn
    gc.collect()
    assert all(ref() is None for ref in refs), "the cache must not keep a model_fn alive"
    assert len(aj._sample._PROGRAMS) == owners and _held_programs() == held


class _CountingModel:
    def __init__(self) -> None:
        self.traces = 0

    def apply(self, params, x, t):
        self.traces += 1
        return jnp.tanh(x * params + t)


def test_same_function_compiles_once():
    """A bound method (a new object at each access, like module.apply) and a plain function: one trace each."""
    config = abcore.ABConfig(order=2, interval=3, warmup=2, cooldown=0)
    model = _CountingModel()
    aj.sample(model.apply, 1.0, jnp.ones((2, 3)), SIGMAS, aj.flow_euler_step, config)
    traces = model.traces
    assert traces > 0
    aj.sample(model.apply, 0.5, jnp.zeros((2, 3)), SIGMAS, aj.flow_euler_step, config)
    assert model.traces == traces
    assert len(aj._sample._PROGRAMS[id(model)][1]) == 1
    calls = {"trace": 0}

    def apply(params, x, t):
        calls["trace"] += 1
        return jnp.tanh(x * params + t)

    aj.sample(apply, 1.0, jnp.ones((2, 3)), SIGMAS, aj.flow_euler_step, config)
    first = calls["trace"]
    aj.sample(apply, 2.0, jnp.ones((2, 3)), SIGMAS, aj.flow_euler_step, config)
    assert calls["trace"] == first > 0
    key = id(model)
    del model
    gc.collect()
    assert key not in aj._sample._PROGRAMS
