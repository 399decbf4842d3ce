"""`History`: the stored model outputs of one cache context, and the tensor sums over them.

A prediction is f^ = sum_j w_j H_j (paper, Eq. 3.5) over the stored outputs H_0..H_{m-1},
newest first; a corrected output is f_n + sum_l c_l N_l over N = [f_n, H_0, ..., H_{m-1}].
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import Any

import torch

from abcache_torch._tree import TreeDef, flatten


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 for float64 outputs, complex128 / complex64 for complex ones, float32 otherwise."""
    if dtype in (torch.float64, torch.complex128):
        return dtype
    if dtype.is_complex:
        return torch.complex64
    return torch.float32


def weighted_sum(history: Sequence[Sequence[torch.Tensor]], weights: Any) -> list[torch.Tensor]:
    """sum_j weights[j] * history[j][leaf] for every leaf, accumulated in float32 (float64 for float64).

    history: the stored outputs newest first, each a list of tensor leaves; weights: a 1-D
    tensor (on the leaves' device) or a sequence of floats with at least len(history) entries.
    Pure tensor arithmetic (no host synchronisation, no data-dependent branching): compiles
    with `torch.compile(..., fullgraph=True)`. Each result has its leaf's dtype and device.
    """
    if len(history) == 0:
        raise ValueError("history is empty: a prediction needs at least one computed output")
    out = []
    for leaves in zip(*history):
        acc = accumulation_dtype(leaves[0].dtype)
        total = weights[0] * leaves[0].to(acc)
        for j in range(1, len(leaves)):
            total = total + weights[j] * leaves[j].to(acc)
        out.append(total.to(leaves[0].dtype))
    return out


def squared_sum(leaves: list[torch.Tensor]) -> torch.Tensor:
    """sum |leaf|^2 over all leaves, as a float64 scalar tensor on the leaves' device."""
    return torch.stack([(leaf.to(accumulation_dtype(leaf.dtype)).abs() ** 2).sum().double() for leaf in leaves]).sum()


def any_non_finite(leaves: list[torch.Tensor]) -> torch.Tensor:
    """1.0 if any leaf holds a NaN or an inf, else 0.0 (a float64 tensor on the leaves' device)."""
    return torch.stack([(~torch.isfinite(leaf)).any() for leaf in leaves]).any().to(torch.float64)


def _leaves(output: Any) -> tuple[list[torch.Tensor], TreeDef, Hashable]:
    leaves, treedef = flatten(output)
    if not leaves:
        raise TypeError(
            "output: the model output must be a floating-point tensor or a tuple / list / dict / dataclass holding "
            f"one, got {type(output).__name__}"
        )
    signature = (treedef.spec, tuple((leaf.shape, leaf.dtype, leaf.device) for leaf in leaves))
    return leaves, treedef, signature


class History:
    """The last `capacity` computed outputs of one context, newest first, as tensor leaves + one treedef.

    Stores references, not copies (a leaf that requires grad is detached): do not modify a model
    output in place while a history holds it.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.entries: list[list[torch.Tensor]] = []
        self.treedef: TreeDef | None = None
        self.signature: Hashable = None

    def __len__(self) -> int:
        return len(self.entries)

    def matches(self, output: Any) -> bool:
        """Whether `output` has the structure, shapes, dtypes and devices of the stored ones (or none is stored)."""
        return not self.entries or _leaves(output)[2] == self.signature

    def push(self, output: Any) -> None:
        """Store `output` as H_0 (dropping the oldest beyond `capacity`, and all of them if it does not match)."""
        leaves, treedef, signature = _leaves(output)
        if signature != self.signature:
            self.entries = []
        self.entries = [[leaf.detach() if leaf.requires_grad else leaf for leaf in leaves], *self.entries]
        del self.entries[self.capacity :]
        self.treedef, self.signature = treedef, signature

    def unflatten(self, leaves: list[torch.Tensor]) -> Any:
        """`leaves` rebuilt into the structure of the stored outputs."""
        assert self.treedef is not None
        return self.treedef.unflatten(leaves)

    def correct(self, output: Any, weights: Sequence[float]) -> Any:
        """output + sum_l c_l N_l over N = [output, H_0, ...] (c = `weights`), in the structure of `output`.

        `output` must match the stored outputs (`matches`); it is not stored.
        """
        leaves, treedef, _ = _leaves(output)
        c = [float(w) for w in weights]
        return treedef.unflatten(weighted_sum([leaves, *self.entries], [1.0 + c[0], *c[1:]]))
