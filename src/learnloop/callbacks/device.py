"""`DeviceCB`: puts the model on a device once and moves every batch there."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch

from .core import Callback

__all__ = ["DeviceCB", "default_device", "move_optimizer_state", "to_device"]


def default_device() -> torch.device:
    """cuda if available (under torchrun: `cuda:LOCAL_RANK`, this process's GPU), then mps, then cpu."""
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "-1"))
        return (
            torch.device("cuda", local)
            if 0 <= local < torch.cuda.device_count()
            else torch.device("cuda")
        )
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def to_device(obj: Any, device: torch.device | str, non_blocking: bool = True) -> Any:
    """Move tensors in `obj` (nested tuples, lists and dicts too) to `device`; other values pass through."""
    return _move(obj, torch.device(device), non_blocking)


def _move(obj: Any, device: torch.device, non_blocking: bool) -> Any:
    # Per batch: tensors already there are returned as they are (`.to` would only parse its arguments).
    if isinstance(obj, torch.Tensor):
        return (
            obj if obj.device == device else obj.to(device, non_blocking=non_blocking)
        )
    if isinstance(obj, Mapping):
        return type(obj)({k: _move(v, device, non_blocking) for k, v in obj.items()})
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # namedtuple
        return type(obj)(*[_move(v, device, non_blocking) for v in obj])
    if isinstance(obj, (list, tuple)):
        return type(obj)([_move(v, device, non_blocking) for v in obj])
    return obj


def move_optimizer_state(opt: torch.optim.Optimizer) -> None:
    """Put each parameter's optimizer state (momenta, ...) on that parameter's device."""
    for p, state in opt.state.items():
        for key, value in state.items():
            # Adam keeps `step` on the CPU on purpose unless capturable/fused: leave scalars be.
            if (
                isinstance(value, torch.Tensor)
                and value.dim() > 0
                and value.device != p.device
            ):
                state[key] = value.to(p.device, non_blocking=True)


class DeviceCB(Callback):
    """Move the model to `device` (default: cuda, then mps, then cpu) and each batch with it.

    Batches move with `non_blocking=True`, so pinned-memory loaders overlap the copy with compute.

    Example:
        >>> learn = Learner(model, dls, cbs=[DeviceCB("cpu")])  # doctest: +SKIP
    """

    unique = (
        True  # a DeviceCB passed to the Learner or to fit replaces the attached one
    )

    order = -20

    def __init__(self, device: torch.device | str | None = None) -> None:
        self.device = torch.device(device) if device is not None else default_device()

    def _place_model(self, learn: Any) -> None:
        first = next(learn.model.parameters(), None)
        if first is None or first.device != self.device:
            learn.model.to(self.device)
            # E.g. state loaded from a checkpoint onto the CPU.
            if learn.opt is not None:
                move_optimizer_state(learn.opt)

    def before_fit(self, learn: Any, *args: Any, **kwargs: Any) -> None:
        self._place_model(learn)

    def before_validate(self, learn: Any, *args: Any, **kwargs: Any) -> None:
        self._place_model(learn)  # validate()/get_preds() run without before_fit

    def before_batch(self, learn: Any, *args: Any, **kwargs: Any) -> None:
        learn.batch = _move(learn.batch, self.device, True)

    def __repr__(self) -> str:
        return f"DeviceCB(device={str(self.device)!r})"
