"""Learned prediction weights (opt-in): per predicted step, least-squares weights over the stored outputs.

The calibration-free rule predicts step j by Lagrange extrapolation through the last k computed outputs
(Eq. 3.5). On a fixed schedule the same k outputs feed step j in every run, so weights fitted on a few
recorded full trajectories (L2P-Cache's idea) can replace the Lagrange ones:

    w_j = argmin_w sum over the recorded runs || f_j - sum_l w_l f_{m_l} ||^2,

m_1 > m_2 > ... the computed steps before j (newest first, as the rule's history). Exact data from a
polynomial of degree < k in the abscissa gives back the Lagrange weights. The correction stays on top:
a computed step n adds (a_n / b_n) sum_j s_j (w~_j - [0, w_j]) with the fitted w_j in place of the Lagrange
ones (`abcore.theory.correction_weights` with ``used``), precomputed per step since the schedule is fixed.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def history_steps(forced: np.ndarray, order: int) -> list[list[int]]:
    """For each step j, the last `order` computed steps before it, newest first."""
    computed: list[int] = []
    out = []
    for j, flag in enumerate(forced):
        out.append(computed[::-1][:order])
        if flag:
            computed.append(j)
    return out


def fit_weights(schedule: Any, outputs: Any) -> np.ndarray:
    """(n, order) least-squares prediction weights of a fixed `schedule` from recorded full trajectories.

    `outputs`: the model's output at every one of the n steps of full runs (every step computed) on the
    schedule's grid: shape (n, ...) for one run or (runs, n, ...), any trailing shape (images, channels,
    pixels; both guidance branches stacked if the runs are guided). Rows of computed steps are zero. Raises
    ValueError for an adaptive schedule (its predicted steps are not known in advance) or a wrong shape.
    """
    config = schedule.config
    if config.adaptive or schedule.forced is None:
        raise ValueError("learned weights need a fixed schedule on a known number of steps (not the adaptive mode)")
    f = np.asarray(outputs, dtype=np.float64)
    n = schedule.num_steps
    if not (f.ndim >= 2 and f.shape[1] == n) and f.ndim >= 1 and f.shape[0] == n:
        f = f[None]  # one run
    if f.ndim < 2 or f.shape[1] != n:
        raise ValueError(f"outputs must have shape (n, ...) or (runs, n, ...) with n = {n} steps, got {f.shape}")
    if not np.all(np.isfinite(f)):
        raise ValueError("outputs must be finite")
    f = np.moveaxis(f, 1, 0).reshape(n, -1)  # (n, runs * elements)
    weights = np.zeros((n, config.order))
    for j, nodes in enumerate(history_steps(schedule.forced, config.order)):
        if schedule.forced[j] or not nodes:
            continue
        basis = f[nodes].T  # (samples, m)
        solution, *_ = np.linalg.lstsq(basis, f[j], rcond=None)
        weights[j, : len(nodes)] = solution
    return weights
