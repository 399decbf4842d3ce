"""Noise-schedule helpers: lambda abscissas and Proposition 1's scale factor (Eq. 3.3)."""

from __future__ import annotations

import abcore
import numpy as np
import pytest
from abcore import theory

ALPHAS_CUMPROD = np.cumprod(1.0 - np.linspace(1e-4, 0.02, 1000))  # DDPM linear schedule


def test_lambda_from_alphas_cumprod_is_half_log_snr() -> None:
    abar = np.array([0.999, 0.5, 1e-4])
    alpha, sigma = np.sqrt(abar), np.sqrt(1 - abar)
    np.testing.assert_allclose(abcore.lambda_from_alphas_cumprod(abar), np.log(alpha / sigma), rtol=1e-12)
    assert abcore.lambda_from_alphas_cumprod([0.5])[0] == 0.0


def test_lambda_from_sigma_is_minus_log_sigma() -> None:
    np.testing.assert_allclose(abcore.lambda_from_sigma([14.6, 1.0, 0.03]), -np.log([14.6, 1.0, 0.03]))


def test_scale_factor_is_u_shaped_on_a_ddpm_schedule() -> None:
    r = theory.scale_factor_curve(ALPHAS_CUMPROD, np.arange(980, -1, -20))
    assert r.shape == (48,)
    deviation = np.abs(r - 1.0)
    n = r.size
    middle = deviation[n // 4 : 3 * n // 4]
    assert middle.max() < 0.02  # ~1 mid-trajectory
    assert n // 4 <= np.argmin(deviation) < 3 * n // 4
    assert deviation[:3].min() > 2 * middle.min()  # departs at the start...
    assert deviation[-3:].min() > 10 * middle.max()  # ...and strongly at the end
    # Monotone on each arm of the U.
    assert np.all(np.diff(deviation[: np.argmin(deviation)]) < 0)
    assert np.all(np.diff(deviation[np.argmin(deviation) : -1]) > 0)


def test_scale_factor_tends_to_one_for_small_steps() -> None:
    lam = abcore.lambda_from_alphas_cumprod(ALPHAS_CUMPROD[500])
    for h, bound in [(1e-2, 2e-2), (1e-3, 2e-3), (1e-4, 2e-4)]:
        lam_t = lam + 2 * h  # lambda_o = lam, lambda_s = lam + h, lambda_t = lam + 2h
        alpha_t, sigma_t = 1 / np.sqrt(1 + np.exp(-2 * lam_t)), 1 / np.sqrt(1 + np.exp(2 * lam_t))
        assert abs(theory.scale_factor(alpha_t, sigma_t, lam, h) - 1.0) < bound


@pytest.mark.parametrize("bad", [[0.5, 1.0], [0.0, 0.5], [-0.1]])
def test_lambda_from_alphas_cumprod_rejects_out_of_range(bad: list[float]) -> None:
    with pytest.raises(ValueError, match="alphas_cumprod"):
        abcore.lambda_from_alphas_cumprod(bad)


def test_lambda_from_sigma_rejects_non_positive() -> None:
    with pytest.raises(ValueError, match="sigma"):
        abcore.lambda_from_sigma([1.0, 0.0])
