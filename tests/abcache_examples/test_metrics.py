"""Tests of the demo's quality metrics (abcache_examples.metrics)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from abcache_examples.metrics import (
    accuracy,
    classifier_accuracy,
    classifier_features,
    frechet_distance,
    psnr,
    ssim,
)


def _images(seed: int, n: int = 4, c: int = 1, size: int = 16) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-1, 1, (n, c, size, size))


def test_psnr_identical_is_inf() -> None:
    x = _images(0)
    assert psnr(x, x) == math.inf


def test_psnr_known_values() -> None:
    x = np.zeros((2, 1, 8, 8))
    y = x.copy()
    y[0] += 0.1  # MSE 0.01 -> 10 log10(4 / 0.01) = 26.0206 dB
    y[1] += 0.2  # MSE 0.04 -> 10 log10(4 / 0.04) = 20 dB
    expected = (10 * math.log10(400) + 20.0) / 2
    assert psnr(x, y) == pytest.approx(expected, abs=1e-12)
    # data_range 1: 10 log10(1 / 0.01) = 20, 10 log10(1 / 0.04) = 13.979
    assert psnr(x, y, data_range=1.0) == pytest.approx((20.0 + 10 * math.log10(25)) / 2, abs=1e-12)
    # torch tensors give the same value
    assert psnr(torch.from_numpy(x), torch.from_numpy(y)) == pytest.approx(expected, abs=1e-12)


def test_psnr_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="same shape"):
        psnr(np.zeros((1, 1, 4, 4)), np.zeros((1, 1, 4, 5)))
    with pytest.raises(ValueError, match="data_range"):
        psnr(np.zeros((1, 1, 4, 4)), np.zeros((1, 1, 4, 4)), data_range=0.0)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ssim_matches_skimage(seed: int) -> None:
    metrics = pytest.importorskip("skimage.metrics")
    x = _images(seed, n=3, c=2)
    y = np.clip(x + 0.3 * np.random.default_rng(seed + 10).standard_normal(x.shape), -1, 1)
    ours = ssim(x, y, data_range=2.0)
    ref = np.mean(
        [
            metrics.structural_similarity(
                x[i, c], y[i, c], data_range=2.0, gaussian_weights=True, sigma=1.5, use_sample_covariance=False
            )
            for i in range(x.shape[0])
            for c in range(x.shape[1])
        ]
    )
    assert 0.0 < ours < 0.99
    assert ours == pytest.approx(ref, abs=1e-3)


def test_ssim_identical_is_one_and_drops_with_noise() -> None:
    x = _images(3)
    assert ssim(x, x) == pytest.approx(1.0, abs=1e-12)
    noise = np.random.default_rng(4).standard_normal(x.shape)
    assert ssim(x, x + 0.05 * noise) > ssim(x, x + 0.5 * noise)


def test_ssim_rejects_small_images() -> None:
    with pytest.raises(ValueError, match="too small"):
        ssim(np.zeros((1, 1, 8, 8)), np.zeros((1, 1, 8, 8)))


def test_frechet_distance_identical_sets_is_zero() -> None:
    f = np.random.default_rng(0).standard_normal((500, 8))
    assert abs(frechet_distance(f, f)) < 1e-8


def test_frechet_distance_of_shifted_gaussians() -> None:
    # same sample shifted by a constant: covariances equal, so d^2 = |mu diff|^2 exactly
    f = np.random.default_rng(1).standard_normal((400, 6)) @ np.diag([1.0, 2.0, 0.5, 1.0, 3.0, 1.0])
    shift = np.array([1.0, -2.0, 0.5, 0.0, 0.0, 3.0])
    assert frechet_distance(f, f + shift) == pytest.approx(float(shift @ shift), rel=1e-8)


def test_frechet_distance_scaled_gaussians_analytic() -> None:
    # N(0, I) against N(mu, 4 I) in D dims: |mu|^2 + D (1 + 4 - 2 * 2) = |mu|^2 + D
    rng = np.random.default_rng(2)
    d = 4
    a = rng.standard_normal((200_000, d))
    b = 2.0 * rng.standard_normal((200_000, d)) + 1.0
    assert frechet_distance(a, b) == pytest.approx(d * 1.0 + d, rel=0.02)


def test_frechet_distance_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError, match="same D"):
        frechet_distance(np.zeros((5, 3)), np.zeros((5, 4)))


def test_accuracy_counts_argmax_hits() -> None:
    logits = np.array([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7], [0.6, 0.4]])
    assert accuracy(logits, [1, 0, 0, 0]) == 0.75
    with pytest.raises(ValueError, match="logits"):
        accuracy(logits, [1, 0])


def test_classifier_on_held_out_digits() -> None:
    from abcache_examples.data import load_digits16

    x, y = load_digits16("test")
    assert classifier_accuracy(x, y) > 0.95
    # a wrong labelling scores near chance
    assert classifier_accuracy(x, (y + 1) % 10) < 0.1
    feats = classifier_features(x[:50])
    assert feats.shape == (50, 64)
    assert np.isfinite(feats).all()
    # features separate real digits from noise far more than two halves of the real data
    real = classifier_features(x)
    noise = classifier_features(np.random.default_rng(0).uniform(-1, 1, x.shape).astype(np.float32))
    half = len(real) // 2
    assert frechet_distance(real[:half], real[half:]) * 5 < frechet_distance(real, noise)
