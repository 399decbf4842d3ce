"""Quality metrics for the demo: PSNR, SSIM, Frechet distance on classifier features, classifier accuracy.

Images are channel-first arrays or tensors ``(N, ..., H, W)``: the first axis indexes images, the last two are
spatial; any axes between (channels) are averaged over. PSNR and SSIM are computed per image, then averaged
over the batch. ``data_range`` is the value range of the images: 2.0 for the models' [-1, 1] outputs
(``output_type="latent"``), 1.0 for [0, 1] images.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from scipy.ndimage import gaussian_filter

from .models import DigitClassifier, load_classifier


def _numpy(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().to(torch.float64).numpy()
    return np.asarray(x, dtype=np.float64)


def _pair(a: Any, b: Any) -> tuple[np.ndarray, np.ndarray]:
    a, b = _numpy(a), _numpy(b)
    if a.shape != b.shape:
        raise ValueError(f"a and b must have the same shape, got {a.shape} and {b.shape}")
    if a.ndim < 3:
        raise ValueError(f"images must be (N, ..., H, W) with at least 3 axes, got shape {a.shape}")
    return a, b


def _check_range(data_range: float) -> None:
    if not data_range > 0:
        raise ValueError(f"data_range must be positive, got {data_range}")


def psnr(a: Any, b: Any, data_range: float = 2.0) -> float:
    """Mean over images of ``10 log10(data_range^2 / MSE_i)``, MSE_i over each image's pixels (dB).

    Identical images give ``inf`` (and so does the mean if any image is identical).
    """
    _check_range(data_range)
    a, b = _pair(a, b)
    mse = ((a - b) ** 2).reshape(a.shape[0], -1).mean(axis=1)
    with np.errstate(divide="ignore"):
        per_image = 10.0 * np.log10(data_range**2 / mse)
    return float(per_image.mean())


def ssim(a: Any, b: Any, data_range: float = 2.0, sigma: float = 1.5, truncate: float = 3.5) -> float:
    """Structural similarity (Wang et al. 2004) with a Gaussian window, mean over images (and channels).

    ``SSIM = (2 mu_a mu_b + C1)(2 cov_ab + C2) / ((mu_a^2 + mu_b^2 + C1)(var_a + var_b + C2))`` with local
    statistics from a Gaussian window of std ``sigma`` (``truncate`` stds, reflected edges),
    ``C1 = (0.01 L)^2``, ``C2 = (0.03 L)^2``, ``L = data_range``; the map is averaged after cropping
    ``(win_size - 1) / 2`` border pixels. This matches ``skimage.metrics.structural_similarity(...,
    gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=L)``.
    """
    _check_range(data_range)
    if not sigma > 0:
        raise ValueError(f"sigma must be positive, got {sigma}")
    a, b = _pair(a, b)
    pad = int(truncate * sigma + 0.5)
    if min(a.shape[-2:]) <= 2 * pad:
        raise ValueError(f"images of size {a.shape[-2:]} are too small for a window of radius {pad}")
    a = a.reshape(-1, *a.shape[-2:])
    b = b.reshape(-1, *b.shape[-2:])
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    per_plane = np.empty(a.shape[0])
    for i, (x, y) in enumerate(zip(a, b, strict=True)):

        def blur(z: np.ndarray) -> np.ndarray:
            return gaussian_filter(z, sigma=sigma, truncate=truncate, mode="reflect")

        mx, my = blur(x), blur(y)
        vx, vy, cxy = blur(x * x) - mx * mx, blur(y * y) - my * my, blur(x * y) - mx * my
        s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
        per_plane[i] = s[pad:-pad, pad:-pad].mean()
    return float(per_plane.mean())


def _sqrtm_psd(c: np.ndarray) -> np.ndarray:
    """Symmetric square root of a symmetric positive semi-definite matrix (negative eigenvalues clipped)."""
    w, v = np.linalg.eigh(c)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance(feats_a: Any, feats_b: Any) -> float:
    """Frechet distance between Gaussians fitted to two feature sets ``(N, D)`` (the FID formula).

    ``d^2 = |mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a^1/2 S_b S_a^1/2)^1/2)`` with unbiased covariances; the
    trace of ``(S_a S_b)^1/2`` is computed through the symmetric matrix ``S_a^1/2 S_b S_a^1/2`` (same
    eigenvalues), which keeps it real and stable.
    """
    fa, fb = _numpy(feats_a), _numpy(feats_b)
    if fa.ndim != 2 or fb.ndim != 2 or fa.shape[1] != fb.shape[1]:
        raise ValueError(f"feats_a and feats_b must be (N, D) with the same D, got {fa.shape} and {fb.shape}")
    if min(fa.shape[0], fb.shape[0]) < 2:
        raise ValueError("feats_a and feats_b need at least 2 rows each")
    mu_a, mu_b = fa.mean(axis=0), fb.mean(axis=0)
    cov_a, cov_b = np.cov(fa, rowvar=False), np.cov(fb, rowvar=False)
    root_a = _sqrtm_psd(cov_a)
    middle = root_a @ cov_b @ root_a
    tr_cross = np.sqrt(np.clip(np.linalg.eigvalsh((middle + middle.T) / 2), 0.0, None)).sum()
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2.0 * tr_cross)


def _images_tensor(images: Any, classifier: torch.nn.Module) -> torch.Tensor:
    x = images if isinstance(images, torch.Tensor) else torch.as_tensor(np.asarray(images))
    if x.ndim != 4:
        raise ValueError(f"images must be (N, 1, 16, 16) in [-1, 1], got shape {tuple(x.shape)}")
    param = next(classifier.parameters())
    return x.to(device=param.device, dtype=param.dtype)


@torch.no_grad()
def classifier_logits(images: Any, classifier: DigitClassifier | None = None, batch_size: int = 512) -> torch.Tensor:
    """Logits ``(N, 10)`` of the shipped classifier for images ``(N, 1, 16, 16)`` in [-1, 1]."""
    classifier = classifier or load_classifier()
    x = _images_tensor(images, classifier)
    return torch.cat([classifier(chunk) for chunk in x.split(batch_size)]).cpu()


@torch.no_grad()
def classifier_features(images: Any, classifier: DigitClassifier | None = None, batch_size: int = 512) -> np.ndarray:
    """Penultimate-layer features ``(N, 64)`` of the shipped classifier, for :func:`frechet_distance`."""
    classifier = classifier or load_classifier()
    x = _images_tensor(images, classifier)
    return torch.cat([classifier.features(chunk) for chunk in x.split(batch_size)]).cpu().double().numpy()


def accuracy(logits: Any, labels: Any) -> float:
    """Fraction of rows whose argmax equals the label."""
    logits, labels = _numpy(logits), _numpy(labels).astype(np.int64).reshape(-1)
    if logits.ndim != 2 or logits.shape[0] != labels.shape[0]:
        raise ValueError(f"logits must be (N, K) with N = len(labels), got {logits.shape} and {labels.shape}")
    return float((logits.argmax(axis=1) == labels).mean())


def classifier_accuracy(images: Any, labels: Any, classifier: DigitClassifier | None = None) -> float:
    """Accuracy of the shipped classifier on images ``(N, 1, 16, 16)`` in [-1, 1] against ``labels``."""
    return accuracy(classifier_logits(images, classifier), labels)
