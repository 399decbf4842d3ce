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


def _real_array(values: Any, name: str) -> np.ndarray:
    raw = np.asarray(values.detach().cpu() if hasattr(values, "detach") else values)
    if raw.dtype.kind not in "iuf":
        raise ValueError(f"{name} must be real numbers, got {raw.dtype} values {values!r}")
    return raw.astype(np.float64)


def as_nodes(values: Any, name: str) -> np.ndarray:
    """A 1-D float64 array of finite, pairwise distinct values."""
    x = _real_array(values, name)
    if x.ndim != 1 or x.size == 0:
        raise ValueError(f"{name} must be a non-empty 1-D sequence, got shape {x.shape}")
    if not np.all(np.isfinite(x)):
        raise ValueError(f"{name} must be finite, got {x.tolist()}")
    if np.unique(x).size != x.size:
        raise ValueError(f"{name} must be pairwise distinct, got {x.tolist()}")
    return x


def as_times(values: Any, name: str = "times") -> np.ndarray:
    """A 1-D float64 array of finite, strictly monotonic (either direction) step times."""
    x = _real_array(values, name)
    if x.ndim != 1 or x.size == 0:
        raise ValueError(f"{name} must be a non-empty 1-D sequence, got shape {x.shape}")
    if not np.all(np.isfinite(x)):
        raise ValueError(f"{name} must be finite (no NaN or inf), got {x.tolist()}")
    d = np.diff(x)
    if not (np.all(d > 0) or np.all(d < 0)):
        raise ValueError(f"{name} must be strictly increasing or strictly decreasing, got {x.tolist()}")
    return x


def as_grid(values: Any, name: str = "grid") -> np.ndarray:
    """The n + 1 sampler times of n steps (`as_times`, at least 2 values)."""
    x = as_times(values, name)
    if x.size < 2:
        raise ValueError(f"{name} must hold at least 2 entries (n steps need n + 1), got {x.size}")
    return x
