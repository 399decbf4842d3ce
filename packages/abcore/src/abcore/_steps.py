"""`LinearSteps`: a sampler step that is linear in the model output, x_{j+1} = a_j x_j + b_j out_j.

The correction of predicted steps (`ABConfig(correct=True)`) needs exactly these two numbers per step:
an error e_j in the output used at step j moves the state at step n > j by (prod_{l=j+1}^{n-1} a_l) b_j e_j.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from abcore._validate import as_times

Prediction = Literal["epsilon", "sample", "v_prediction"]
PREDICTIONS: tuple[str, ...] = ("epsilon", "sample", "v_prediction")


@dataclass(frozen=True, eq=False)
class LinearSteps:
    """x_{j+1} = a[j] * x_j + b[j] * out_j for each of the n steps (float64, shape (n,)).

    Build it with `LinearSteps.euler(grid)` (flow matching, a = 1, b = sigma_{j+1} - sigma_j) or
    `LinearSteps.ddim(alphas, sigmas, prediction)` (deterministic DDIM, eta = 0, without clipping).
    Every b[j] must be non-zero: the correction is folded into the output of a computed step n as
    out_n = f_n + a_n C / b_n.
    """

    a: np.ndarray
    b: np.ndarray

    def __post_init__(self) -> None:
        a = np.asarray(self.a, dtype=np.float64)
        b = np.asarray(self.b, dtype=np.float64)
        if a.ndim != 1 or a.shape != b.shape or a.size == 0:
            raise ValueError(f"a and b must be 1-D arrays of one entry per step, got shapes {a.shape} and {b.shape}")
        if not (np.all(np.isfinite(a)) and np.all(np.isfinite(b))):
            raise ValueError("a and b must be finite")
        if np.any(b == 0.0):
            raise ValueError(f"b must be non-zero at every step (the step must use the model output), got {b.tolist()}")
        a.setflags(write=False)
        b.setflags(write=False)
        object.__setattr__(self, "a", a)
        object.__setattr__(self, "b", b)

    @property
    def num_steps(self) -> int:
        return int(self.a.size)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, LinearSteps) and np.array_equal(self.a, other.a) and np.array_equal(self.b, other.b)

    def __hash__(self) -> int:
        return hash((self.a.tobytes(), self.b.tobytes()))

    @classmethod
    def euler(cls, grid: Any) -> LinearSteps:
        """Euler on dx/dsigma = v over the n + 1 grid values: a = 1, b = grid[j+1] - grid[j]."""
        g = as_times(grid, "grid")
        if g.size < 2:
            raise ValueError(f"grid must hold n + 1 >= 2 values for n steps, got {g.size}")
        return cls(np.ones(g.size - 1), np.diff(g))

    @classmethod
    def ddim(cls, alphas: Any, sigmas: Any, prediction: Prediction = "epsilon") -> LinearSteps:
        """Deterministic DDIM (eta = 0) on x = alpha x0 + sigma eps, over n + 1 values of alpha and sigma.

        With x0 = (x - sigma eps) / alpha and x_{j+1} = alpha' x0 + sigma' eps:
        - "epsilon": a = alpha'/alpha, b = sigma' - a sigma;
        - "sample" (x0): a = sigma'/sigma, b = alpha' - a alpha;
        - "v_prediction" (v = alpha eps - sigma x0, alpha^2 + sigma^2 = 1): a = alpha' alpha + sigma' sigma,
          b = sigma' alpha - alpha' sigma.
        """
        al = np.asarray(alphas, dtype=np.float64)
        si = np.asarray(sigmas, dtype=np.float64)
        if al.ndim != 1 or al.shape != si.shape or al.size < 2:
            raise ValueError(f"alphas and sigmas must be 1-D of n + 1 >= 2 values, got {al.shape} and {si.shape}")
        for name, values in (("alphas", al), ("sigmas", si)):
            if not np.all(np.isfinite(values)):
                raise ValueError(f"{name} must be finite (no NaN or inf), got {values.tolist()}")
        if np.any(al < 0) or np.any(si < 0) or np.any(al[:-1] == 0):
            raise ValueError("alphas must be positive before the last value and sigmas non-negative")
        a0, a1, s0, s1 = al[:-1], al[1:], si[:-1], si[1:]
        if prediction == "epsilon":
            a = a1 / a0
            return cls(a, s1 - a * s0)
        if prediction == "sample":
            if np.any(s0 == 0):
                raise ValueError("sigmas must be positive before the last value for prediction='sample'")
            a = s1 / s0
            return cls(a, a1 - a * a0)
        if prediction == "v_prediction":
            return cls(a1 * a0 + s1 * s0, s1 * a0 - a1 * s0)
        raise ValueError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}")

    def apply(self, j: int, x: Any, out: Any) -> Any:
        """The step itself: a[j] * x + b[j] * out (for reference loops and tests)."""
        return float(self.a[j]) * x + float(self.b[j]) * out
