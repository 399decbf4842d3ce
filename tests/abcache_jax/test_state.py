"""CacheState: exact buffer semantics, dtype/shape stability under jit, lax.cond and lax.scan."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from abcache_jax import CacheState, extrapolate, init_state, mark_predicted, push, weighted_sum
from jax import lax


def _output_like():
    return {"v": jnp.zeros((2, 3), jnp.float32), "aux": (jnp.zeros((5,), jnp.bfloat16),)}


def _signature(tree):
    return jax.tree.structure(tree), [(leaf.shape, leaf.dtype) for leaf in jax.tree.leaves(tree)]


def _filled(order=3):
    state = init_state(_output_like(), order)
    for i in range(order):
        out = {"v": jnp.full((2, 3), float(i + 1)), "aux": (jnp.full((5,), i + 1, jnp.bfloat16),)}
        state = push(state, out, 0.5 - 0.1 * i)
    return state


def test_init_state_shapes_and_dtypes():
    state = init_state(_output_like(), 3)
    assert state.outputs["v"].shape == (3, 2, 3) and state.outputs["v"].dtype == jnp.float32
    assert state.outputs["aux"][0].shape == (3, 5) and state.outputs["aux"][0].dtype == jnp.bfloat16
    assert state.times.shape == (3,) and not bool(state.valid.any()) and int(state.consecutive) == 0


def test_push_is_newest_first_and_drops_the_oldest():
    state = _filled(3)
    state = push(state, {"v": jnp.full((2, 3), 9.0), "aux": (jnp.full((5,), 9, jnp.bfloat16),)}, 0.1)
    np.testing.assert_array_equal(state.outputs["v"][:, 0, 0], [9.0, 3.0, 2.0])
    np.testing.assert_allclose(state.times, [0.1, 0.3, 0.4], rtol=1e-6)
    assert bool(state.valid.all())
    predicted = mark_predicted(mark_predicted(state))
    assert int(predicted.consecutive) == 2
    assert int(push(predicted, jax.tree.map(lambda b: b[0], state.outputs), 0.0).consecutive) == 0


def test_extrapolate_applies_weights_newest_first():
    state = _filled(3)  # newest first: 3, 2, 1
    w = jnp.asarray([3.0, -3.0, 1.0])  # quadratic extrapolation on equal steps, Eq. 3.6 with k = 3
    pred = extrapolate(state, w)
    np.testing.assert_array_equal(pred["v"], np.full((2, 3), 3 * 3 - 3 * 2 + 1.0))
    assert pred["aux"][0].dtype == jnp.bfloat16


def test_state_is_stable_under_jit_cond_and_scan():
    state = _filled(2)
    out = jax.tree.map(lambda b: b[0] + 1, state.outputs)
    ref = _signature(state)

    assert _signature(jax.jit(push)(state, out, 0.2)) == ref
    assert _signature(jax.jit(mark_predicted)(state)) == ref

    @jax.jit
    def either(flag, state):
        return lax.cond(flag, lambda s: push(s, out, 0.2), mark_predicted, state)

    for flag in (True, False):
        assert _signature(either(flag, state)) == ref

    def body(s, t):
        s = lax.cond(t > 0.5, lambda s: push(s, out, t), mark_predicted, s)
        return s, None

    final, _ = jax.jit(lambda s: lax.scan(body, s, jnp.linspace(0.0, 1.0, 6)))(state)
    assert _signature(final) == ref
    assert isinstance(final, CacheState)
    np.testing.assert_allclose(final.times, [1.0, 0.8], rtol=1e-6)
    assert int(final.consecutive) == 0


def test_bf16_weighted_sum_accumulates_in_float32():
    h = jnp.asarray([1.0078125, 1.0, 1.0], jnp.bfloat16)[:, None]  # 1 + 2^-7 is exact in bf16
    state = init_state(jnp.zeros((1,), jnp.bfloat16), 3)._replace(outputs=h)
    w = jnp.asarray([3.0, -3.0, 1.0])
    pred = extrapolate(state, w)
    assert pred.dtype == jnp.bfloat16
    assert float(pred[0]) == 1.0234375  # 3 (1 + 2^-7) - 3 + 1, exact in float32 and in bf16
    naive = (w.astype(jnp.bfloat16)[0] * h[0]).astype(jnp.bfloat16)
    for j in (1, 2):
        naive = (naive + w.astype(jnp.bfloat16)[j] * h[j]).astype(jnp.bfloat16)
    assert float(naive[0]) != 1.0234375  # bf16 accumulation would have lost it
    assert weighted_sum(state.outputs, w).dtype == jnp.float32


def test_init_state_rejects_bad_order():
    with pytest.raises(ValueError, match="order"):
        init_state(jnp.zeros(3), 0)
