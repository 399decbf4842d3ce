"""Input checks shared by the public functions; each error names its parameter."""

from __future__ import annotations

from typing import Any

import numpy as np


def check_order(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return int(value)


def check_count(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
    return int(value)


def as_nodes(values: Any, name: str) -> np.ndarray:
    """A 1-D float64 array of finite, pairwise distinct values."""
    x = np.asarray(values, dtype=np.float64)
    if x.ndim != 1 or x.size == 0:
        raise ValueError(f"{name} must be a non-empty 1-D sequence, got shape {x.shape}")
    if not np.all(np.isfinite(x)):
        raise ValueError(f"{name} must be finite, got {x.tolist()}")
    if np.unique(x).size != x.size:
        raise ValueError(f"{name} must be pairwise distinct, got {x.tolist()}")
    return x


def as_times(values: Any, name: str = "times") -> np.ndarray:
    """A 1-D float64 array of finite, strictly monotonic (either direction) step times."""
    x = np.asarray(values, dtype=np.float64)
    if x.ndim != 1 or x.size == 0:
        raise ValueError(f"{name} must be a non-empty 1-D sequence, got shape {x.shape}")
    if not np.all(np.isfinite(x)):
        raise ValueError(f"{name} must be finite (no NaN or inf), got {x.tolist()}")
    d = np.diff(x)
    if not (np.all(d > 0) or np.all(d < 0)):
        raise ValueError(f"{name} must be strictly increasing or strictly decreasing, got {x.tolist()}")
    return x
