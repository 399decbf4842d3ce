"""Tests of the demo's quality metrics (abcache_examples.metrics)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from abcache_examples.metrics import (
    REFERENCE_DATA,
    FeatureStats,
    accuracy,
    classifier_accuracy,
    classifier_features,
    classifier_for,
    classifier_logits,
    compute_reference_stats,
    feature_stats,
    frechet_distance,
    frechet_distance_of_stats,
    load_reference_stats,
    psnr,
    save_reference_stats,
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


def test_frechet_distance_needs_two_rows() -> None:
    # the covariance of one feature vector is undefined: `abcache demo --batch 1` crashed here (issue 17)
    with pytest.raises(ValueError, match="feats_a needs at least 2 rows"):
        frechet_distance(np.zeros((1, 3)), np.zeros((5, 3)))
    with pytest.raises(ValueError, match="feats needs at least 2 rows"):
        feature_stats(np.zeros((1, 3)))


def test_frechet_distance_of_stats_equals_that_of_the_features() -> None:
    rng = np.random.default_rng(5)
    a, b = rng.standard_normal((300, 5)), rng.standard_normal((200, 5)) @ rng.standard_normal((5, 5)) + 0.5
    stats = feature_stats(a)
    np.testing.assert_allclose(stats.mean, a.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(stats.cov, np.cov(a.T), rtol=1e-12)
    assert stats.n == 300
    assert frechet_distance_of_stats(stats, feature_stats(b)) == frechet_distance(a, b)
    with pytest.raises(ValueError, match="same D"):
        frechet_distance_of_stats(stats, feature_stats(b[:, :4]))


def _frechet_scipy(a: FeatureStats, b: FeatureStats) -> float:
    """The FID formula as pytorch-fid computes it: ``scipy.linalg.sqrtm`` of the product ``S_a S_b``."""
    from scipy import linalg

    root = linalg.sqrtm(a.cov @ b.cov)
    diff = a.mean - b.mean
    return float(diff @ diff + np.trace(a.cov) + np.trace(b.cov) - 2.0 * np.trace(root.real))


@pytest.mark.filterwarnings("ignore:Matrix is singular")  # dead ReLU features: scipy warns, and is still exact
@pytest.mark.parametrize("classifier", sorted(REFERENCE_DATA))
def test_frechet_distance_to_shipped_reference_matches_scipy(classifier: str) -> None:
    # the shipped statistics are real 64- / 128-dimensional ReLU features (some rarely active): compare our
    # eigen-decomposition route with scipy's sqrtm on them and on Gaussians drawn around them
    reference = load_reference_stats(classifier)
    rng = np.random.default_rng(6)
    d = reference.mean.shape[0]
    mix = np.eye(d) + 0.1 * rng.standard_normal((d, d))
    samples = rng.multivariate_normal(reference.mean + 0.2, mix @ reference.cov @ mix.T, size=4000)
    stats = feature_stats(samples)
    ours = frechet_distance_of_stats(stats, reference)
    assert ours > 1.0
    assert ours == pytest.approx(_frechet_scipy(stats, reference), rel=1e-6)
    assert abs(frechet_distance_of_stats(reference, reference)) < 1e-6 * np.trace(reference.cov)


@pytest.mark.parametrize("classifier", sorted(REFERENCE_DATA))
def test_shipped_reference_stats_equal_recomputed(classifier: str, request: pytest.FixtureRequest) -> None:
    data, split = REFERENCE_DATA[classifier]
    if data == "fashion":
        request.getfixturevalue("fashion_test")  # skips where Fashion-MNIST is not installed
    shipped, recomputed = load_reference_stats(classifier), compute_reference_stats(classifier)
    assert shipped.n == recomputed.n == {"all": 1797, "test": 10_000}[split]
    scale = np.abs(recomputed.cov).max()
    np.testing.assert_allclose(shipped.mean, recomputed.mean, rtol=1e-6, atol=1e-9 * scale)
    np.testing.assert_allclose(shipped.cov, recomputed.cov, rtol=1e-6, atol=1e-9 * scale)


def test_reference_stats_round_trip_and_reject_unknown_classifiers(tmp_path) -> None:
    stats = feature_stats(np.random.default_rng(7).standard_normal((50, 3)))
    path = save_reference_stats(stats, "fashion_classifier", tmp_path)
    assert path.name == "fashion_classifier_reference.safetensors"
    loaded = load_reference_stats("fashion_classifier", tmp_path)
    np.testing.assert_array_equal(loaded.mean, stats.mean)
    np.testing.assert_array_equal(loaded.cov, stats.cov)
    assert loaded.n == 50
    with pytest.raises(ValueError, match="classifier must be one of"):
        load_reference_stats("fashion")


def test_each_model_is_scored_by_the_classifier_of_its_data() -> None:
    from abcache_examples.models import FASHION_MODELS, FLOW_MODELS, UNET_MODELS, load_classifier

    assert {m: classifier_for(m) for m in (*FLOW_MODELS, *UNET_MODELS)} == {
        "fashion": "fashion_classifier",
        "flow": "classifier",
        "flow_ema": "classifier",
        "eps": "classifier",
        "v": "classifier",
    }
    assert FASHION_MODELS == ("fashion", "fashion_classifier")
    with pytest.raises(ValueError, match="model must be one of"):
        classifier_for("classifier")
    # the fashion classifier reads 28x28 images and has 128 features: the reference statistics match it
    clf = load_classifier(name="fashion_classifier")
    feats = classifier_features(np.zeros((2, 1, 28, 28), np.float32), clf)
    assert feats.shape == (2, 128) == (2, load_reference_stats("fashion_classifier").mean.shape[0])


def test_fashion_classifier_on_the_test_split(fashion_test) -> None:
    from abcache_examples.models import load_classifier

    x, y = fashion_test
    clf = load_classifier(name="fashion_classifier")
    real = classifier_features(x, clf)  # one pass over the 10,000 images: the logits are the head of the features
    logits = clf.head(torch.from_numpy(real).float())
    torch.testing.assert_close(logits[:100], classifier_logits(x[:100], clf), rtol=1e-4, atol=1e-4)
    assert accuracy(logits, y) >= 0.85
    assert accuracy(logits, (y + 1) % 10) < 0.1
    # features separate real clothes from noise far more than two halves of the test split
    noise = classifier_features(np.random.default_rng(0).uniform(-1, 1, (1000, 1, 28, 28)).astype(np.float32), clf)
    half = len(real) // 2
    assert frechet_distance(real[:half], real[half:]) * 5 < frechet_distance(real, noise)
    # a Scorer for `fashion` measures that distance against the shipped test-split statistics
    from abcache_examples.compare import Run, Scorer

    run = Run("real", "fashion", 0.0, 0.0, x[:1000])
    fd_real = Scorer("fashion").score(run, run, y[:1000]).scores
    assert fd_real["accuracy"] >= 0.85
    assert fd_real["fd"] * 5 < frechet_distance(real, noise)
