"""`History`: the fixed-shape record of computed outputs that a cached sampler carries in its scan.

It holds the last ``order`` *computed* (raw) model outputs H_0..H_{k-1}, newest first on the
leading axis of every leaf, next to abcore's `RuleState` (their abscissae, the filled prefix and
the steps predicted since). Shapes and dtypes never change, so it lives in a `lax.scan` carry and
passes through both branches of a `lax.cond`. Nothing here derives weights: abcore's rule does.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import abcore
import jax
import jax.numpy as jnp

PyTree = Any


class History(NamedTuple):
    """Computed outputs and the step rule's state, a pytree.

    outputs: the model-output pytree with a leading axis of size ``order`` on every leaf,
        newest first (entry 0 is the latest computed output), in the model's dtypes.
    rule: the `abcore.RuleState` of the same steps (nodes, valid, pending predicted steps).
    """

    outputs: PyTree
    rule: abcore.RuleState


def time_dtype() -> Any:
    """float64 under jax_enable_x64, float32 otherwise."""
    return jnp.asarray(0.0).dtype


def accumulation_dtype(dtype: Any) -> Any:
    """bf16/f16 leaves accumulate in float32; float32/float64 in their own precision."""
    return jnp.promote_types(dtype, jnp.float32)


def init_history(output_like: PyTree, config: abcore.ABConfig | abcore.Schedule) -> History:
    """An empty history for outputs shaped like `output_like` (arrays or ShapeDtypeStructs).

    The rule state has room for the schedule's (or ``config.max_run``) pending predicted steps.
    """
    if not isinstance(config, (abcore.ABConfig, abcore.Schedule)):
        raise TypeError(f"config must be an abcore.ABConfig or abcore.Schedule, got {type(config).__name__}")
    ab = config.config if isinstance(config, abcore.Schedule) else config
    outputs = jax.tree.map(lambda leaf: jnp.zeros((ab.order, *leaf.shape), leaf.dtype), output_like)
    return History(outputs, abcore.begin(config, xp=jnp, dtype=time_dtype()))


def push(outputs: PyTree, output: PyTree) -> PyTree:
    """The output buffer with a computed `output` as H_0 and the oldest dropped (the rule state is advanced
    separately, by `abcore.complete`)."""

    def shift(buffer: jax.Array, new: jax.Array) -> jax.Array:
        return jnp.concatenate([jnp.asarray(new, buffer.dtype)[None], buffer[:-1]], axis=0)

    return jax.tree.map(shift, outputs, output)


def weighted_sum(outputs: PyTree, weights: Any) -> PyTree:
    """sum_j weights[j] * outputs[j] over the leading axis, leaf by leaf, in accumulation precision.

    bf16/f16 leaves accumulate (and are returned) in float32, others in their own precision;
    terms are added newest first, as abcore's numpy reference adds them. With the rule's
    weights w this is the prediction f^ = sum_j w_j H_j (Eq. 3.5, error O(h^k)).
    """
    weights = jnp.asarray(weights)

    def combine(buffer: jax.Array) -> jax.Array:
        acc = accumulation_dtype(buffer.dtype)
        w = weights.astype(acc)
        total = w[0] * buffer[0].astype(acc)
        for j in range(1, buffer.shape[0]):
            total = total + w[j] * buffer[j].astype(acc)
        return total

    return jax.tree.map(combine, outputs)


def sum_of_squares(tree: PyTree) -> jax.Array:
    """sum over all leaves and elements of x^2, in at least float32 (all-reduced when sharded)."""
    sums = [jnp.sum(jnp.square(leaf.astype(accumulation_dtype(leaf.dtype)))) for leaf in jax.tree.leaves(tree)]
    return jnp.sum(jnp.stack(sums))


def all_finite(tree: PyTree) -> jax.Array:
    """True when every element of every leaf is finite."""
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(leaf)) for leaf in jax.tree.leaves(tree)]))


def same_layout(tree: PyTree, like: PyTree) -> bool:
    """Whether `tree` has the structure, leaf shapes and dtypes of `like` (arrays or ShapeDtypeStructs)."""
    if jax.tree.structure(tree) != jax.tree.structure(like):  # type: ignore[operator]
        return False
    pairs = zip(jax.tree.leaves(tree), jax.tree.leaves(like), strict=True)
    return all((a.shape, a.dtype) == (b.shape, b.dtype) for a, b in pairs)
