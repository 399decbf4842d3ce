"""The numpy reference executor that every adapter is tested against."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np

from abcore._config import ABConfig
from abcore._plan import PlannerState, accept_prediction, plan_step, record
from abcore._validate import as_times

ModelFn = Callable[[np.ndarray, float], np.ndarray]
StepFn = Callable[[np.ndarray, np.ndarray, float, float], np.ndarray]


class Trajectory(NamedTuple):
    """Result of `sample`: the final state, which steps computed, and the outputs used."""

    x: np.ndarray
    computed: np.ndarray
    outputs: list[np.ndarray]


def sample(
    model_fn: ModelFn,
    x: Any,
    times: Any,
    step_fn: StepFn,
    config: ABConfig,
    callback: Callable[[int, np.ndarray, np.ndarray], None] | None = None,
) -> Trajectory:
    """Run a sampler with AB-Cache: x_{i+1} = step_fn(x_i, out_i, times[i], times[i+1]).

    `times` has n + 1 entries for n steps (the last is where the sampler ends, e.g.
    sigma = 0; the model is never called there). out_i is model_fn(x_i, times[i]) at
    computed steps and the plan's extrapolation from the last computed outputs at
    predicted steps; a non-finite prediction falls back to a model call. Decisions
    are made step by step, so fixed and adaptive configs run through the same loop.
    """
    t = as_times(times, "times")
    if t.size < 2:
        raise ValueError(f"times must hold at least 2 entries (n steps need n + 1), got {t.size}")
    n = t.size - 1
    x = np.asarray(x)
    state = PlannerState()
    history: list[np.ndarray] = []
    computed = np.zeros(n, dtype=bool)
    outputs: list[np.ndarray] = []
    for i in range(n):
        decision = plan_step(config, state, t[i], n)
        out = None
        if not decision.compute:
            out = sum(w * h for w, h in zip(decision.weights, history))
            if config.tolerance is not None:
                delta = sum(e * h for e, h in zip(decision.error_weights, history))
                if not accept_prediction(np.sum(delta**2), np.sum(out**2), config.tolerance):
                    out = None
            if out is not None and not np.all(np.isfinite(out)):
                out = None
        if out is None:
            out = np.asarray(model_fn(x, float(t[i])))
            history = [out, *history][: config.order]
            computed[i] = True
        state = record(config, state, decision, bool(computed[i]))
        outputs.append(out)
        x = step_fn(x, out, float(t[i]), float(t[i + 1]))
        if callback is not None:
            callback(i, x, out)
    return Trajectory(x, computed, outputs)
