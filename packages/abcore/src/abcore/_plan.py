"""Cache plans: which steps compute, and how each predicted step combines the history.

The history is the last ``order`` *computed* outputs, newest first. A predicted step
at time t returns sum_j w_j H_j, with w the Lagrange extrapolation weights through the
history's real times evaluated at t (`barycentric_weights`), optionally rescaled by the
exponential weighting of Eq. 3.6. Predictions are never fed back into the history:
extrapolating from predicted outputs diverges at intervals >= 3.

Two ways to build a plan, with identical decisions:
- `make_plan(config, times)` when the grid is known (arrays an adapter can execute);
- `PlannerState` + `plan_step` + `record`, one step at a time, for loops that do not
  announce their grid. `make_plan` is that fold.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from abcore._config import ABConfig
from abcore._validate import as_times
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
    e^{target - t_j}; with "exp-x0" by e^{t_j - target}. Pure arithmetic in the array
    namespace `xp`: runs under `jax.jit`.
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


@dataclass(frozen=True)
class StepDecision:
    """What one step does.

    compute: the schedule (or warm-up, cool-down, mask) requires a model call.
    weights, error_weights: shape (order,), applied to the history newest first;
    meaningful when not `compute` (all zero otherwise). In adaptive mode a predicted
    step still computes when the embedded error estimate exceeds the tolerance
    (`accept_prediction`).
    sources: step indices of the history entries, newest first.
    """

    index: int
    time: float
    compute: bool
    weights: np.ndarray
    error_weights: np.ndarray
    sources: tuple[int, ...]


@dataclass(frozen=True)
class PlannerState:
    """Immutable step-by-step planning state of one generation."""

    step: int = 0
    history_times: tuple[float, ...] = ()
    history_steps: tuple[int, ...] = ()
    consecutive_predicted: int = 0
    last_time: float | None = None
    direction: float = 0.0

    def is_new_generation(self, time: float) -> bool:
        """True when `time` cannot continue this generation (it does not move along the grid)."""
        if self.last_time is None:
            return False
        delta = float(time) - self.last_time
        return delta == 0.0 or delta * self.direction < 0.0


def plan_step(config: ABConfig, state: PlannerState, time: float, num_steps: int | None = None) -> StepDecision:
    """Decide step `state.step` at `time`. Raises ValueError for a time that breaks the grid."""
    time = float(time)
    if not np.isfinite(time):
        raise ValueError(f"time must be finite, got {time!r}")
    if state.is_new_generation(time):
        raise ValueError(
            f"time {time!r} does not continue the grid (last time {state.last_time!r}); "
            "times must be strictly monotonic within one generation: start a new PlannerState"
        )
    if num_steps is not None and state.step >= num_steps:
        raise ValueError(f"step {state.step} is past the announced num_steps={num_steps}")
    order = config.order
    zeros = np.zeros(order)
    compute = (
        config.forced_compute(state.step, num_steps)
        or not state.history_times
        or (config.adaptive and len(state.history_times) < 2)
        or (config.adaptive and state.consecutive_predicted >= config.predicted_limit)
    )
    if compute:
        return StepDecision(state.step, time, True, zeros, zeros.copy(), state.history_steps)
    m = len(state.history_times)
    nodes, target = _nodes(config, state, time)
    padded = np.zeros(order)
    padded[:m] = nodes
    valid = np.arange(order) < m
    if m < order:
        padded[m:] = padded[m - 1]  # harmless filler, masked out
    w, e = history_weights(padded, valid, target, order, config.weighting)
    return StepDecision(state.step, time, False, np.asarray(w), np.asarray(e), state.history_steps)


def _nodes(config: ABConfig, state: PlannerState, time: float) -> tuple[tuple[float, ...], float]:
    """Extrapolation nodes (newest first) and target for `config.spacing`."""
    if config.spacing == "index":
        return tuple(float(s) for s in state.history_steps), float(state.step)
    if config.spacing == "binomial":
        return tuple(-float(i) for i in range(1, len(state.history_steps) + 1)), 0.0
    return state.history_times, time


def record(config: ABConfig, state: PlannerState, decision: StepDecision, computed: bool) -> PlannerState:
    """The state after `decision`'s step; `computed` says whether the model actually ran."""
    direction = state.direction
    if state.last_time is not None and direction == 0.0:
        direction = float(np.sign(decision.time - state.last_time))
    if computed:
        times = ((decision.time,) + state.history_times)[: config.order]
        steps = ((decision.index,) + state.history_steps)[: config.order]
        consecutive = 0
    else:
        times, steps, consecutive = state.history_times, state.history_steps, state.consecutive_predicted + 1
    return PlannerState(state.step + 1, times, steps, consecutive, decision.time, direction)


def accept_prediction(delta_sq_sum: Any, pred_sq_sum: Any, tolerance: float, xp: Any = np) -> Any:
    """Adaptive test: sqrt(sum delta^2) <= tolerance * sqrt(sum pred^2).

    delta = p_k - p_{k-1} (from `error_weights`), pred = p_k. The sums may be partial
    sums reduced across ranks before the test. Arithmetic only: works under `jax.jit`.
    """
    return xp.sqrt(delta_sq_sum) <= tolerance * xp.sqrt(pred_sq_sum)


@dataclass(frozen=True)
class CachePlan:
    """A fixed plan over a known grid, as arrays an adapter executes.

    times: (n,) step times. compute: (n,) bool. weights: (n, order), row i applied to
    the history (newest first) at a predicted step i; zero rows at computed steps.
    sources: (n, order) int, the step index behind each history entry (-1 where empty).
    """

    config: ABConfig
    times: np.ndarray
    compute: np.ndarray
    weights: np.ndarray
    sources: np.ndarray = field(repr=False)

    @property
    def num_steps(self) -> int:
        return int(self.times.size)

    @property
    def num_computed(self) -> int:
        return int(self.compute.sum())

    @property
    def num_predicted(self) -> int:
        return self.num_steps - self.num_computed


def make_plan(config: ABConfig, times: Any) -> CachePlan:
    """The fixed-schedule plan of `config` on the step times `times` (one per model call).

    Raises ValueError in adaptive mode, whose decisions depend on the outputs: run it
    step by step (`plan_step`, `accept_prediction`, `record`).
    """
    if config.adaptive:
        raise ValueError("make_plan needs a fixed schedule; tolerance is set (adaptive mode): plan step by step")
    t = as_times(times, "times")
    n = t.size
    if config.compute_mask is not None and len(config.compute_mask) != n:
        raise ValueError(f"compute_mask has {len(config.compute_mask)} entries but times has {n}")
    compute = np.zeros(n, dtype=bool)
    weights = np.zeros((n, config.order))
    sources = np.full((n, config.order), -1, dtype=np.int64)
    state = PlannerState()
    for i in range(n):
        decision = plan_step(config, state, t[i], n)
        compute[i] = decision.compute
        weights[i] = decision.weights
        sources[i, : len(decision.sources)] = decision.sources
        state = record(config, state, decision, decision.compute)
    return CachePlan(config, t, compute, weights, sources)
