"""The step rule: one array function that every executor runs (numpy here, `jax.numpy` in a scan).

A cache context carries a `RuleState`: the abscissae of its last ``order`` computed outputs H_0..H_{k-1}
(newest first) and of the steps predicted since the last computed one. At each step, with `node` the
step's abscissa (its time, or its index for ``abscissa="index"``):

- `decide` says whether the step must compute and gives the prediction weights w (Eq. 3.5:
  f^ = sum_j w_j H_j, the Lagrange extrapolation through the stored outputs, error O(h^k)) and the
  embedded error weights e (sum_j e_j H_j = p_k - p_{k-1}, the adaptive test);
- after a predicted step, `after_predicted` appends the step to the pending list;
- at a computed step n with output f_n, `correction_weights` gives c over N = [f_n, H_0, ..., H_{k-1}]
  such that the output the sampler uses is f_n + sum_l c_l N_l, and `after_computed` stores f_n.

The correction (``config.correct``). For a step x_{j+1} = a_j x_j + b_j out_j, the predicted steps
m < j < n used f^_j; with f_n known, f~_j interpolates the outputs through f_n and H (degree k, error
O(h^{k+1})). The state at step n is then off by C = sum_j (prod_{l=j+1}^{n-1} a_l) b_j (f~_j - f^_j), and
out_n = f_n + a_n C / b_n makes the sampler's own step n apply it. Both f~_j and f^_j are fixed linear
combinations of N, so c is: c = (a_n / b_n) sum_j s_j (w~_j - [0, w^_j]), s_j = b_j prod_{l>j} a_l.

Pure arithmetic on fixed shapes in the namespace `xp`: the state fits a `lax.scan` carry.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from abcore._config import ABConfig
from abcore._weights import barycentric_weights


def history_weights(
    history_times: Any, valid: Any, target: Any, order: int, weighting: str = "plain", xp: Any = np
) -> tuple[Any, Any]:
    """Prediction weights and embedded-error weights over a history buffer.

    history_times: shape (order,), newest first; ``valid`` marks the filled entries
    (a prefix). Returns (w, e): w are the order-m Lagrange weights (m = number of valid
    entries) at `target`; e = w - w', with w' the order-(m-1) weights through the m-1
    newest entries, so sum_j e_j H_j = p_m(target) - p_{m-1}(target), the embedded
    error estimate of the adaptive mode (zero when m < 2). With weighting "exp-eps"
    (Eq. 3.6: e^{-lambda} eps is extrapolated) both are multiplied by
    e^{target - t_j}; with "exp-x0" by e^{t_j - target}.
    """
    t = xp.asarray(history_times)
    valid = xp.asarray(valid, dtype=bool)
    w = barycentric_weights(t, valid, target, xp)
    index = xp.arange(order)
    count = xp.sum(valid.astype(index.dtype))
    lower_valid = valid & (index < count - 1)
    w_lower = barycentric_weights(t, lower_valid, target, xp)
    e = xp.where(count >= 2, w - w_lower, xp.zeros_like(w))
    if weighting != "plain":
        sign = 1.0 if weighting == "exp-eps" else -1.0
        scale = xp.where(valid, xp.exp(sign * (target - xp.where(valid, t, target))), xp.zeros_like(t))
        w = w * scale
        e = e * scale
    return w, e


class RuleState(NamedTuple):
    """What the step rule remembers about one context (fixed shapes; a pytree under JAX).

    nodes, valid: (order,) abscissae of the stored outputs, newest first, and the filled prefix.
    consecutive: () predicted steps since the last computed one.
    pending_nodes, pending_scale, pending_valid: (P,) the steps predicted since the last computed
    one, oldest first: their abscissae and s_j = b_j prod_{l>j} a_l (P = `ABConfig.max_run`).
    """

    nodes: Any
    valid: Any
    consecutive: Any
    pending_nodes: Any
    pending_scale: Any
    pending_valid: Any


class Decision(NamedTuple):
    """`decide`'s answer: `compute` (the step must call the model), then w and e over H (newest first)."""

    compute: Any
    weights: Any
    error_weights: Any


def init_state(config: ABConfig, max_run: int, xp: Any = np, dtype: Any = None) -> RuleState:
    """An empty state for `config`, with room for `max_run` pending predicted steps."""
    dtype = xp.float64 if dtype is None else dtype
    order = config.order
    return RuleState(
        nodes=xp.zeros((order,), dtype=dtype),
        valid=xp.zeros((order,), dtype=bool),
        consecutive=xp.zeros((), dtype=xp.int32),
        pending_nodes=xp.zeros((max_run,), dtype=dtype),
        pending_scale=xp.zeros((max_run,), dtype=dtype),
        pending_valid=xp.zeros((max_run,), dtype=bool),
    )


def node_of(config: ABConfig, step: Any, time: Any) -> Any:
    """The abscissa the rule extrapolates on: the step's time, or its index for ``abscissa="index"``."""
    return step if config.abscissa == "index" else time


def _count(valid: Any, xp: Any) -> Any:
    return xp.sum(valid.astype(xp.int32))


def _predictor_nodes(config: ABConfig, state: RuleState, node: Any, xp: Any) -> tuple[Any, Any]:
    if config.predictor == "binomial":  # Eq. 3.6: the stored outputs as if at consecutive steps
        return -(xp.arange(config.order, dtype=state.nodes.dtype) + 1.0), xp.zeros((), dtype=state.nodes.dtype)
    return state.nodes, node


def decide(config: ABConfig, state: RuleState, node: Any, forced: Any, xp: Any = np) -> Decision:
    """Whether the step at abscissa `node` must compute, and its prediction / error weights.

    `forced`: the schedule's answer (`ABConfig.forced_compute`: warm-up, cool-down, mask, and in
    fixed mode the interval). A step also computes when nothing is stored, and in adaptive mode
    when fewer than 2 outputs are stored or ``max_run`` steps in a row were predicted.
    """
    count = _count(state.valid, xp)
    must = xp.asarray(forced) | (count == 0)
    if config.adaptive:
        must = must | (count < 2) | (state.consecutive >= config.predicted_limit)
    nodes, target = _predictor_nodes(config, state, node, xp)
    w, e = history_weights(nodes, state.valid, target, config.order, config.weighting, xp)
    return Decision(must, w, e)


def correction_weights(config: ABConfig, state: RuleState, node: Any, a: Any, b: Any, xp: Any = np) -> Any:
    """c, shape (order + 1,), over [f_n, H_0, ..., H_{k-1}]: the output of computed step n is f_n + sum c_l N_l.

    a, b: the coefficients of step n (x_{n+1} = a x_n + b out_n). Zero when nothing was predicted
    since the last computed step. See the module docstring for the formula.
    """
    order = config.order
    ext_nodes = xp.concatenate([xp.reshape(xp.asarray(node, dtype=state.nodes.dtype), (1,)), state.nodes])
    ext_valid = xp.concatenate([xp.ones((1,), dtype=bool), state.valid])
    total = xp.zeros((order + 1,), dtype=state.nodes.dtype)
    for p in range(state.pending_nodes.shape[0]):
        target = state.pending_nodes[p]
        w_tilde, _ = history_weights(ext_nodes, ext_valid, target, order + 1, config.weighting, xp)
        w_hat, _ = history_weights(state.nodes, state.valid, target, order, config.weighting, xp)
        diff = w_tilde - xp.concatenate([xp.zeros((1,), dtype=w_hat.dtype), w_hat])
        total = total + xp.where(state.pending_valid[p], state.pending_scale[p], 0.0) * diff
    return total * (a / b)


def after_predicted(state: RuleState, node: Any, a: Any, b: Any, xp: Any = np) -> RuleState:
    """The state after a predicted step at `node` with coefficients (a, b): it joins the pending steps."""
    slot = xp.arange(state.pending_nodes.shape[0]) == _count(state.pending_valid, xp)
    scale = xp.where(state.pending_valid, state.pending_scale * a, state.pending_scale)
    return state._replace(
        consecutive=state.consecutive + 1,
        pending_nodes=xp.where(slot, xp.asarray(node, dtype=state.nodes.dtype), state.pending_nodes),
        pending_scale=xp.where(slot, xp.asarray(b, dtype=state.nodes.dtype), scale),
        pending_valid=state.pending_valid | slot,
    )


def after_computed(state: RuleState, node: Any, xp: Any = np) -> RuleState:
    """The state after a computed step at `node`: its output becomes H_0, the pending list empties."""
    new = xp.reshape(xp.asarray(node, dtype=state.nodes.dtype), (1,))
    return RuleState(
        nodes=xp.concatenate([new, state.nodes[:-1]]),
        valid=xp.concatenate([xp.ones((1,), dtype=bool), state.valid[:-1]]),
        consecutive=xp.zeros_like(state.consecutive),
        pending_nodes=xp.zeros_like(state.pending_nodes),
        pending_scale=xp.zeros_like(state.pending_scale),
        pending_valid=xp.zeros_like(state.pending_valid),
    )


def accept_prediction(delta_sq_sum: Any, pred_sq_sum: Any, tolerance: float, xp: Any = np) -> Any:
    """Adaptive test: sqrt(sum delta^2) <= tolerance * sqrt(sum pred^2), jointly over contexts.

    delta = p_k - p_{k-1} (from the error weights), pred = p_k. Given one sum per context (arrays),
    the step is predicted only when every context passes: the largest relative estimate decides for
    all, so cond and uncond keep the same calls. Sums may be partial sums all-reduced across ranks.
    """
    ok = xp.sqrt(xp.asarray(delta_sq_sum)) <= tolerance * xp.sqrt(xp.asarray(pred_sq_sum))
    return xp.all(ok)
