"""`sample`: the numpy reference executor of the step rule, which every adapter is tested against."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple, cast

import numpy as np

from abcore._config import ABConfig
from abcore._rule import begin, complete, decide, joint, schedule
from abcore._steps import LinearSteps
from abcore._validate import as_grid

ModelFn = Callable[[np.ndarray, float], np.ndarray]
StepFn = Callable[[np.ndarray, np.ndarray, float, float], np.ndarray]


class Trajectory(NamedTuple):
    """Result of `sample`: the final state, which steps computed, and the outputs the sampler used."""

    x: Any
    computed: Any
    outputs: Any


def _weighted(weights: Any, entries: list[np.ndarray]) -> np.ndarray:
    return sum(float(w) * h for w, h in zip(weights, entries))  # type: ignore[return-value]


def sample(
    model_fn: ModelFn,
    x: Any,
    grid: Any,
    step_fn: StepFn | None,
    config: ABConfig,
    *,
    steps: LinearSteps | None = None,
    weights: Any = None,
    callback: Callable[[int, np.ndarray, np.ndarray], None] | None = None,
) -> Trajectory:
    """Run a sampler with AB-Cache: x_{i+1} = step_fn(x_i, out_i, grid[i], grid[i+1]).

    `grid` has n + 1 entries for n steps (the last is where the sampler ends, e.g. sigma = 0;
    the model is never called there). out_i is model_fn(x_i, grid[i]) at computed steps and the
    rule's extrapolation sum_j w_j H_j (Eq. 3.5) at predicted ones; a non-finite prediction falls
    back to a model call. `steps`: the sampler's `LinearSteps` (x_{i+1} = a_i x_i + b_i out_i),
    which enables the correction of predicted steps (``config.correct``): at a computed step the
    output used is f_n + sum_l c_l [f_n, H]_l. With `steps` and no `step_fn` the step is `steps.apply`.
    `weights`: learned prediction weights (`abcore.fit_weights`), see `abcore.schedule`.
    """
    t = as_grid(grid)
    n = t.size - 1
    if step_fn is None and steps is None:
        raise ValueError("step_fn is required unless steps=LinearSteps(...) gives the step")
    sched = schedule(config, t[:-1], steps, weights=weights)
    x = np.asarray(x)
    state = begin(sched)
    history: list[np.ndarray] = []
    computed = np.zeros(n, dtype=bool)
    outputs: list[np.ndarray] = []
    for i in range(n):
        decision = decide(sched, state, i)
        out = None
        if not decision.compute:
            out = _weighted(decision.weights, history)
            if config.tolerance is not None:
                delta = _weighted(decision.error_weights, history)
                if not joint(np.sum(delta**2), np.sum(out**2), config.tolerance):
                    out = None
            if out is not None and not np.all(np.isfinite(out)):
                out = None
        if out is None:
            f = np.asarray(model_fn(x, float(t[i])))
            out = f + _weighted(decision.correction, [f, *history]) if sched.correct else f
            history = [f, *history][: config.order]
            computed[i] = True
        state = complete(sched, state, i, computed[i])
        outputs.append(out)
        if step_fn is None:
            x = cast(LinearSteps, steps).apply(i, x, out)
        else:
            x = step_fn(x, out, float(t[i]), float(t[i + 1]))
        if callback is not None:
            callback(i, x, out)
    return Trajectory(x, computed, outputs)
