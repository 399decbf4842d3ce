"""The examples' data: the IDX reader and loader of Fashion-MNIST (abcache_examples.data)."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
from abcache_examples.data import FASHION_CLASSES, load_fashion


def _idx(array: np.ndarray) -> bytes:
    """An unsigned-byte IDX file: magic 0 0 8 ndim, the sizes as big-endian int32, then the bytes."""
    return bytes([0, 0, 8, array.ndim]) + struct.pack(f">{array.ndim}i", *array.shape) + array.tobytes()


def _write(folder: Path, stem: str, images: np.ndarray, labels: np.ndarray, gz: bool) -> None:
    for kind, array in (("images-idx3", images), ("labels-idx1", labels)):
        data = _idx(array.astype(np.uint8))
        path = folder / f"{stem}-{kind}-ubyte"
        if gz:
            path.with_name(path.name + ".gz").write_bytes(gzip.compress(data))
        else:
            path.write_bytes(data)


@pytest.fixture
def tiny_fashion(tmp_path: Path) -> tuple[Path, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """A folder with a 3-image train split (gzipped, as Debian ships it) and a 2-image test split (plain IDX)."""
    rng = np.random.default_rng(0)
    train = rng.integers(0, 256, (3, 28, 28), dtype=np.uint8)
    train[0, 0, :3] = [0, 255, 51]  # -1, 1 and 51 / 127.5 - 1 = -0.6
    test = rng.integers(0, 256, (2, 28, 28), dtype=np.uint8)
    train_labels, test_labels = np.array([9, 0, 4]), np.array([7, 2])
    _write(tmp_path, "train", train, train_labels, gz=True)
    _write(tmp_path, "t10k", test, test_labels, gz=False)
    return tmp_path, train, train_labels, test, test_labels


def test_load_fashion_parses_idx_files(tiny_fashion) -> None:
    folder, train, train_labels, test, test_labels = tiny_fashion
    x, y = load_fashion("train", folder)
    assert x.shape == (3, 1, 28, 28) and x.dtype == np.float32
    assert y.dtype == np.int64 and y.tolist() == train_labels.tolist()
    np.testing.assert_array_equal(x[0, 0, 0, :3], np.array([-1.0, 1.0, -0.6], np.float32))
    np.testing.assert_allclose(x[:, 0], train / 127.5 - 1.0, atol=1e-6)
    x, y = load_fashion("test", folder)
    np.testing.assert_allclose(x[:, 0], test / 127.5 - 1.0, atol=1e-6)
    assert y.tolist() == test_labels.tolist()
    x, y = load_fashion("all", folder)  # train, then test
    np.testing.assert_allclose(x[:, 0], np.concatenate([train, test]) / 127.5 - 1.0, atol=1e-6)
    assert y.tolist() == [*train_labels, *test_labels]


def test_load_fashion_reads_the_folder_named_by_the_environment(tiny_fashion, monkeypatch) -> None:
    folder, _, train_labels, _, _ = tiny_fashion
    monkeypatch.setenv("ABCACHE_FASHION_MNIST", str(folder))
    assert load_fashion("train")[1].tolist() == train_labels.tolist()


def test_load_fashion_names_the_package_when_missing(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"apt-get install dataset-fashion-mnist"):
        load_fashion("test", tmp_path / "nowhere")


def test_load_fashion_rejects_bad_split_and_bad_files(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="split must be one of"):
        load_fashion("validation", tmp_path)
    # an IDX file of int32 (type code 0x0C), not unsigned bytes
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(bytes([0, 0, 0x0C, 1]) + struct.pack(">i", 1) + bytes(4))
    with pytest.raises(ValueError, match="not an unsigned-byte IDX file"):
        load_fashion("test", tmp_path)


def test_installed_fashion_mnist_has_its_splits(fashion_test) -> None:
    x, y = fashion_test
    assert x.shape == (10_000, 1, 28, 28) and x.min() == -1.0 and x.max() == 1.0
    assert np.bincount(y).tolist() == [1000] * len(FASHION_CLASSES)
