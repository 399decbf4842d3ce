"""The demo's image data: scikit-learn's 8x8 digits, upsampled to 16x16 and scaled to [-1, 1].

Upsampling is bilinear with half-pixel centres and clamped edges (the same convention as
``torch.nn.functional.interpolate(mode="bilinear", align_corners=False)``): output pixel ``o`` samples the
source at ``s = (o + 0.5) / 2 - 0.5``, clamped to ``[0, 7]``. Pixel values 0..16 map linearly to [-1, 1].
Everything is deterministic; the train/test split is a fixed permutation (seed 0, 20 % test).
"""

from __future__ import annotations

import numpy as np

IMAGE_SIZE = 16
NUM_CLASSES = 10
TEST_FRACTION = 0.2
SPLITS = ("all", "train", "test")


def _bilinear_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) matrix of 1-D bilinear weights, half-pixel centres, clamped edges."""
    src = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0.0, n_in - 1)
    lo = np.floor(src).astype(int)
    hi = np.minimum(lo + 1, n_in - 1)
    frac = src - lo
    m = np.zeros((n_out, n_in))
    m[np.arange(n_out), lo] += 1.0 - frac
    m[np.arange(n_out), hi] += frac
    return m


def upsample(images: np.ndarray, size: int = IMAGE_SIZE) -> np.ndarray:
    """Bilinearly resize ``(..., h, w)`` square images to ``(..., size, size)`` (separable: ``M X M^T``)."""
    h, w = images.shape[-2:]
    if h != w:
        raise ValueError(f"images must be square, got {h}x{w}")
    m = _bilinear_matrix(h, size)
    return np.einsum("oh,...hw,pw->...op", m, images, m)


def load_digits16(split: str = "all") -> tuple[np.ndarray, np.ndarray]:
    """Return ``(images, labels)``: float32 ``(N, 1, 16, 16)`` in [-1, 1] and int64 labels 0..9.

    ``split`` is ``"all"`` (1797 images), ``"train"`` or ``"test"`` (a fixed 80/20 split).
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = upsample(digits.images.astype(np.float64)) / 16.0 * 2.0 - 1.0
    images = images[:, None].astype(np.float32)
    labels = digits.target.astype(np.int64)
    if split == "all":
        return images, labels
    order = np.random.default_rng(0).permutation(len(labels))
    n_test = round(TEST_FRACTION * len(labels))
    idx = np.sort(order[:n_test] if split == "test" else order[n_test:])
    return images[idx], labels[idx]
