"""`ABConfig`: what to compute and how to predict, validated on construction."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Literal

import numpy as np

from abcore._validate import check_count, check_order

Weighting = Literal["plain", "exp-eps", "exp-x0"]
WEIGHTINGS: tuple[str, ...] = ("plain", "exp-eps", "exp-x0")
Abscissa = Literal["time", "index"]
ABSCISSAS: tuple[str, ...] = ("time", "index")
Predictor = Literal["lagrange", "binomial"]
PREDICTORS: tuple[str, ...] = ("lagrange", "binomial")


@dataclass(frozen=True)
class ABConfig:
    """AB-Cache settings (paper, Section 3.4).

    Fixed schedule: steps ``0 .. max(warmup, 1) - 1`` compute, the last ``cooldown``
    steps compute, and after the warm-up the steps whose index is a multiple of
    ``interval`` compute; the steps between are predicted by Lagrange extrapolation of
    order ``order`` through the last computed outputs (Eq. 3.5, error O(h^k)). A
    prediction from fewer than ``order`` computed outputs uses all of them.

    The default, order 2, interval 5, warm-up 2, cool-down 4, with the correction where the
    sampler's step is linear, computes steps 0, 1, 5, 10, ..., 45, 46, 47, 48, 49 on 50 steps
    (15 model calls, 3.3x); see BENCHMARKS.md for the measurements behind each default.

    Args:
        order: k, the number of computed outputs each prediction combines (error O(h^k)).
        interval: in fixed mode, one computed step every ``interval`` steps after the
            warm-up (1 computes every step). In adaptive mode, the default bound on
            consecutive predictions is ``interval - 1``.
        warmup: leading steps that always compute (at least the first one does).
        cooldown: trailing steps that always compute; needs the number of steps. The last
            steps decide the result: their extrapolated outputs are the least accurate, and a
            predicted step after the last computed one is never corrected.
        compute_mask: explicit per-step compute flags, replacing the fixed schedule;
            must start with True and match the number of steps.
        tolerance: enables the adaptive mode: a step is predicted only when the embedded
            error estimate ||p_k - p_{k-1}|| / ||p_k|| is at most ``tolerance`` in every
            cache context (needs ``order >= 2``).
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
    interval: int = 5
    warmup: int = 2
    cooldown: int = 4
    compute_mask: tuple[bool, ...] | None = None
    tolerance: float | None = None
    max_predicted: int | None = None
    weighting: Weighting = "plain"
    abscissa: Abscissa = "time"
    predictor: Predictor = "lagrange"
    correct: bool | None = None

    def __post_init__(self) -> None:
        check_order(self.order, "order")
        check_order(self.interval, "interval")
        check_count(self.warmup, "warmup")
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
        if self.correct is True and self.predictor == "binomial":
            raise ValueError(
                "correct=True needs predictor='lagrange': the binomial rule has no abscissa to interpolate on"
            )

    @property
    def adaptive(self) -> bool:
        return self.tolerance is not None

    @property
    def first_scheduled(self) -> int:
        """Number of leading steps that always compute: max(warmup, 1)."""
        return max(self.warmup, 1)

    @property
    def predicted_limit(self) -> int:
        """Most consecutive predicted steps in adaptive mode."""
        return self.interval - 1 if self.max_predicted is None else self.max_predicted

    @property
    def max_run(self) -> int:
        """An upper bound on consecutive predicted steps (the length of the rule's pending list)."""
        if self.compute_mask is not None:
            run = longest = 0
            for m in self.compute_mask:
                run = 0 if m else run + 1
                longest = max(longest, run)
            return longest
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
            if value > num_steps:
                raise ValueError(f"{name}={value} is longer than the run of {num_steps} steps")

    def forced_compute(self, step: int, num_steps: int | None = None) -> bool:
        """Whether `step` computes regardless of data (warm-up, cool-down, mask, schedule).

        In adaptive mode only warm-up, cool-down and mask force a computation; the other
        steps are candidates for prediction. Cool-down and mask need `num_steps`.
        """
        if num_steps is None and (self.cooldown or self.compute_mask is not None):
            raise ValueError("cooldown and compute_mask need the number of steps: announce the grid")
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

    def forced_mask(self, num_steps: int) -> np.ndarray:
        """(num_steps,) bool: `forced_compute` at every step (validated against `num_steps`)."""
        self.check_num_steps(num_steps)
        return np.array([self.forced_compute(i, num_steps) for i in range(num_steps)], dtype=bool)

    def num_computed(self, num_steps: int) -> int:
        """Model calls of the fixed schedule on `num_steps` steps (an upper bound in adaptive mode)."""
        if self.adaptive:
            check_order(num_steps, "num_steps")
            return num_steps
        return int(self.forced_mask(num_steps).sum())
