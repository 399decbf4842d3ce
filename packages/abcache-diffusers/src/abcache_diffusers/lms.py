"""diffusers' LMS scheduler on exact multistep coefficients instead of numerical quadrature."""

from __future__ import annotations

import abcore
import numpy as np
import torch
from diffusers import LMSDiscreteScheduler
from diffusers import SchedulerMixin as SchedulerMixin  # from_pretrained finds a component's base class in its module


class ExactLMSDiscreteScheduler(LMSDiscreteScheduler):
    r"""
    [`LMSDiscreteScheduler`] whose linear multistep coefficients are exact, not integrated by `scipy.integrate.quad`.

    The coefficient of the derivative at sigma_{t-j} in the order-m step from sigma_t to sigma_{t+1} is
    \int_{sigma_t}^{sigma_{t+1}} l_j(s) ds, l_j the Lagrange basis through sigma_t, ..., sigma_{t-m+1}
    (variable-step Adams-Bashforth of order m, the AB-Cache paper's Appendix A). diffusers integrates it
    numerically in float32 at every step; this class takes it from `abcore.multistep_table`, computed in
    closed form and float64 once per schedule (and per order, for a `step(order=...)` other than 4).
    Everything else (sigmas, `step`, `order`) is [`LMSDiscreteScheduler`]'s, so results agree with it up
    to its quadrature's float32 rounding (1e-7). Where two sigmas are equal (Stable Diffusion 1.5's
    `steps_offset=1` with "leading" spacing, or `set_timesteps(1000)`) the Lagrange basis is not defined and the
    coefficient is diffusers' own quadrature, as in [`LMSDiscreteScheduler`].

    Example:

    ```python
    from abcache_diffusers import ExactLMSDiscreteScheduler

    pipe.scheduler = ExactLMSDiscreteScheduler.from_config(pipe.scheduler.config)
    ```

    A config saved from this scheduler names this class, so load it with this class as well.
    """

    sigmas: torch.Tensor
    _exact_lms_tables: tuple[torch.Tensor, dict[int, np.ndarray | None]]  # the sigmas they were built from, tables

    def get_lms_coefficient(self, order: int, t: int, current_order: int) -> float:
        """W[t, current_order] of the order-`order` table of `self.sigmas` (`abcore.multistep_table`)."""
        if not 1 <= order <= t + 1 or not 0 <= current_order < order:
            raise ValueError(
                f"order must be in 1..t + 1 = {t + 1} (the step's available derivatives) and current_order in "
                f"0..order - 1, got order={order!r}, t={t!r}, current_order={current_order!r}"
            )
        # A start-up row (order t + 1) is row t of every table of order >= t + 1: take it from the table of
        # `step`'s default order 4, so that one table serves a whole default run.
        table = self._lms_table(max(order, 4) if order == t + 1 else order)
        if table is None:
            return float(LMSDiscreteScheduler.get_lms_coefficient(self, order, t, current_order))
        return float(table[t, current_order])

    def _lms_table(self, order: int) -> np.ndarray | None:
        """The order-`order` table of the current sigmas, or None where they are not strictly monotonic."""
        sigmas = self.sigmas
        cached = self.__dict__.get("_exact_lms_tables")
        if cached is None or cached[0] is not sigmas:  # set_timesteps assigns new sigmas
            cached = self._exact_lms_tables = (sigmas, {})
        tables = cached[1]
        if order not in tables:
            values = sigmas.detach().cpu().double().numpy()
            steps = np.diff(values)
            monotonic = bool(np.all(steps > 0) or np.all(steps < 0))
            tables[order] = abcore.multistep_table(values, order) if monotonic else None
        return tables[order]
