"""Model outputs as pytrees: the tensor leaves a cache stores and the structure it rebuilds.

Handled containers: tensors, tuples (named ones included), lists, dicts (any Mapping built
from its items, `OrderedDict` included) and dataclass instances, which covers diffusers'
`ModelOutput` (an `OrderedDict` subclass that is also a dataclass: rebuilt from its init
fields). Floating-point and complex tensors are the leaves; anything else (None, numbers, strings, integer or
bool tensors) is a constant carried through unchanged.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Hashable, Iterator, Mapping, Sequence
from typing import Any

import torch


@dataclasses.dataclass(frozen=True)
class TreeDef:
    """The structure of a flattened output; `unflatten` rebuilds it around new leaves.

    kind: "leaf", "const", "dataclass", "namedtuple", "sequence" or "mapping".
    key: what identifies the structure (the type and its field names or keys).
    """

    kind: str
    cls: Any
    keys: tuple[Hashable, ...]
    children: tuple[TreeDef, ...]
    value: Any = None

    @property
    def spec(self) -> Hashable:
        """A hashable summary: equal specs rebuild the same structure."""
        if self.kind == "const":
            return ("const", type(self.value).__name__)
        return (self.kind, self.cls, self.keys, tuple(c.spec for c in self.children))

    def unflatten(self, leaves: Sequence[torch.Tensor]) -> Any:
        it = iter(leaves)
        out = self._build(it)
        if next(it, None) is not None:
            raise ValueError("leaves: more leaves than the structure holds")
        return out

    def _build(self, it: Iterator[torch.Tensor]) -> Any:
        if self.kind == "leaf":
            return next(it)
        if self.kind == "const":
            return self.value
        values = [c._build(it) for c in self.children]
        if self.kind == "dataclass":
            return self.cls(**{str(k): v for k, v in zip(self.keys, values)})
        if self.kind == "namedtuple":
            return self.cls(*values)
        if self.kind == "sequence":
            return self.cls(values)
        return self.cls(zip(self.keys, values))


def flatten(obj: Any) -> tuple[list[torch.Tensor], TreeDef]:
    """The tensor leaves of `obj` (depth first, in field / key order) and its TreeDef."""
    leaves: list[torch.Tensor] = []
    return leaves, _flatten(obj, leaves)


def _flatten(obj: Any, leaves: list[torch.Tensor]) -> TreeDef:
    if isinstance(obj, torch.Tensor) and (obj.is_floating_point() or obj.is_complex()):
        leaves.append(obj)
        return TreeDef("leaf", None, (), ())
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        names = tuple(f.name for f in dataclasses.fields(obj) if f.init)
        children = tuple(_flatten(getattr(obj, n), leaves) for n in names)
        return TreeDef("dataclass", type(obj), names, children)
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):
        children = tuple(_flatten(v, leaves) for v in obj)
        return TreeDef("namedtuple", type(obj), tuple(obj._fields), children)
    if isinstance(obj, (tuple, list)):
        children = tuple(_flatten(v, leaves) for v in obj)
        return TreeDef("sequence", type(obj), (len(obj),), children)
    if isinstance(obj, Mapping):
        keys = tuple(obj.keys())
        children = tuple(_flatten(obj[k], leaves) for k in keys)
        return TreeDef("mapping", type(obj), keys, children)
    return TreeDef("const", None, (), (), obj)
