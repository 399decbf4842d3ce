"""`ABConfig`: what to compute and how to predict, validated on construction."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from abcore._validate import check_count, check_order

Weighting = Literal["plain", "exp-eps", "exp-x0"]
WEIGHTINGS: tuple[str, ...] = ("plain", "exp-eps", "exp-x0")
Spacing = Literal["time", "index", "binomial"]
SPACINGS: tuple[str, ...] = ("time", "index", "binomial")


@dataclass(frozen=True)
class ABConfig:
    """AB-Cache settings (paper, Section 3.4).

    Fixed schedule: steps ``0 .. max(warmup, 1) - 1`` compute, the last ``cooldown``
    steps compute (when the number of steps is known), and after the warm-up the steps
    whose index is a multiple of ``interval`` compute; the steps between are predicted
    by Lagrange extrapolation of order ``order`` through the last computed outputs at
    their real times. ``ABConfig(order=2, interval=3, warmup=2)`` on 50 steps computes
    steps 0, 1, 3, 6, ..., 48: 18 model calls. Aligning the schedule to step 0 makes the
    first gap after a short warm-up shorter than the others, where denoiser outputs
    change fastest (the start of the U-shape of the paper's Fig. 5): on our flow model
    this alone is worth 7 dB over a schedule that starts with a full gap. A prediction
    from fewer than ``order`` computed outputs uses all of them (its order is capped),
    so ``warmup >= order`` gives every prediction its full order.

    Args:
        order: k, the number of computed outputs each prediction combines (error O(h^k)).
        interval: in fixed mode, one computed step every ``interval`` steps after the
            warm-up (1 computes every step). In adaptive mode, the default bound on
            consecutive predictions is ``interval - 1``.
        warmup: leading steps that always compute (at least the first one does).
        cooldown: trailing steps that always compute; needs the number of steps.
        compute_mask: explicit per-step compute flags, replacing the fixed schedule;
            must start with True and match the number of steps.
        tolerance: enables the adaptive mode: a step is predicted only when the embedded
            error estimate ||p_k - p_{k-1}|| / ||p_k|| is at most ``tolerance`` (needs
            ``order >= 2``).
        max_predicted: adaptive mode: most consecutive predicted steps (default
            ``interval - 1``).
        weighting: what is extrapolated. "plain" (default): the model output itself.
            "exp-eps": e^{-lambda} eps on the lambda abscissa, the paper's Eq. 3.6;
            "exp-x0": e^{lambda} x0 likewise. The exponential forms need times = lambda.
        spacing: the nodes of the extrapolation. "time" (default): the real step times
            of the computed outputs. "index": their step indices (what step-index caches
            such as TaylorSeer do). "binomial": the paper's equal-step Eq. 3.6 applied to
            the last computed outputs as if they were consecutive (weights
            (-1)^(i+1) C(k, i) at every predicted step). The last two exist for
            comparison and need the fixed schedule.
    """

    order: int = 2
    interval: int = 3
    warmup: int = 2
    cooldown: int = 0
    compute_mask: tuple[bool, ...] | None = None
    tolerance: float | None = None
    max_predicted: int | None = None
    weighting: Weighting = "plain"
    spacing: Spacing = "time"

    def __post_init__(self) -> None:
        check_order(self.order, "order")
        check_order(self.interval, "interval")
        check_count(self.warmup, "warmup")
        check_count(self.cooldown, "cooldown")
        if self.compute_mask is not None:
            mask = tuple(self.compute_mask)
            if not mask or not all(isinstance(m, bool) for m in mask):
                raise ValueError(f"compute_mask must be a non-empty sequence of bools, got {self.compute_mask!r}")
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
        if self.weighting not in WEIGHTINGS:
            raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {self.weighting!r}")
        if self.spacing not in SPACINGS:
            raise ValueError(f"spacing must be one of {SPACINGS}, got {self.spacing!r}")
        if self.spacing != "time" and self.tolerance is not None:
            raise ValueError(f"spacing={self.spacing!r} needs the fixed schedule (tolerance=None)")

    @property
    def adaptive(self) -> bool:
        return self.tolerance is not None

    @property
    def first_scheduled(self) -> int:
        """Number of leading steps that always compute: max(warmup, 1)."""
        return max(self.warmup, 1)

    @property
    def predicted_limit(self) -> int:
        """Most consecutive predicted steps."""
        return self.interval - 1 if self.max_predicted is None else self.max_predicted

    def forced_compute(self, step: int, num_steps: int | None = None) -> bool:
        """Whether `step` computes regardless of data (warm-up, cool-down, mask, schedule).

        In adaptive mode only warm-up, cool-down and mask force a computation; the other
        steps are candidates for prediction.
        """
        if self.compute_mask is not None:
            if num_steps is not None and num_steps != len(self.compute_mask):
                raise ValueError(
                    f"compute_mask has {len(self.compute_mask)} entries but the grid has {num_steps} steps"
                )
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

    def num_computed(self, num_steps: int) -> int:
        """Model calls of the fixed schedule on `num_steps` steps (an upper bound in adaptive mode)."""
        check_order(num_steps, "num_steps")
        if self.adaptive:
            return num_steps
        return sum(self.forced_compute(i, num_steps) for i in range(num_steps))
