"""Noise-schedule quantities: the abscissas extrapolation runs on, and Proposition 1's r.

Abscissas (what `times` means for a plan):
- flow matching (x_t = (1 - sigma) x0 + sigma noise, model output = velocity):
  sigma itself (FLUX, SD3, Wan's shifted grids included);
- DDIM / DPM-Solver / UniPC type schedules (x_t = alpha_t x0 + sigma_t eps):
  the half log-SNR lambda = log(alpha_t / sigma_t), Eq. 3.1's variable.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def lambda_from_alphas_cumprod(alphas_cumprod: Any) -> np.ndarray:
    """lambda = log(alpha / sigma) = 0.5 * log(abar / (1 - abar)) for a VP schedule."""
    abar = np.asarray(alphas_cumprod, dtype=np.float64)
    if np.any((abar <= 0) | (abar >= 1)):
        raise ValueError("alphas_cumprod must lie strictly between 0 and 1")
    return 0.5 * (np.log(abar) - np.log1p(-abar))


def lambda_from_sigma(sigma: Any) -> np.ndarray:
    """lambda = -log(sigma) for a variance-exploding (Karras / k-diffusion) sigma."""
    s = np.asarray(sigma, dtype=np.float64)
    if np.any(s <= 0):
        raise ValueError("sigma must be positive")
    return -np.log(s)


def scale_factor(alpha_t: Any, sigma_t: Any, lambda_o: Any, h: Any) -> np.ndarray:
    """Proposition 1's coefficient r (Eq. 3.3), eps_s ~ r * eps_o + O(h^2).

    r = alpha_t h / (3 e^{-h} alpha_t h - 2 sigma_t e^{lambda_o} (e^h - 1)),
    with h = lambda_t - lambda_s = lambda_s - lambda_o the step in lambda. Along a
    schedule r stays near 1 mid-trajectory and departs from it at both ends: the
    U-shape of the paper's Fig. 5.
    """
    a, s, lo, hh = (np.asarray(v, dtype=np.float64) for v in (alpha_t, sigma_t, lambda_o, h))
    return a * hh / (3.0 * np.exp(-hh) * a * hh - 2.0 * s * np.exp(lo) * np.expm1(hh))


def scale_factor_curve(alphas_cumprod: Any, timesteps: Any) -> np.ndarray:
    """r along a sampling grid: for consecutive timesteps (o, s, t) of `timesteps`.

    `alphas_cumprod` is indexed by the integer `timesteps` (a diffusers-style DDPM
    schedule). Returns len(timesteps) - 2 values; the step h is taken per triple
    as lambda_t - lambda_s.
    """
    abar = np.asarray(alphas_cumprod, dtype=np.float64)[np.asarray(timesteps, dtype=np.int64)]
    lam = lambda_from_alphas_cumprod(abar)
    alpha, sigma = np.sqrt(abar), np.sqrt(1.0 - abar)
    return scale_factor(alpha[2:], sigma[2:], lam[:-2], lam[2:] - lam[1:-1])
