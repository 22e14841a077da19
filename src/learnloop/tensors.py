"""Helpers on tensors inside batches and logs: one walk over nested containers, one tensor-to-number,
and `ScalarLog`, the compact record of one number per step.

`ScalarLog` exists because a long run records a number per step (a loss, a gradient norm) without
a host sync per step, so each number starts as a 0-d tensor on the device; kept one by one, those
cost about 580 bytes a step on the CPU (more on a GPU, whose allocator rounds to 512-byte blocks),
about 0.6 GB per million steps. Stacked into float32 chunks and moved to a host `array`, they cost
4 bytes a step.
"""

from __future__ import annotations

from array import array
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = ["ScalarLog", "array_tensor", "map_tensors", "stack_scalars", "to_plain"]


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


def stack_scalars(values: Sequence[Tensor]) -> Tensor:
    """One-value tensors (non-empty `values`) as one 1-d float32 tensor on their device; no host sync."""
    try:
        out = torch.stack(list(values)).float().reshape(-1)
    except RuntimeError:  # mixed shapes, e.g. (1,) and ()
        out = torch.cat([t.float().reshape(-1) for t in values])
    if out.numel() != len(values):
        raise ValueError(
            f"Expected one-value tensors, but {len(values)} of them hold {out.numel()} values: "
            "reduce each to a scalar (e.g. .mean()) before recording it."
        )
    return out


def array_tensor(values: array, dtype: torch.dtype) -> Tensor:
    """A copy of an `array('f')` or `array('d')` as a 1-d tensor of `dtype` (its item type)."""
    if not values:
        return torch.zeros(0, dtype=dtype)
    return torch.frombuffer(bytearray(values.tobytes()), dtype=dtype)


class ScalarLog:
    """One number per step, kept in 4 bytes: 0-d tensors are stacked into float32 chunks of `chunk`.

    `append` costs a list append (no host sync); every `chunk` values are stacked into one tensor on
    their device, and `to_host()` (call it once per epoch) moves the chunks into a host `array('f')`.
    Values read back equal `float(value.float())` of each appended tensor.

    Example:
        >>> log = ScalarLog()
        >>> for x in (0.5, 0.25):
        ...     log.append(torch.tensor(x))
        >>> log.tolist()
        [0.5, 0.25]
    """

    def __init__(self, chunk: int = 512) -> None:
        if chunk < 1:
            raise ValueError(f"ScalarLog chunk must be >= 1, got {chunk}.")
        self.chunk = chunk
        self._pending: list[Tensor] = []
        self._chunks: list[Tensor] = []
        self._host = array("f")
        self._n = 0

    def append(self, value: Tensor) -> None:
        """Add one one-value tensor (detach it first: a kept graph would outlive the step)."""
        pending = self._pending
        pending.append(value)
        if len(pending) >= self.chunk:
            self._stack()

    def _stack(self) -> None:
        pending = self._pending
        if pending:
            self._chunks.append(stack_scalars(pending))
            self._n += len(pending)
            self._pending = []

    def to_host(self) -> None:
        """Move every value into the host array (one device-to-host copy)."""
        self._stack()
        if self._chunks:
            values = torch.cat(self._chunks).detach().cpu()
            self._host.frombytes(values.numpy().tobytes())
            self._chunks = []

    def tolist(self) -> list[float]:
        """Every value so far, as Python floats (moves them to the host first)."""
        self.to_host()
        return self._host.tolist()

    def as_tensor(self) -> Tensor:
        """Every value so far as one float32 CPU tensor (for checkpoints)."""
        self.to_host()
        return array_tensor(self._host, torch.float32)

    def extend(self, values: Tensor) -> None:
        """Append the values of a 1-d tensor (what `as_tensor` returned), as float32."""
        self.to_host()
        self._host.frombytes(values.detach().float().cpu().numpy().tobytes())
        self._n += values.numel()

    def clear(self) -> None:
        """Forget every value."""
        self._pending, self._chunks, self._host, self._n = [], [], array("f"), 0

    def __len__(self) -> int:
        return self._n + len(self._pending)

    def __repr__(self) -> str:
        return f"ScalarLog({len(self)} values, chunk={self.chunk})"
