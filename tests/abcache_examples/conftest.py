"""Fixtures of the examples' tests: the Fashion-MNIST test split, where Debian's package is installed."""

from __future__ import annotations

import numpy as np
import pytest


@pytest.fixture(scope="session")
def fashion_test() -> tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST's 10,000 test images and labels (``data.load_fashion("test")``); the test is skipped, naming
    the package to install, where the data set is not installed."""
    from abcache_examples.data import load_fashion

    try:
        return load_fashion("test")
    except FileNotFoundError:
        pytest.skip("Fashion-MNIST not installed: apt-get install dataset-fashion-mnist")
