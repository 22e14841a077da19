"""Helpers on tensors inside batches and logs: one walk over nested containers, one tensor-to-number."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from torch import Tensor

__all__ = ["map_tensors", "to_plain"]


def map_tensors(fn: Callable[[Tensor], Any], obj: Any) -> Any:
    """`obj` with `fn` applied to each tensor in it, through nested mappings, namedtuples, tuples and lists.

    Containers keep their types; values that are not tensors pass through as they are.
    """
    if isinstance(obj, Tensor):
        return fn(obj)
    if isinstance(obj, Mapping):
        return type(obj)({k: map_tensors(fn, v) for k, v in obj.items()})
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # namedtuple
        return type(obj)(*[map_tensors(fn, v) for v in obj])
    if isinstance(obj, (list, tuple)):
        return type(obj)([map_tensors(fn, v) for v in obj])
    return obj


def to_plain(value: Any) -> Any:
    """A one-element tensor as a Python number (one host sync); any other value as it is."""
    return value.item() if isinstance(value, Tensor) and value.numel() == 1 else value
