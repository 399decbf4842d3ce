"""`ContextState`: one cache context (its outputs, its rule state, its next step) and the transition it runs.

At step i of a context, with H its last ``order`` computed outputs (newest first), `predict(i)` returns the
leaves of f^ = sum_j w_j H_j, the Lagrange extrapolation at the step's abscissa (paper, Eq. 3.5, error
O(h^k)), or None when the step computes; then `record(i, f)` stores the raw output f and returns
f + sum_l c_l [f, H]_l (the correction of the predicted steps before it, when the sampler's `LinearSteps`
are known), or `skip(i, leaves)` takes the prediction. Every decision and weight is abcore's
(`abcore.decide` / `abcore.complete` on the context's `RuleState`); nothing is re-derived here.

`predict_jointly` is the adaptive decision of the contexts at one step (`abcore.joint`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any, cast

import abcore
import torch

from abcache_torch._history import History, any_non_finite, squared_sum, weighted_sum
from abcache_torch._stats import ContextStats

Leaves = list[torch.Tensor]


def all_reduce(values: torch.Tensor, group: Any) -> torch.Tensor:
    """`values` summed over the ranks of `group` (a `torch.distributed` group, or None: no collective)."""
    if group is None:
        return values
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError("process_group is set but torch.distributed is not initialised")
    if dist.get_world_size(group) < 2:
        return values
    values = values.clone()
    dist.all_reduce(values, op=dist.ReduceOp.SUM, group=group)
    return values


class ContextState:
    """One cache context of one run: its `History`, abcore's `RuleState` and the index of its next step.

    Args:
        schedule: the run's `abcore.Schedule` (its times, or the time given at each step).
        stats: the counters this context adds to (kept by the owner across runs).
        check_finite: a non-finite prediction computes instead (one boolean read per predicted step).
        process_group: the ranks whose decisions must agree (all-reduced), or None (this process alone).
    """

    def __init__(
        self,
        schedule: abcore.Schedule,
        stats: ContextStats | None = None,
        *,
        check_finite: bool = True,
        process_group: Any = None,
    ) -> None:
        self.schedule = schedule
        self.stats = ContextStats() if stats is None else stats
        self.check_finite = check_finite
        self.process_group = process_group
        self.restart()

    def restart(self, step: int = 0) -> None:
        """Forget the outputs; the next step is `step` (a new generation, or a jump on the grid)."""
        self.history = History(self.schedule.config.order)
        self.rule = abcore.begin(self.schedule)
        self.step = step
        self._decision: tuple[int, float | None, abcore.theory.Decision] | None = None  # (i, time, decision)
        self._joint: tuple[int, float | None, Leaves | None] | None = None  # (i, time, predict_jointly's answer)

    def decision(self, i: int, time: float | None = None) -> abcore.theory.Decision:
        """`abcore.decide` at step i (once per step and time)."""
        if self._decision is None or self._decision[:2] != (i, time):
            self._decision = (i, time, abcore.decide(self.schedule, self.rule, i, time))
        return self._decision[2]

    def predict(self, i: int, time: float | None = None, peers: Iterable[ContextState] = ()) -> Leaves | None:
        """The predicted leaves at step i, or None when the step computes (the model runs, then `record`).

        Adaptive mode: unless decided already, this context decides with those of `peers` (on the same schedule)
        at step i that have outputs, else alone (`predict_jointly`); the others then take their share.
        """
        if i != self.step:
            self.restart(i)  # a jump: the pending steps and the history no longer describe this grid position
        if self.schedule.config.adaptive:
            group = [s for s in peers if s.schedule is self.schedule and s.step == i and len(s.history)]
            for members in (group, [self]):
                if members and (self._joint is None or self._joint[:2] != (i, time)):
                    predict_jointly(members, i, {id(s): time for s in members}, self.process_group)
            return cast(tuple, self._joint)[2]
        decision = self.decision(i, time)
        if bool(decision.compute):
            return None
        leaves = weighted_sum(self.history.entries, [float(w) for w in decision.weights])
        if self.check_finite and all_reduce(any_non_finite(leaves), self.process_group).item() > 0:
            self.stats.fallbacks += 1
            return None
        return leaves

    def skip(self, i: int, leaves: Leaves, time: float | None = None) -> Any:
        """Take the prediction `leaves` at step i; returns it in the structure of the stored outputs."""
        self._check_step(i, "skip")
        self.rule = abcore.complete(self.schedule, self.rule, i, False, time)
        self.step, self._joint = i + 1, None
        self.stats.predicted += 1
        return self.history.unflatten(leaves)

    def record(self, i: int, output: Any, time: float | None = None) -> Any:
        """Store the model's raw `output` at computed step i; returns it corrected (`Decision.correction`)."""
        self._check_step(i, "record")
        result = output
        if not self.history.matches(output):  # another structure or shape: start over here (no correction)
            self.restart(i)
        elif self.schedule.correct:
            correction = self.decision(i, time).correction
            if any(float(c) != 0.0 for c in correction):
                result = self.history.correct(output, correction)
        self.history.push(output)
        self.rule = abcore.complete(self.schedule, self.rule, i, True, time)
        self.step, self._joint = i + 1, None
        self.stats.computed += 1
        return result

    def _check_step(self, i: int, name: str) -> None:
        if i != self.step:  # the rule state and the pending steps describe step self.step, not i
            raise ValueError(
                f"i: {name}({i}) but this context's next step is {self.step}; call predict({i}) first "
                "(it restarts the context on a jump), then record or skip"
            )


def predict_jointly(
    states: Iterable[ContextState], i: int, times: dict[int, float | None], process_group: Any = None
) -> list[Leaves | None]:
    """The adaptive decision at step i for every context in `states` (all at step i): predicted leaves or None.

    All contexts predict only when none must compute (`abcore.decide`), every prediction is finite and
    `abcore.joint` accepts their embedded error estimates together (sums all-reduced over `process_group`).
    The answer is remembered in each state, so the contexts called later at step i reuse it (at the same time:
    a context called at another time decides again). `times`: the step time of each state by ``id(state)``
    where its schedule has no times.
    """
    group = list(states)
    tolerance = group[0].schedule.config.tolerance if group else None
    if tolerance is None:
        raise ValueError(
            "states: predict_jointly is the adaptive decision and needs states whose config sets tolerance"
        )
    decisions = [s.decision(i, times.get(id(s))) for s in group]
    answer: list[Leaves | None] = [None] * len(group)
    if not any(bool(d.compute) or not len(s.history) for s, d in zip(group, decisions, strict=True)):
        predicted = [weighted_sum(s.history.entries, [float(w) for w in d.weights]) for s, d in zip(group, decisions)]
        checks = []
        for s, d, pred in zip(group, decisions, predicted, strict=True):
            delta = weighted_sum(s.history.entries, [float(e) for e in d.error_weights])
            checks += [squared_sum(delta), squared_sum(pred), any_non_finite(pred)]
        values = all_reduce(torch.stack(checks), process_group).reshape(-1, 3).cpu().numpy()  # the one host read
        finite = values[:, 2] == 0
        if not finite.all():
            for s, ok in zip(group, finite, strict=True):
                s.stats.fallbacks += int(not ok)
        elif abcore.joint(values[:, 0], values[:, 1], tolerance):
            answer = list(predicted)
            for s, (delta_sq, pred_sq) in zip(group, values[:, :2], strict=True):
                s.stats.note_error(math.sqrt(delta_sq / pred_sq) if pred_sq > 0 else 0.0)
    for s, leaves in zip(group, answer, strict=True):
        s._joint = (i, times.get(id(s)), leaves)
    return answer
