"""The learned-weights opt-in (`abcore.fit_weights`) through `ContextState`: parity with `abcore.sample`."""

from __future__ import annotations

import abcore
import numpy as np
import torch
from abcache_torch import ContextState
from abcore.testing import parity_model

N = 12
GRID = np.linspace(1.0, 0.0, N + 1) ** 2
STEPS = abcore.LinearSteps.euler(GRID)


def test_context_state_runs_learned_weights_like_abcore_sample() -> None:
    config = abcore.ABConfig(calls=5)
    sched = abcore.schedule(config, GRID[:-1], STEPS)
    rng = np.random.default_rng(0)
    full = abcore.ABConfig(interval=1, cooldown=0)
    recorded = [
        np.stack(abcore.sample(parity_model, x, GRID, None, full, steps=STEPS).outputs) for x in rng.normal(size=(3, 4))
    ]
    weights = abcore.fit_weights(sched, np.stack(recorded))
    learned = abcore.schedule(config, GRID[:-1], STEPS, weights=weights)
    assert not np.allclose(weights[~sched.forced], 0.0)
    x0 = np.linspace(-1.0, 1.0, 4)
    reference = abcore.sample(parity_model, x0, GRID, None, config, steps=STEPS, weights=weights)

    state, x, calls = ContextState(learned), torch.tensor(x0, dtype=torch.float64), 0
    for i in range(N):
        leaves = state.predict(i)
        if leaves is None:
            calls += 1
            out = state.record(i, parity_model(x, float(GRID[i]), torch))
        else:
            out = state.skip(i, leaves)
        x = STEPS.apply(i, x, out)
    assert calls == int(reference.computed.sum()) == 5
    np.testing.assert_allclose(x.numpy(), reference.x, rtol=1e-12, atol=1e-12)
