"""The step rule: one transition per step that every executor runs (numpy here, `jax.numpy` in a scan).

`schedule(config, times, steps)` computes once per grid what does not depend on the data: each step's
abscissa (its time, or its index for ``abscissa="index"``), whether the schedule forces it to compute, and
its step coefficients. A cache context carries a `RuleState` (`begin`): the abscissae of its last ``order``
computed outputs H_0..H_{k-1} (newest first) and of the steps predicted since the last computed one.
At step i an executor calls

- `decide(schedule, state, i)`: whether the step must compute, the prediction weights w (Eq. 3.5:
  f^ = sum_j w_j H_j, the Lagrange extrapolation through the stored outputs, error O(h^k)), the
  embedded error weights e (sum_j e_j H_j = p_k - p_{k-1}, the adaptive test, `joint`) and the
  correction weights c over N = [f_n, H_0, ..., H_{k-1}] (a computed step uses f_n + sum_l c_l N_l);
- `complete(schedule, state, i, computed)`: the state after the step (a computed output becomes H_0;
  a predicted step joins the pending list the correction reads).

The correction (``config.correct``). For a step x_{j+1} = a_j x_j + b_j out_j, the predicted steps
m < j < n used f^_j; with f_n known, f~_j interpolates the outputs through f_n and H (degree k, error
O(h^{k+1})). The state at step n is then off by C = sum_j (prod_{l=j+1}^{n-1} a_l) b_j (f~_j - f^_j), and
out_n = f_n + a_n C / b_n makes the sampler's own step n apply it. Both f~_j and f^_j are fixed linear
combinations of N, so c is: c = (a_n / b_n) sum_j s_j (w~_j - [0, w^_j]), s_j = b_j prod_{l>j} a_l.

Pure arithmetic on fixed shapes in the namespace `xp`: the state fits a `lax.scan` carry.
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass
from typing import Any, NamedTuple, cast

import numpy as np

from abcore._config import INTERVAL, WARMUP, ABConfig, longest_run
from abcore._steps import LinearSteps
from abcore._validate import as_times, check_order
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
    """`decide`'s answer at one step.

    compute: the step must call the model. weights (w) and error_weights (e): over H (newest first), the
    prediction and the embedded error estimate. correction (c): over [f_n, H_0, ...], the output of the
    step if it computes is f_n + sum_l c_l N_l (zeros without the correction or without pending steps).
    """

    compute: Any
    weights: Any
    error_weights: Any
    correction: Any


@dataclass(frozen=True, eq=False)
class Schedule:
    """What the rule needs to know about a run before it starts, computed once per grid (`schedule`).

    config: the settings (with warm-up and cool-down shrunk to the run when made with ``fit=True``).
    num_steps: n, or None when the run's length is unknown (no cool-down, no mask).
    times: (n,) the call times, or None when each step's time is given as it comes.
    forced: (n,) bool, steps the schedule computes whatever the data (warm-up, cool-down, mask, and in
        fixed mode the interval); None when n is unknown.
    a, b: (n,) the sampler's step x_{j+1} = a_j x_j + b_j out_j (`LinearSteps`), or None.
    correct: whether computed steps correct the predicted ones (`ABConfig.corrects`).
    error: the adaptive test, "state" or "output" (`ABConfig.error`); None in fixed mode.
    sensitivity: (n,) s_j = b_j prod_{l>j} a_l, how much the final sample moves per unit of step j's
        output (None without steps).
    learned, learned_correction: (n, order) fitted prediction weights (`abcore.fit_weights`) and the
        (n, order + 1) correction weights that go with them, or None for the Lagrange rule.
    """

    config: ABConfig
    num_steps: int | None
    times: np.ndarray | None
    forced: np.ndarray | None
    a: np.ndarray | None
    b: np.ndarray | None
    correct: bool
    error: str | None = None
    sensitivity: np.ndarray | None = None
    learned: np.ndarray | None = None
    learned_correction: np.ndarray | None = None

    @property
    def max_run(self) -> int:
        """The most consecutive predicted steps (the length of the rule's pending list)."""
        if self.forced is not None and not self.config.adaptive:
            return longest_run(self.forced)
        return self.config.max_run

    def node(self, i: Any, time: Any = None, xp: Any = np) -> Any:
        """The abscissa of step i: i itself for ``abscissa="index"``, else its time (given, or from `times`)."""
        if self.config.abscissa == "index":
            return float(i) if xp is np else i * 1.0
        if time is not None:
            return time
        if self.times is None:
            raise ValueError("time is required at each step when the schedule has no times")
        return xp.asarray(self.times)[i]

    def forced_at(self, i: Any, xp: Any = np) -> Any:
        """Whether the schedule forces step i to compute."""
        if self.forced is not None:
            return xp.asarray(self.forced)[i]
        return self.config.forced_compute(int(i), None)

    def coefficients(self, i: Any, xp: Any = np) -> tuple[Any, Any]:
        """(a_i, b_i) of the sampler's step, (1, 1) without steps."""
        if self.a is None or self.b is None:
            return 1.0, 1.0
        return xp.asarray(self.a)[i], xp.asarray(self.b)[i]


def schedule(
    config: ABConfig,
    times: Any = None,
    steps: LinearSteps | None = None,
    *,
    num_steps: int | None = None,
    fit: bool = False,
    weights: Any = None,
) -> Schedule:
    """The `Schedule` of `config` on a run of n steps: the call times (n values), or only `num_steps`.

    `steps`: the sampler's `LinearSteps` (n entries), which enables the correction (``config.correct``).
    `fit`: shrink warm-up and cool-down to a run shorter than them (``force=True`` on a short run), and a
    budget's into its calls, instead of raising. `weights`: (n, order) learned prediction weights from `abcore.fit_weights` on this schedule
    (opt-in; fixed schedules with weighting "plain"), used instead of the Lagrange weights, the correction on
    top. Raises ValueError, naming the parameter, when the sizes disagree or the schedule does not fit the
    run, and when ``correct=True`` has no steps.
    """
    if not isinstance(config, ABConfig):
        raise TypeError(f"config must be an abcore.ABConfig, got {type(config).__name__}")
    if steps is not None and not isinstance(steps, LinearSteps):
        raise TypeError(f"steps must be an abcore.LinearSteps or None, got {type(steps).__name__}")
    if not isinstance(fit, bool):
        raise ValueError(f"fit must be a bool, got {fit!r}")
    t = None if times is None else as_times(times, "times")
    if num_steps is not None:
        check_order(num_steps, "num_steps")
    sizes = {"times": None if t is None else t.size, "steps": None if steps is None else steps.num_steps}
    sizes["num_steps"] = num_steps
    known = {name: size for name, size in sizes.items() if size is not None}
    if len(set(known.values())) > 1:
        raise ValueError(f"the number of steps disagrees: {known}")
    n = next(iter(known.values()), None)
    if n is not None and fit and config.compute_mask is None:
        config = _fitted(config, n)
    if n is None and (config.cooldown or config.compute_mask is not None):
        what = f"cooldown={config.cooldown}" if config.cooldown else "compute_mask"
        raise ValueError(f"{what} needs the number of steps: give the times, the steps or num_steps")
    if n is None and config.budgeted:
        config = _without_budget(config)
    sensitivity = None if steps is None else sensitivities(steps)
    forced = None if n is None else config.forced_mask(n, sensitivity)
    correct = config.corrects(steps is not None)
    a = None if steps is None else steps.a
    b = None if steps is None else steps.b
    error = None
    if config.adaptive:
        error = config.error or ("state" if steps is not None else "output")
        if error == "state" and steps is None:
            raise ValueError(
                "error='state' scales the estimate by the sampler's sensitivity and needs steps=abcore.LinearSteps(...);"
                " pass error='output' for the output's relative change"
            )
    for array in (t, forced, sensitivity):
        if array is not None:
            array.flags.writeable = False
    sched = Schedule(config, n, t, forced, a, b, correct, error, sensitivity)
    return sched if weights is None else _with_weights(sched, weights)


def _fitted(config: ABConfig, n: int) -> ABConfig:
    """``fit=True``: a given warm-up and cool-down shrunk to the run, and a budget's into its calls (the
    warm-up first: at least one call, then the tail; an automatic warm-up yields to a given tail)."""
    limit = config.budget(n) if config.budgeted else n
    warmup = None if config.warmup is None else min(config.warmup, limit)
    cooldown = config.cooldown
    if cooldown is not None:
        cooldown = min(cooldown, limit - max(1, warmup or 0) if config.budgeted else n)
    return dataclasses.replace(config, warmup=warmup, cooldown=cooldown)


def _with_weights(sched: Schedule, weights: Any) -> Schedule:
    config = sched.config
    if config.adaptive or sched.forced is None or config.weighting != "plain" or config.predictor != "lagrange":
        raise ValueError(
            "weights need a fixed schedule on a known number of steps with weighting='plain' and "
            f"predictor='lagrange', got {config!r}"
        )
    w = np.array(weights, dtype=np.float64)
    if w.shape != (sched.num_steps, config.order) or not np.all(np.isfinite(w)):
        raise ValueError(
            f"weights must be finite, of shape (n, order) = {(sched.num_steps, config.order)}, got {w.shape}"
        )
    n, forced = cast(int, sched.num_steps), cast(np.ndarray, sched.forced)
    table = np.zeros((n, config.order + 1))
    if sched.correct:  # fold the rule over the fixed mask; each computed step corrects with the weights used
        state = begin(sched)
        pending: list[int] = []
        for i, computed in enumerate(forced):
            if computed and pending:
                used = np.zeros((state.pending_nodes.shape[0], config.order))
                used[: len(pending)] = w[pending]
                table[i] = correction_weights(config, state, sched.node(i), *sched.coefficients(i), used=used)
            pending = [] if computed else [*pending, i]
            state = complete(sched, state, i, bool(computed))
    w.flags.writeable = table.flags.writeable = False
    return dataclasses.replace(sched, learned=w, learned_correction=table)


def _without_budget(config: ABConfig) -> ABConfig:
    """The default budget on a run of unknown length: the interval rule (5, warm-up 2), without the tail."""
    if config.calls is not None or config.speedup is not None:
        what = f"calls={config.calls}" if config.calls is not None else f"speedup={config.speedup}"
        raise ValueError(f"{what} needs the number of steps: give the times, the steps or num_steps")
    if config.cooldown:
        raise ValueError(
            f"cooldown={config.cooldown} needs the number of steps: give the times, the steps or num_steps"
        )
    if config.cooldown is None:
        warnings.warn(
            "the default call budget needs the number of steps: without it one step in 5 computes after a "
            "warm-up of 2 and the last steps are not forced to compute (give the times, the steps or num_steps)",
            UserWarning,
            stacklevel=3,
        )
    return dataclasses.replace(
        config, interval=INTERVAL, warmup=WARMUP if config.warmup is None else config.warmup, cooldown=0
    )


def sensitivities(steps: LinearSteps) -> np.ndarray:
    """s_j = b_j prod_{l=j+1}^{n-1} a_l: the final state's change per unit change of step j's output."""
    tail = np.append(np.cumprod(steps.a[::-1])[::-1][1:], 1.0)
    return steps.b * tail


def begin(schedule: Schedule | ABConfig, xp: Any = np, dtype: Any = None) -> RuleState:
    """The state of a context before its first step (room for ``config.max_run`` pending steps).

    Only the config matters: a `Schedule` or its `ABConfig`. `dtype`: of the abscissae (default float64).
    """
    config = schedule.config if isinstance(schedule, Schedule) else schedule
    return init_state(config, schedule.max_run, xp, dtype)


def decide(schedule: Schedule, state: RuleState, i: Any, time: Any = None, xp: Any = np) -> Decision:
    """The rule at step i: compute or predict, and the weights (see `Decision`).

    A step computes when the schedule forces it, when nothing is stored, and in adaptive mode when fewer
    than 2 outputs are stored or ``max_run`` steps in a row were predicted. `time`: the step's time where
    the schedule has none. `i` may be traced under JAX (with the schedule's times known).
    """
    config = schedule.config
    node = schedule.node(i, time, xp)
    count = _count(state.valid, xp)
    must = xp.asarray(schedule.forced_at(i, xp)) | (count == 0)
    if config.adaptive:
        must = must | (count < 2) | (state.consecutive >= config.predicted_limit)
    nodes, target = _predictor_nodes(config, state, node, xp)
    w, e = history_weights(nodes, state.valid, target, config.order, config.weighting, xp)
    if schedule.error == "state":
        e = e * xp.abs(xp.asarray(cast(np.ndarray, schedule.sensitivity))[i])
    if schedule.learned is not None:  # opt-in fitted weights, and the correction that goes with them
        return Decision(must, xp.asarray(schedule.learned)[i], e, xp.asarray(schedule.learned_correction)[i])
    if schedule.correct and (xp is not np or bool(np.any(state.pending_valid))):
        c = correction_weights(config, state, node, *schedule.coefficients(i, xp), xp)
    else:
        c = xp.zeros((config.order + 1,), dtype=state.nodes.dtype)
    return Decision(must, w, e, c)


def complete(schedule: Schedule, state: RuleState, i: Any, computed: Any, time: Any = None, xp: Any = np) -> RuleState:
    """The state after step i: `computed` stores its output as H_0, else the step joins the pending ones.

    Under JAX `computed` may be traced: both states are formed and selected.
    """
    node = schedule.node(i, time, xp)
    if xp is np:
        if computed:
            return after_computed(state, node, xp)
        return after_predicted(state, node, *schedule.coefficients(i, xp), xp)
    done = after_computed(state, node, xp)
    pending = after_predicted(state, node, *schedule.coefficients(i, xp), xp)
    return RuleState(*(xp.where(computed, x, y) for x, y in zip(done, pending, strict=True)))


def joint(delta_sq_sum: Any, pred_sq_sum: Any, tolerance: float, xp: Any = np) -> Any:
    """The adaptive decision of a group of contexts at one step: True to predict in all of them.

    sqrt(sum delta^2) <= tolerance * sqrt(sum pred^2) in every context, delta = p_k - p_{k-1} (the error
    weights) and pred = p_k; given one sum per context (arrays), the largest relative estimate decides for
    all, so cond and uncond keep the same calls. Sums may be partial sums all-reduced across ranks.
    """
    ok = xp.sqrt(xp.asarray(delta_sq_sum)) <= tolerance * xp.sqrt(xp.asarray(pred_sq_sum))
    return xp.all(ok)


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


def _count(valid: Any, xp: Any) -> Any:
    return xp.sum(valid.astype(xp.int32))


def _predictor_nodes(config: ABConfig, state: RuleState, node: Any, xp: Any) -> tuple[Any, Any]:
    if config.predictor == "binomial":  # Eq. 3.6: the stored outputs as if at consecutive steps
        return -(xp.arange(config.order, dtype=state.nodes.dtype) + 1.0), xp.zeros((), dtype=state.nodes.dtype)
    return state.nodes, node


def correction_weights(
    config: ABConfig, state: RuleState, node: Any, a: Any, b: Any, xp: Any = np, used: Any = None
) -> Any:
    """c, shape (order + 1,), over [f_n, H_0, ..., H_{k-1}]: the output of computed step n is f_n + sum c_l N_l.

    a, b: the coefficients of step n (x_{n+1} = a x_n + b out_n). Zero when nothing was predicted
    since the last computed step. See the module docstring for the formula. `used`: (P, order) the
    prediction weights w^_j the pending steps used (default: the Lagrange ones; learned weights).
    """
    order = config.order
    ext_nodes = xp.concatenate([xp.reshape(xp.asarray(node, dtype=state.nodes.dtype), (1,)), state.nodes])
    ext_valid = xp.concatenate([xp.ones((1,), dtype=bool), state.valid])
    total = xp.zeros((order + 1,), dtype=state.nodes.dtype)
    for p in range(state.pending_nodes.shape[0]):
        target = state.pending_nodes[p]
        w_tilde, _ = history_weights(ext_nodes, ext_valid, target, order + 1, config.weighting, xp)
        if used is None:
            w_hat, _ = history_weights(state.nodes, state.valid, target, order, config.weighting, xp)
        else:
            w_hat = xp.asarray(used[p], dtype=state.nodes.dtype)
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
