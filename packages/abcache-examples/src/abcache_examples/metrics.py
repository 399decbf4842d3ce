"""Quality metrics for the demo: PSNR, SSIM, Frechet distance on classifier features, classifier accuracy.

Each zoo model is scored by one shipped classifier (:func:`classifier_for`: Fashion-MNIST's for ``fashion``, the
digits' for the others); its Frechet distance compares the samples' features with the shipped statistics of the
real images' features (:data:`REFERENCE_DATA`, :func:`load_reference_stats`), so no data set is read at run time.

Images are channel-first arrays or tensors ``(N, ..., H, W)``: the first axis indexes images, the last two are
spatial; any axes between (channels) are averaged over. PSNR and SSIM are computed per image, then averaged
over the batch. ``data_range`` is the value range of the images: 2.0 for the models' [-1, 1] outputs
(``output_type="latent"``), 1.0 for [0, 1] images.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from scipy.ndimage import gaussian_filter

from .models import FASHION_MODELS, FLOW_MODELS, UNET_MODELS, DigitClassifier, load_classifier, weights_dir


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


class FeatureStats(NamedTuple):
    """What the Frechet distance needs of a feature set: the mean ``(D,)`` and the unbiased covariance ``(D, D)`` of
    ``n`` feature vectors (float64)."""

    mean: np.ndarray
    cov: np.ndarray
    n: int


def _features(feats: Any, name: str) -> np.ndarray:
    f = _numpy(feats)
    if f.ndim != 2:
        raise ValueError(f"{name} must be (N, D), got shape {f.shape}")
    if f.shape[0] < 2:
        raise ValueError(f"{name} needs at least 2 rows (the covariance of one vector is undefined), got {f.shape[0]}")
    return f


def feature_stats(feats: Any) -> FeatureStats:
    """Mean and unbiased covariance (``np.cov``, divisor N - 1) of a feature set ``(N, D)``, N >= 2."""
    f = _features(feats, "feats")
    return FeatureStats(f.mean(axis=0), np.atleast_2d(np.cov(f, rowvar=False)), f.shape[0])


def frechet_distance_of_stats(a: FeatureStats, b: FeatureStats) -> float:
    """Frechet distance between the Gaussians ``N(a.mean, a.cov)`` and ``N(b.mean, b.cov)`` (the FID formula).

    ``d^2 = |mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a^1/2 S_b S_a^1/2)^1/2)``; the trace of ``(S_a S_b)^1/2`` is
    computed through the symmetric matrix ``S_a^1/2 S_b S_a^1/2`` (same eigenvalues), which keeps it real and
    stable.
    """
    mu_a, mu_b = np.asarray(a.mean, np.float64), np.asarray(b.mean, np.float64)
    cov_a, cov_b = np.asarray(a.cov, np.float64), np.asarray(b.cov, np.float64)
    d = mu_a.shape[0] if mu_a.ndim == 1 else -1
    if mu_a.shape != (d,) or mu_b.shape != (d,) or cov_a.shape != (d, d) or cov_b.shape != (d, d):
        raise ValueError(
            "a and b must have means (D,) and covariances (D, D) with the same D, got "
            f"{mu_a.shape}, {cov_a.shape} and {mu_b.shape}, {cov_b.shape}"
        )
    root_a = _sqrtm_psd(cov_a)
    middle = root_a @ cov_b @ root_a
    tr_cross = np.sqrt(np.clip(np.linalg.eigvalsh((middle + middle.T) / 2), 0.0, None)).sum()
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2.0 * tr_cross)


def frechet_distance(feats_a: Any, feats_b: Any) -> float:
    """Frechet distance between Gaussians fitted to two feature sets ``(N, D)`` (the FID formula).

    The Gaussians have the sets' means and unbiased covariances (:func:`feature_stats`, so N >= 2 each);
    :func:`frechet_distance_of_stats` gives the formula.
    """
    fa, fb = _features(feats_a, "feats_a"), _features(feats_b, "feats_b")
    if fa.shape[1] != fb.shape[1]:
        raise ValueError(f"feats_a and feats_b must be (N, D) with the same D, got {fa.shape} and {fb.shape}")
    return frechet_distance_of_stats(feature_stats(fa), feature_stats(fb))


def _images_tensor(images: Any, classifier: torch.nn.Module) -> torch.Tensor:
    x = images if isinstance(images, torch.Tensor) else torch.as_tensor(np.asarray(images))
    if x.ndim != 4:
        raise ValueError(f"images must be (N, 1, H, W) in [-1, 1], got shape {tuple(x.shape)}")
    param = next(classifier.parameters())
    return x.to(device=param.device, dtype=param.dtype)


@torch.no_grad()
def classifier_logits(images: Any, classifier: DigitClassifier | None = None, batch_size: int = 512) -> torch.Tensor:
    """Logits ``(N, 10)`` of ``classifier`` (default: the shipped digits classifier) for images ``(N, 1, H, W)``
    in [-1, 1] of the size it was trained on."""
    classifier = classifier or load_classifier()
    x = _images_tensor(images, classifier)
    return torch.cat([classifier(chunk) for chunk in x.split(batch_size)]).cpu()


@torch.no_grad()
def classifier_features(images: Any, classifier: DigitClassifier | None = None, batch_size: int = 512) -> np.ndarray:
    """Penultimate-layer features ``(N, feature_dim)`` of ``classifier`` (default: the shipped digits classifier),
    for :func:`frechet_distance`."""
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
    """Accuracy of ``classifier`` (default: the shipped digits classifier) on images ``(N, 1, H, W)`` in [-1, 1]
    against ``labels``."""
    return accuracy(classifier_logits(images, classifier), labels)


# --------------------------------------------------------------------------- which classifier scores which model

# The real images that each shipped classifier's reference statistics describe: (data set, split). The digits
# models are compared with all 1797 digits (what BENCHMARKS.md reports), ``fashion`` with Fashion-MNIST's test split.
REFERENCE_DATA: dict[str, tuple[str, str]] = {
    "classifier": ("digits", "all"),
    "fashion_classifier": ("fashion", "test"),
}


def classifier_for(model: str) -> str:
    """The shipped classifier that scores zoo model ``model`` (class accuracy, Frechet distance): Fashion-MNIST's
    for the models trained on it (``models.FASHION_MODELS``), the digits' for the others."""
    zoo = (*FLOW_MODELS, *UNET_MODELS)
    if model not in zoo:
        raise ValueError(f"model must be one of {zoo}, got {model!r}")
    return "fashion_classifier" if model in FASHION_MODELS else "classifier"


def _reference_data(classifier: str) -> tuple[str, str]:
    if classifier not in REFERENCE_DATA:
        raise ValueError(f"classifier must be one of {tuple(REFERENCE_DATA)}, got {classifier!r}")
    return REFERENCE_DATA[classifier]


def _reference_path(classifier: str, folder: str | Path | None) -> Path:
    _reference_data(classifier)
    return (Path(folder) if folder is not None else weights_dir()) / f"{classifier}_reference.safetensors"


def load_reference_stats(classifier: str = "classifier", folder: str | Path | None = None) -> FeatureStats:
    """The shipped feature statistics of the real images of ``REFERENCE_DATA[classifier]`` under that classifier:
    ``<folder>/<classifier>_reference.safetensors`` (default folder: the package's ``weights``), written by
    :func:`save_reference_stats`. The demo and the benchmark compare samples with these, so they need no data set."""
    from safetensors.numpy import load_file

    tensors = load_file(str(_reference_path(classifier, folder)))
    return FeatureStats(tensors["mean"], tensors["cov"], int(tensors["n"][0]))


def compute_reference_stats(
    classifier: str = "classifier", weights: str | Path | None = None, data_folder: str | Path | None = None
) -> FeatureStats:
    """Recompute :func:`load_reference_stats` from the data: :func:`feature_stats` of the features of the images
    ``REFERENCE_DATA[classifier]`` under the classifier loaded from ``weights`` (default: the shipped one).

    ``data_folder`` is Fashion-MNIST's folder (``data.load_fashion``; it raises ``FileNotFoundError`` naming
    ``apt-get install dataset-fashion-mnist`` when the data set is missing); the digits come with scikit-learn.
    """
    from .data import load_digits16, load_fashion

    data, split = _reference_data(classifier)
    images, _ = load_fashion(split, data_folder) if data == "fashion" else load_digits16(split)
    return feature_stats(classifier_features(images, load_classifier(weights, classifier)))


def save_reference_stats(stats: FeatureStats, classifier: str, folder: str | Path) -> Path:
    """Write ``stats`` (float64 mean and covariance, the number of vectors) as
    ``<folder>/<classifier>_reference.safetensors``, with the classifier, data set and split as metadata."""
    from safetensors.numpy import save_file

    path = _reference_path(classifier, folder)
    path.parent.mkdir(parents=True, exist_ok=True)
    data, split = _reference_data(classifier)
    tensors = {
        "mean": np.ascontiguousarray(stats.mean, np.float64),
        "cov": np.ascontiguousarray(stats.cov, np.float64),
        "n": np.array([stats.n], np.int64),
    }
    save_file(tensors, str(path), metadata={"classifier": classifier, "data": data, "split": split})
    return path
