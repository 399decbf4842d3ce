"""`CacheState`: the fixed-shape history of computed outputs that a cached sampler carries.

The buffer holds the last ``order`` *computed* model outputs, newest first (leading
axis of every leaf), with their real step times and a mask of the filled prefix.
Its shapes and dtypes never change, so it can live in a `lax.scan` carry and pass
through both branches of a `lax.cond`. Predictions are weighted sums over this
buffer with weights that abcore computes; nothing here derives weights.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

PyTree = Any


class CacheState(NamedTuple):
    """History of computed outputs (paper, Section 3.3), a pytree.

    outputs: the model-output pytree with a leading axis of size ``order`` on every
        leaf, newest first (entry 0 is the latest computed output); dtype of the model.
    times: (order,) the real step times of those outputs (the abscissa of the plan).
    valid: (order,) bool, the filled prefix of the buffer.
    consecutive: () int32, predicted steps since the last computed one.
    """

    outputs: PyTree
    times: jax.Array
    valid: jax.Array
    consecutive: jax.Array


def _time_dtype() -> Any:
    # float64 under jax_enable_x64, float32 otherwise.
    return jnp.asarray(0.0).dtype


def _accumulation_dtype(dtype: Any) -> Any:
    """bf16/f16 leaves accumulate in float32; float32/float64 in their own precision."""
    return jnp.promote_types(dtype, jnp.float32)


def init_state(output_like: PyTree, order: int) -> CacheState:
    """An empty history for model outputs shaped like `output_like` (arrays or ShapeDtypeStructs)."""
    if isinstance(order, bool) or not isinstance(order, int) or order < 1:
        raise ValueError(f"order must be an integer >= 1, got {order!r}")
    outputs = jax.tree.map(lambda leaf: jnp.zeros((order, *leaf.shape), leaf.dtype), output_like)
    return CacheState(
        outputs=outputs,
        times=jnp.zeros((order,), _time_dtype()),
        valid=jnp.zeros((order,), bool),
        consecutive=jnp.zeros((), jnp.int32),
    )


def push(state: CacheState, output: PyTree, time: Any) -> CacheState:
    """Record a computed output at `time`: it becomes entry 0, the oldest entry drops out."""

    def shift(buffer: jax.Array, new: Any) -> jax.Array:
        return jnp.concatenate([jnp.asarray(new, buffer.dtype)[None], buffer[:-1]], axis=0)

    return CacheState(
        outputs=jax.tree.map(shift, state.outputs, output),
        times=shift(state.times, time),
        valid=shift(state.valid, True),
        consecutive=jnp.zeros_like(state.consecutive),
    )


def mark_predicted(state: CacheState) -> CacheState:
    """The state after a predicted step: the history is unchanged (predictions never enter it)."""
    return state._replace(consecutive=state.consecutive + 1)


def weighted_sum(outputs: PyTree, weights: Any) -> PyTree:
    """sum_j weights[j] * outputs[j] over the leading axis, leaf by leaf, in accumulation precision.

    bf16/f16 leaves accumulate (and are returned) in float32, others in their own
    precision; terms are added newest first, in the order abcore's numpy reference adds them.
    """
    weights = jnp.asarray(weights)

    def combine(buffer: jax.Array) -> jax.Array:
        acc = _accumulation_dtype(buffer.dtype)
        w = weights.astype(acc)
        total = w[0] * buffer[0].astype(acc)
        for j in range(1, buffer.shape[0]):
            total = total + w[j] * buffer[j].astype(acc)
        return total

    return jax.tree.map(combine, outputs)


def extrapolate(state: CacheState, weights: Any) -> PyTree:
    """The prediction sum_j weights[j] * H_j over the history H (newest first), in the outputs' dtypes.

    With abcore's Lagrange weights (`abcore.make_plan` rows or `abcore.history_weights`)
    this is the order-k extrapolation of Eq. 3.6, error O(h^k). The sum accumulates in
    float32 for bf16/f16 outputs and is cast back.
    """
    return jax.tree.map(
        lambda total, buffer: total.astype(buffer.dtype), weighted_sum(state.outputs, weights), state.outputs
    )


def sum_of_squares(tree: PyTree) -> jax.Array:
    """sum over all leaves and elements of x^2, in at least float32 (all-reduced when sharded)."""
    sums = [jnp.sum(jnp.square(leaf.astype(_accumulation_dtype(leaf.dtype)))) for leaf in jax.tree.leaves(tree)]
    return jnp.sum(jnp.stack(sums))


def all_finite(tree: PyTree) -> jax.Array:
    """True when every element of every leaf is finite."""
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(leaf)) for leaf in jax.tree.leaves(tree)]))
