"""History: exact buffer semantics, the rule state beside it, dtype/shape stability under jit, cond and scan."""

import abcore
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from abcache_jax import History, init_history, push, weighted_sum
from jax import lax

CONFIG = abcore.ABConfig(order=3, interval=3, warmup=3, cooldown=0)


def _complete(history, i, computed, t, output=None, config=CONFIG):
    """The history after step i at time t: `push` stores a computed output, `abcore.complete` advances the rule."""
    sched = abcore.schedule(config, num_steps=10)
    outputs = push(history.outputs, output) if computed else history.outputs
    return History(outputs, abcore.complete(sched, history.rule, i, computed, t, xp=jnp))


def _output_like():
    return {"v": jnp.zeros((2, 3), jnp.float32), "aux": (jnp.zeros((5,), jnp.bfloat16),)}


def _signature(tree):
    return jax.tree.structure(tree), [(leaf.shape, leaf.dtype) for leaf in jax.tree.leaves(tree)]


def _output(value):
    return {"v": jnp.full((2, 3), float(value)), "aux": (jnp.full((5,), value, jnp.bfloat16),)}


def _filled(config=CONFIG):
    history = init_history(_output_like(), config)
    for i in range(config.order):
        history = _complete(history, i, True, 0.5 - 0.1 * i, _output(i + 1), config)
    return history


def test_init_history_shapes_and_dtypes():
    history = init_history(_output_like(), CONFIG)
    assert history.outputs["v"].shape == (3, 2, 3) and history.outputs["v"].dtype == jnp.float32
    assert history.outputs["aux"][0].shape == (3, 5) and history.outputs["aux"][0].dtype == jnp.bfloat16
    rule = history.rule
    assert isinstance(rule, abcore.RuleState)
    assert rule.nodes.shape == (3,) and not bool(rule.valid.any()) and int(rule.consecutive) == 0
    assert rule.pending_nodes.shape == (CONFIG.max_run,) == (2,)


def test_push_is_newest_first_and_drops_the_oldest():
    history = _complete(_filled(), 3, True, 0.1, _output(9))
    np.testing.assert_array_equal(history.outputs["v"][:, 0, 0], [9.0, 3.0, 2.0])
    np.testing.assert_allclose(history.rule.nodes, [0.1, 0.3, 0.4], rtol=1e-6)
    assert bool(history.rule.valid.all())
    predicted = _complete(history, 4, False, 0.05)
    assert int(predicted.rule.consecutive) == 1 and bool(predicted.rule.pending_valid[0])
    np.testing.assert_array_equal(predicted.outputs["v"], history.outputs["v"])  # a prediction stores nothing
    again = _complete(predicted, 5, True, 0.0, _output(10))
    assert int(again.rule.consecutive) == 0 and not bool(again.rule.pending_valid.any())


def test_weighted_sum_applies_weights_newest_first():
    history = _filled()  # newest first: 3, 2, 1
    w = jnp.asarray([3.0, -3.0, 1.0])  # quadratic extrapolation on equal steps, Eq. 3.6 with k = 3
    pred = weighted_sum(history.outputs, w)
    np.testing.assert_array_equal(pred["v"], np.full((2, 3), 3 * 3 - 3 * 2 + 1.0))
    assert pred["aux"][0].dtype == jnp.float32  # bf16 accumulates in float32


def test_history_is_stable_under_jit_cond_and_scan():
    config = abcore.ABConfig(order=2, interval=3, warmup=2, cooldown=0)
    history = _filled(config)
    out = jax.tree.map(lambda b: b[0] + 1, history.outputs)
    ref = _signature(history)

    def predicted(h, t=0.2):
        return _complete(h, 2, False, t, config=config)

    def computed(h, t=0.2):
        return _complete(h, 2, True, t, out, config)

    assert _signature(jax.jit(computed)(history)) == ref
    assert _signature(jax.jit(predicted)(history)) == ref

    @jax.jit
    def either(flag, history):
        return lax.cond(flag, computed, predicted, history)

    for flag in (True, False):
        assert _signature(either(flag, history)) == ref

    def body(h, t):
        return lax.cond(t > 0.5, lambda h: computed(h, t), lambda h: predicted(h, t), h), None

    final, _ = jax.jit(lambda h: lax.scan(body, h, jnp.linspace(0.0, 1.0, 6)))(history)
    assert _signature(final) == ref
    assert isinstance(final, History)
    np.testing.assert_allclose(final.rule.nodes, [1.0, 0.8], rtol=1e-6)
    assert int(final.rule.consecutive) == 0


def test_bf16_weighted_sum_accumulates_in_float32():
    h = jnp.asarray([1.0078125, 1.0, 1.0], jnp.bfloat16)[:, None]  # 1 + 2^-7 is exact in bf16
    w = jnp.asarray([3.0, -3.0, 1.0])
    total = weighted_sum(h, w)
    assert total.dtype == jnp.float32
    assert float(total[0].astype(jnp.bfloat16)) == 1.0234375  # 3 (1 + 2^-7) - 3 + 1, exact in float32 and bf16
    naive = (w.astype(jnp.bfloat16)[0] * h[0]).astype(jnp.bfloat16)
    for j in (1, 2):
        naive = (naive + w.astype(jnp.bfloat16)[j] * h[j]).astype(jnp.bfloat16)
    assert float(naive[0]) != 1.0234375  # bf16 accumulation would have lost it


def test_init_history_rejects_a_non_config():
    with pytest.raises(TypeError, match="config"):
        init_history(jnp.zeros(3), 2)  # type: ignore[arg-type]
