"""The demo's image data: scikit-learn's 8x8 digits upsampled to 16x16, and Fashion-MNIST (28x28), in [-1, 1].

Upsampling is bilinear with half-pixel centres and clamped edges (the same convention as
``torch.nn.functional.interpolate(mode="bilinear", align_corners=False)``): output pixel ``o`` samples the
source at ``s = (o + 0.5) / 2 - 0.5``, clamped to ``[0, 7]``. Pixel values 0..16 map linearly to [-1, 1].
Everything is deterministic; the train/test split is a fixed permutation (seed 0, 20 % test).

Fashion-MNIST (Xiao et al. 2017, MIT licence) is read from the IDX files of Debian's ``dataset-fashion-mnist``
package (``/usr/share/datasets/fashion-mnist``) or a given folder; its own 60,000 / 10,000 split is kept.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

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


FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_CLASSES = ("T-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "boot")
_FASHION_FILES = {"train": "train", "test": "t10k"}


def _read_idx(path: Path) -> np.ndarray:
    """An IDX file (gzipped or not) as a numpy array: magic ``0 0 dtype ndim``, big-endian int32 sizes, data."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if data[:2] != b"\x00\x00" or data[2] != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte IDX file")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(shape)


def load_fashion(split: str = "train", folder: str | Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Return Fashion-MNIST ``(images, labels)``: float32 ``(N, 1, 28, 28)`` in [-1, 1] and int64 labels 0..9.

    ``split`` is ``"train"`` (60,000), ``"test"`` (10,000) or ``"all"``. ``folder`` holds the four IDX files
    (default: ``$ABCACHE_FASHION_MNIST`` or Debian's ``/usr/share/datasets/fashion-mnist``).
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    root = Path(folder or os.environ.get("ABCACHE_FASHION_MNIST") or FASHION_DIR)
    parts = ("train", "test") if split == "all" else (split,)
    images, labels = [], []
    for part in parts:
        stem = _FASHION_FILES[part]
        found = [p for p in (root / f"{stem}-images-idx3-ubyte.gz", root / f"{stem}-images-idx3-ubyte") if p.exists()]
        if not found:
            raise FileNotFoundError(
                f"Fashion-MNIST not found in {root}: install it with `apt-get install dataset-fashion-mnist` "
                "or pass the folder holding its IDX files"
            )
        label_path = found[0].with_name(found[0].name.replace("images-idx3", "labels-idx1"))
        images.append(_read_idx(found[0]).astype(np.float32) / 127.5 - 1.0)
        labels.append(_read_idx(label_path).astype(np.int64))
    return np.concatenate(images)[:, None], np.concatenate(labels)
