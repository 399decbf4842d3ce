"""Counters of a cache: model calls made and saved, fallbacks, the largest error estimate."""

from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass
class ContextStats:
    """Counters of one context (one history).

    computed: steps where the model ran (fallbacks included); predicted: steps answered by
    extrapolation; fallbacks: predictions that were not finite and were recomputed;
    max_error: the largest adaptive error estimate ||p_k - p_{k-1}|| / ||p_k|| of an accepted
    prediction (at most the tolerance), or None.
    """

    computed: int = 0
    predicted: int = 0
    fallbacks: int = 0
    max_error: float | None = None

    @property
    def steps(self) -> int:
        return self.computed + self.predicted

    def note_error(self, error: float) -> None:
        if self.max_error is None or error > self.max_error:
            self.max_error = error

    def __add__(self, other: ContextStats) -> ContextStats:
        errors = [e for e in (self.max_error, other.max_error) if e is not None]
        return ContextStats(
            self.computed + other.computed,
            self.predicted + other.predicted,
            self.fallbacks + other.fallbacks,
            max(errors) if errors else None,
        )


class CacheStats:
    """Counters of a cache, per context and aggregated.

    `steps = computed + predicted`; `saved_calls == predicted`; `speedup_bound = steps / computed`
    (the speed-up if the model dominates the cost).
    """

    def __init__(self) -> None:
        self._contexts: dict[str, ContextStats] = {}

    def context(self, name: str) -> ContextStats:
        """The counters of context `name` (created empty on first use)."""
        if name not in self._contexts:
            self._contexts[name] = ContextStats()
        return self._contexts[name]

    @property
    def contexts(self) -> dict[str, ContextStats]:
        return dict(self._contexts)

    def __add__(self, other: CacheStats) -> CacheStats:
        """The counters of both, added context by context."""
        total = CacheStats()
        for source in (self, other):
            for name, counters in source._contexts.items():
                total._contexts[name] = total._contexts.get(name, ContextStats()) + counters
        return total

    @property
    def computed(self) -> int:
        return sum(c.computed for c in self._contexts.values())

    @property
    def predicted(self) -> int:
        return sum(c.predicted for c in self._contexts.values())

    @property
    def fallbacks(self) -> int:
        return sum(c.fallbacks for c in self._contexts.values())

    @property
    def steps(self) -> int:
        return self.computed + self.predicted

    @property
    def saved_calls(self) -> int:
        return self.predicted

    @property
    def speedup_bound(self) -> float:
        return self.steps / self.computed if self.computed else 1.0

    @property
    def max_error(self) -> float | None:
        errors = [c.max_error for c in self._contexts.values() if c.max_error is not None]
        return max(errors) if errors else None

    def as_dict(self) -> dict[str, Any]:
        return {
            "computed": self.computed,
            "predicted": self.predicted,
            "steps": self.steps,
            "saved_calls": self.saved_calls,
            "fallbacks": self.fallbacks,
            "max_error": self.max_error,
            "speedup_bound": self.speedup_bound,
            "contexts": {k: dataclasses.asdict(v) for k, v in self._contexts.items()},
        }

    def __repr__(self) -> str:
        error = "None" if self.max_error is None else f"{self.max_error:.3g}"
        head = (
            f"CacheStats(steps={self.steps}, computed={self.computed}, predicted={self.predicted}, "
            f"saved_calls={self.saved_calls}, fallbacks={self.fallbacks}, max_error={error}, "
            f"speedup_bound={self.speedup_bound:.2f}x"
        )
        if len(self._contexts) > 1:
            parts = ", ".join(f"{k}: {v.computed}c/{v.predicted}p" for k, v in self._contexts.items())
            head += f", contexts={{{parts}}}"
        return head + ")"
