"""`make_plan`: the step rule folded over a known grid, as tables to inspect or to execute.

The rule (`abcore._rule`) is the one source of every decision and weight; a plan is its fold over
the step times when the schedule does not depend on the data (fixed mode): row i of `weights`
and of `corrections` is what `decide` returns at step i.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np

from abcore._config import ABConfig
from abcore._rule import Schedule, begin, complete, decide, schedule
from abcore._steps import LinearSteps

# Measured on the zoo (50 steps, last 4 computed, corrected): order 3 / interval 6 (31x) keeps 48-52 dB on every
# model; order 3 / interval 8 (71x) falls to 30-36 dB and order 4 / interval 5 (155x) to 17 dB.
AMPLIFICATION_LIMIT = 50.0
_PLANS: dict[tuple, CachePlan] = {}  # the last 64 plans made, by (config, times, steps)


@dataclass(frozen=True)
class CachePlan:
    """A fixed plan over a known grid, as arrays an adapter executes.

    times: (n,) the call times. compute: (n,) bool. weights: (n, order), row i applied to the
    history (newest first) at a predicted step i; zero rows at computed steps. corrections:
    (n, order + 1), row n applied to [f_n, H_0, ...] at a computed step n (zero without the
    correction). sources: (n, order) int, the step index behind each history entry (-1 where empty).
    amplification: max_i sum_j |w_ij|, how much a prediction can amplify noise in the outputs.
    """

    config: ABConfig
    times: np.ndarray
    compute: np.ndarray
    weights: np.ndarray
    corrections: np.ndarray = field(repr=False)
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

    @property
    def amplification(self) -> float:
        return float(np.abs(self.weights).sum(axis=1).max(initial=0.0))


def make_plan(config: ABConfig, times: Any, steps: LinearSteps | None = None) -> CachePlan:
    """The fixed-schedule plan of `config` on the call times `times` (n values, one per model call).

    `steps`: the sampler's `LinearSteps` (n entries), which enables the correction (`config.correct`).
    Raises ValueError in adaptive mode, whose decisions depend on the outputs (run the rule step by
    step), and for a schedule that does not fit the grid. Warns when a prediction's weights sum in
    absolute value to more than 50: such a plan amplifies the model's step-to-step noise into garbage
    (an order too high or an interval too long for the grid).
    """
    if config.adaptive:
        raise ValueError(
            "make_plan needs a fixed schedule; tolerance is set (adaptive mode): run the rule step by step"
        )
    if times is None:
        raise ValueError("times must hold the n call times of the run, got None")
    sched = schedule(config, times, steps)
    t = cast(np.ndarray, sched.times)
    n = t.size
    key = (config, t.tobytes(), None if steps is None else (steps.a.tobytes(), steps.b.tobytes()))
    plan = _PLANS.get(key)  # a pipeline announces the same grid at every generation
    if plan is None:
        plan = _fold(sched)
        if len(_PLANS) >= 64:
            _PLANS.pop(next(iter(_PLANS)))
        _PLANS[key] = plan
    if plan.amplification > AMPLIFICATION_LIMIT:
        warnings.warn(
            f"order={config.order}, interval={config.interval} on {n} steps: a prediction weighs the stored outputs "
            f"by up to {plan.amplification:.0f}x in sum, which turns the model's step-to-step noise into garbage; "
            "lower the order or the interval",
            UserWarning,
            stacklevel=2,
        )
    return plan


def _fold(sched: Schedule) -> CachePlan:
    """The rule folded over the schedule's steps (the body of `make_plan`)."""
    n, order = cast(int, sched.num_steps), sched.config.order
    compute = np.zeros(n, dtype=bool)
    weights = np.zeros((n, order))
    corrections = np.zeros((n, order + 1))
    sources = np.full((n, order), -1, dtype=np.int64)
    state = begin(sched)
    history: list[int] = []
    for i in range(n):
        decision = decide(sched, state, i)
        sources[i, : len(history)] = history
        compute[i] = bool(decision.compute)
        if compute[i]:
            corrections[i] = decision.correction
            history = [i, *history][:order]
        else:
            weights[i] = decision.weights
        state = complete(sched, state, i, compute[i])
    times = cast(np.ndarray, sched.times).copy()
    for array in (times, compute, weights, corrections, sources):
        array.flags.writeable = False  # plans are shared between callers (the cache in make_plan)
    return CachePlan(sched.config, times, compute, weights, corrections, sources)
