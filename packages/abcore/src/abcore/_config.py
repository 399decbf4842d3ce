"""`ABConfig`: what to compute and how to predict, validated on construction."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, cast

import numpy as np

from abcore._validate import check_count, check_order

Weighting = Literal["plain", "exp-eps", "exp-x0"]
WEIGHTINGS: tuple[str, ...] = ("plain", "exp-eps", "exp-x0")
Abscissa = Literal["time", "index"]
ABSCISSAS: tuple[str, ...] = ("time", "index")
Predictor = Literal["lagrange", "binomial"]
PREDICTORS: tuple[str, ...] = ("lagrange", "binomial")
ErrorTest = Literal["state", "output"]
ERRORS: tuple[str, ...] = ("state", "output")
INTERVAL, WARMUP, COOLDOWN = 5, 2, 4  # the fixed schedule's defaults


@dataclass(frozen=True)
class ABConfig:
    """AB-Cache settings (paper, Section 3.4).

    Which steps compute, one of four modes; the others are predicted by Lagrange extrapolation
    of order ``order`` through the last computed outputs (Eq. 3.5, error O(h^k); a prediction
    from fewer than ``order`` computed outputs uses all of them):

    - a call budget (the default, or ``calls`` / ``speedup``): exactly N steps compute, a
      warm-up, a tail and the rest placed by the sampler's sensitivity (`budget_mask`);
    - the fixed schedule (``interval`` given): steps ``0 .. max(warmup, 1) - 1``, the last
      ``cooldown`` steps, and after the warm-up the multiples of ``interval``;
    - ``compute_mask``: explicit flags; ``tolerance``: the adaptive mode.

    The default is the budget of `default_calls`: 5 + n // 5 calls on n steps (9 of 20, 10 of
    28, 15 of 50: 2.2x, 2.8x, 3.3x), with the correction where the sampler's step is linear.
    ``ABConfig(interval=5)`` is the previous default (warm-up 2, cool-down 4). See
    BENCHMARKS.md for the measurements behind each default.

    Args:
        order: k, the number of computed outputs each prediction combines (error O(h^k)).
        interval: the fixed schedule: one computed step every ``interval`` steps after the
            warm-up (1 computes every step); 5 when not given outside a budget. In adaptive
            mode, the default bound on consecutive predictions is ``interval - 1``.
        warmup: leading steps that always compute (at least the first one does); 2 in fixed
            and adaptive mode when not given, the budget's own split in a budget.
        cooldown: trailing steps that always compute (4, or the budget's tail, when not
            given); needs the number of steps. The last
            steps decide the result: their extrapolated outputs are the least accurate, and a
            predicted step after the last computed one is never corrected.
        compute_mask: explicit per-step compute flags, replacing the fixed schedule;
            must start with True and match the number of steps.
        calls: a call budget instead of an interval: exactly ``min(calls, n)`` steps compute,
            placed by `budget_mask` (a warm-up, a tail, the rest by the sampler's sensitivity).
            ``warmup`` and ``cooldown`` then default to the budget's own split.
        speedup: the budget as a speed-up, ``calls = max(1, floor(n / speedup))``.
        tolerance: enables the adaptive mode: a step is predicted only when the embedded
            error estimate passes the test ``error`` in every cache context (needs ``order >= 2``).
        error: the adaptive test. "state": the estimated change of the final sample,
            |s_n| ||p_k - p_{k-1}|| <= tolerance ||p_k||, with s_n = b_n prod_{l>n} a_l the
            sampler's sensitivity of its result to step n's output (error control on the
            solution, as ODE solvers do; needs the sampler's `LinearSteps`). "output": the
            output's relative change ||p_k - p_{k-1}|| <= tolerance ||p_k||. None (default):
            "state" where the steps are known, else "output".
        max_predicted: adaptive mode: most consecutive predicted steps (default
            ``interval - 1``).
        weighting: what is extrapolated. "plain" (default): the model output itself.
            "exp-eps": e^{-lambda} eps on the lambda abscissa, the paper's Eq. 3.6;
            "exp-x0": e^{lambda} x0 likewise. The exponential forms need times = lambda.
        abscissa: the extrapolation nodes. "time" (default): the real step times of the
            computed outputs. "index": their step indices (what step-index caches such as
            TaylorSeer do).
        predictor: "lagrange" (default): Lagrange extrapolation on the abscissa.
            "binomial": the paper's equal-step Eq. 3.6, weights (-1)^(i+1) C(k, i) applied
            to the last computed outputs as if they were consecutive (for comparison; fixed
            schedule only).
        correct: correct the predicted steps once the next output is computed (see
            `abcore.theory.correction_weights`): True needs the sampler's `LinearSteps`; None
            (default) corrects whenever they are given; False never.
    """

    WEIGHTINGS: ClassVar[tuple[str, ...]] = WEIGHTINGS
    ABSCISSAS: ClassVar[tuple[str, ...]] = ABSCISSAS
    PREDICTORS: ClassVar[tuple[str, ...]] = PREDICTORS

    order: int = 2
    interval: int = None  # type: ignore[assignment]  # INTERVAL unless a budget is set
    warmup: int = None  # type: ignore[assignment]  # WARMUP, or the budget's split
    cooldown: int = None  # type: ignore[assignment]  # COOLDOWN, or the budget's split
    compute_mask: tuple[bool, ...] | None = None
    calls: int | None = None
    speedup: float | None = None
    tolerance: float | None = None
    error: ErrorTest | None = None
    max_predicted: int | None = None
    weighting: Weighting = "plain"
    abscissa: Abscissa = "time"
    predictor: Predictor = "lagrange"
    correct: bool | None = None

    def __post_init__(self) -> None:
        check_order(self.order, "order")
        self._check_budget()
        if not self.budgeted:
            for name, default in (("interval", INTERVAL), ("warmup", WARMUP), ("cooldown", COOLDOWN)):
                if getattr(self, name) is None:
                    object.__setattr__(self, name, default)
        if self.interval is not None:
            check_order(self.interval, "interval")
        if self.warmup is not None:
            check_count(self.warmup, "warmup")
        if self.cooldown is not None:
            check_count(self.cooldown, "cooldown")
        if self.compute_mask is not None:
            mask = tuple(self.compute_mask)
            if not mask or not all(isinstance(m, (bool, np.bool_)) for m in mask):
                raise ValueError(f"compute_mask must be a non-empty sequence of bools, got {self.compute_mask!r}")
            mask = tuple(bool(m) for m in mask)
            if not mask[0]:
                raise ValueError("compute_mask must start with True: the first step has no history to predict from")
            object.__setattr__(self, "compute_mask", mask)
        if self.tolerance is not None:
            if isinstance(self.tolerance, bool) or not isinstance(self.tolerance, (int, float)):
                raise ValueError(f"tolerance must be a positive finite float or None, got {self.tolerance!r}")
            if not (math.isfinite(self.tolerance) and self.tolerance > 0):
                raise ValueError(f"tolerance must be a positive finite float or None, got {self.tolerance!r}")
            if self.order < 2:
                raise ValueError(f"order must be >= 2 in adaptive mode (tolerance set), got {self.order}")
        if self.max_predicted is not None:
            check_count(self.max_predicted, "max_predicted")
            if self.tolerance is None:
                raise ValueError(
                    "max_predicted bounds the adaptive mode and needs tolerance; in fixed mode use interval"
                )
        if self.weighting not in WEIGHTINGS:
            raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {self.weighting!r}")
        if self.abscissa not in ABSCISSAS:
            raise ValueError(f"abscissa must be one of {ABSCISSAS}, got {self.abscissa!r}")
        if self.predictor not in PREDICTORS:
            raise ValueError(f"predictor must be one of {PREDICTORS}, got {self.predictor!r}")
        if self.weighting != "plain" and self.abscissa == "index":
            raise ValueError(
                f"weighting={self.weighting!r} scales by e^(lambda difference) and needs abscissa='time' on lambda, "
                "got abscissa='index'"
            )
        if self.predictor == "binomial" and self.tolerance is not None:
            raise ValueError("predictor='binomial' needs the fixed schedule (tolerance=None)")
        if self.correct is not None and not isinstance(self.correct, (bool, np.bool_)):
            raise ValueError(f"correct must be True, False or None (when the steps are known), got {self.correct!r}")
        if self.error is not None and self.error not in ERRORS:
            raise ValueError(f"error must be one of {ERRORS} or None, got {self.error!r}")
        if self.error is not None and self.tolerance is None:
            raise ValueError(f"error={self.error!r} is the adaptive test and needs tolerance")
        if self.correct is True and self.predictor == "binomial":
            raise ValueError(
                "correct=True needs predictor='lagrange': the binomial rule has no abscissa to interpolate on"
            )

    def _check_budget(self) -> None:
        if self.calls is None and self.speedup is None:
            return
        if self.calls is not None and self.speedup is not None:
            raise ValueError(f"give calls or speedup, not both (got calls={self.calls!r}, speedup={self.speedup!r})")
        if self.calls is not None:
            check_order(self.calls, "calls")
        else:
            s = self.speedup
            if isinstance(s, bool) or not isinstance(s, (int, float)) or not (math.isfinite(s) and s >= 1):
                raise ValueError(f"speedup must be a finite number >= 1, got {s!r}")
        budget = f"calls={self.calls}" if self.calls is not None else f"speedup={self.speedup}"
        for name in ("interval", "compute_mask", "tolerance"):
            if getattr(self, name) is not None:
                raise ValueError(f"{budget} places the computed steps itself: leave {name} unset")

    @property
    def adaptive(self) -> bool:
        return self.tolerance is not None

    @property
    def budgeted(self) -> bool:
        """Whether a call budget places the computed steps: ``calls``, ``speedup``, or the default (no interval,
        mask or tolerance given)."""
        return self.interval is None and self.compute_mask is None and self.tolerance is None

    def budget(self, num_steps: int) -> int:
        """The number of computed steps of a budgeted config on `num_steps` steps (`default_calls` by default)."""
        check_order(num_steps, "num_steps")
        if self.calls is not None:
            return min(self.calls, num_steps)
        if self.speedup is not None:
            return max(1, min(num_steps, math.floor(num_steps / float(self.speedup) + 1e-9)))
        return default_calls(num_steps)

    @property
    def first_scheduled(self) -> int:
        """Number of leading steps that always compute: max(warmup, 1)."""
        return max(self.warmup or 0, 1)

    @property
    def predicted_limit(self) -> int:
        """Most consecutive predicted steps in adaptive mode."""
        return self.interval - 1 if self.max_predicted is None else self.max_predicted

    @property
    def max_run(self) -> int:
        """An upper bound on consecutive predicted steps (the length of the rule's pending list)."""
        if self.compute_mask is not None:
            return longest_run(self.compute_mask)
        if self.budgeted:
            raise ValueError("a call budget places its steps on a known grid: use abcore.begin(schedule)")
        return self.predicted_limit if self.adaptive else self.interval - 1

    def corrects(self, steps_known: bool) -> bool:
        """Whether predicted steps are corrected; raises when correct=True and the steps are unknown."""
        if self.correct is True and not steps_known:
            raise ValueError(
                "correct=True needs the sampler's step coefficients: pass steps=abcore.LinearSteps(...) "
                "(LinearSteps.euler(grid) for flow matching, LinearSteps.ddim(...) for DDIM)"
            )
        if self.correct is None:
            return steps_known and self.predictor == "lagrange"
        return self.correct

    def check_num_steps(self, num_steps: int) -> None:
        """Raise ValueError when the schedule cannot fit `num_steps` steps (mask length, warm-up, cool-down)."""
        check_order(num_steps, "num_steps")
        if self.compute_mask is not None:
            if num_steps != len(self.compute_mask):
                raise ValueError(
                    f"compute_mask has {len(self.compute_mask)} entries but the grid has {num_steps} steps"
                )
            return
        for name in ("warmup", "cooldown"):
            value = getattr(self, name)
            if value is not None and value > num_steps:
                raise ValueError(f"{name}={value} is longer than the run of {num_steps} steps")

    def forced_compute(self, step: int, num_steps: int | None = None) -> bool:
        """Whether `step` computes regardless of data (warm-up, cool-down, mask, schedule).

        In adaptive mode only warm-up, cool-down and mask force a computation; the other
        steps are candidates for prediction. Cool-down and mask need `num_steps`.
        """
        if num_steps is None and (self.cooldown or self.compute_mask is not None or self.budgeted):
            raise ValueError("cooldown, compute_mask and a call budget need the number of steps: announce the grid")
        if self.budgeted:
            return bool(self.forced_mask(cast(int, num_steps))[step])
        if self.compute_mask is not None:
            if step >= len(self.compute_mask):
                raise ValueError(f"step {step} is past compute_mask (length {len(self.compute_mask)})")
            return self.compute_mask[step]
        if step < self.first_scheduled:
            return True
        if num_steps is not None and step >= num_steps - self.cooldown:
            return True
        if self.adaptive:
            return False
        return step % self.interval == 0

    def forced_mask(self, num_steps: int, sensitivity: Any = None) -> np.ndarray:
        """(num_steps,) bool: `forced_compute` at every step (validated against `num_steps`).

        `sensitivity`: the sampler's s_j, which places a budget's warm-up and tail (`budget_split`).
        """
        self.check_num_steps(num_steps)
        if self.budgeted:
            return budget_mask(num_steps, self.budget(num_steps), self.warmup, self.cooldown, sensitivity)
        return np.array([self.forced_compute(i, num_steps) for i in range(num_steps)], dtype=bool)

    def num_computed(self, num_steps: int) -> int:
        """Model calls of the fixed schedule on `num_steps` steps (an upper bound in adaptive mode)."""
        if self.adaptive:
            check_order(num_steps, "num_steps")
            return num_steps
        return int(self.forced_mask(num_steps).sum())


def default_calls(num_steps: int) -> int:
    """The default budget: 5 + n // 5 calls on n steps (9 of 20, 10 of 28, 15 of 50: 2.2x, 2.8x, 3.3x)."""
    return min(num_steps, 5 + num_steps // 5)


def longest_run(mask: Any) -> int:
    """The most consecutive False entries of `mask`."""
    run = longest = 0
    for m in mask:
        run = 0 if m else run + 1
        longest = max(longest, run)
    return longest


def budget_split(num_steps: int, calls: int, sensitivity: Any = None) -> tuple[int, int, float]:
    """A budget's warm-up w, tail c and spacing exponent p (`budget_mask`), from where the result is sensitive.

    `sensitivity`: the sampler's s_j (`abcore.Schedule.sensitivity`). Late (its last third outweighs its first:
    flow matching, whose last sigma steps are the longest): w = 1 and, from 9 calls, a tail of 3 with the rest
    spaced evenly (p = 0); under 9 calls no tail and p = 1, the calls crowding towards the end. Early (DDIM on
    eps or v: the first steps weigh the most): w = 2 and, from 9 calls, c = 3 and p = 1/2, else c = 0, p = 0.
    Unknown: w = 2, c = 2, p = 0. Chosen on a calibration seed (10) of the zoo at 20, 28 and 50 steps, the
    Fashion-MNIST DiT and the digit DiT pulling p opposite ways (BENCHMARKS.md, `benchmarks/budget.py`).
    """
    if sensitivity is None:
        warmup, tail, power = 2, 2, 0.0
    else:
        s = np.abs(np.asarray(sensitivity, dtype=np.float64))
        third = max(1, s.size // 3)
        if s[-third:].mean() > s[:third].mean():
            warmup, tail, power = (1, 3, 0.0) if calls >= 9 else (1, 0, 1.0)
        else:
            warmup, tail, power = (2, 3, 0.5) if calls >= 9 else (2, 0, 0.0)
    warmup = max(1, min(warmup, calls))
    return warmup, max(0, min(tail, calls - warmup - 1, num_steps - warmup)), power


def budget_mask(
    num_steps: int, calls: int, warmup: int | None = None, cooldown: int | None = None, sensitivity: Any = None
) -> np.ndarray:
    """(num_steps,) bool with exactly ``min(calls, num_steps)`` True: where a budget computes.

    Steps 0 .. w-1 (the warm-up, w >= 1) and the last c steps (the tail) compute; the other m = calls - w - c
    are placed in the steps between with a density proportional to |s_j|^p, the sampler's sensitivity of
    its result to step j's output (an a-priori error model: a predicted step's error reaches the result times
    s_j): the q-th of them at the step whose centre of mass is nearest the quantile (q + 1/2) / m. p = 0 or no
    `sensitivity` spaces them evenly. w, c, p default to `budget_split`; raises ValueError when a given warm-up
    and tail do not fit the budget.
    """
    n = check_order(num_steps, "num_steps")
    calls = min(check_order(calls, "calls"), n)
    auto_w, auto_c, power = budget_split(n, calls, sensitivity)
    c = None if cooldown is None else check_count(cooldown, "cooldown")
    w = max(1, min(auto_w, calls - (c or 0))) if warmup is None else max(1, check_count(warmup, "warmup"))
    c = max(0, min(auto_c, calls - w)) if c is None else c
    if w + c > calls:
        raise ValueError(f"warmup={w} and cooldown={c} need {w + c} calls, more than the budget of {calls}")
    mask = np.zeros(n, dtype=bool)
    mask[:w] = True
    if c:
        mask[n - c :] = True
    middle, low, high = calls - w - c, w, n - c  # the middle steps are low .. high - 1
    if middle:
        density = np.ones(high - low) if sensitivity is None else np.abs(np.asarray(sensitivity)[low:high]) ** power
        density = density / density.sum() if density.sum() > 0 else np.full(high - low, 1.0 / (high - low))
        centre = np.cumsum(density) - density / 2
        previous = low - 1
        for q in range(middle):  # the nearest free step that leaves room for the rest
            first, last = previous + 1, high - (middle - q)
            previous = first + int(np.argmin(np.abs(centre[first - low : last - low + 1] - (q + 0.5) / middle)))
            mask[previous] = True
    return mask
