"""`DeviceCB`: puts the model on a device once and moves every batch there."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import torch

from ..tensors import map_tensors
from .core import ORDERS, Callback

if TYPE_CHECKING:
    from ..learner import Learner

__all__ = ["DeviceCB", "default_device", "to_device"]


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
    if not isinstance(device, torch.device):
        device = torch.device(device)

    # Per batch: tensors already there are returned as they are (`.to` would only parse its
    # arguments).
    def move(t: torch.Tensor) -> torch.Tensor:
        return t if t.device == device else t.to(device, non_blocking=non_blocking)

    return map_tensors(move, obj)


def _on_device(batch: Any, device: torch.device) -> bool:
    """Whether `batch` is a tuple or list of tensors all on `device` (False for anything else).

    The common batch, checked in well under a microsecond; anything else takes `to_device`'s walk.
    """
    if type(batch) is not tuple and type(batch) is not list:
        return False
    for t in batch:
        if type(t) is not torch.Tensor or t.device != device:
            return False
    return True


def _with_index(device: torch.device) -> torch.device:
    """`device` as its tensors report it: 'cuda' is 'cuda:<current device>', 'mps' is 'mps:0'.

    `torch.device("cuda") == torch.device("cuda", 0)` is False, so a check against the bare name
    would never find a batch already on the GPU.
    """
    if device.index is not None:
        return device
    if device.type == "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    if device.type == "mps":
        return torch.device("mps", 0)
    return device  # cpu (and meta) tensors report no index


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

    # a DeviceCB passed to the Learner or to fit replaces the attached one
    unique = True

    order = ORDERS["DeviceCB"]

    def __init__(self, device: torch.device | str | None = None) -> None:
        self.device = torch.device(device) if device is not None else default_device()
        # The device with its index, once known: what tensors there report.
        self._placed = self.device

    def place_model(self, learn: Learner) -> None:
        """Move `learn.model` (and its optimizer's state) to this callback's device."""
        self._placed = _with_index(self.device)
        first = next(learn.model.parameters(), None)
        if first is None or first.device != self._placed:
            learn.model.to(self.device)
            # E.g. state loaded from a checkpoint onto the CPU.
            if learn.opt is not None:
                move_optimizer_state(learn.opt)

    def before_fit(self, learn: Learner, *args: Any, **kwargs: Any) -> None:
        self.place_model(learn)

    def before_validate(self, learn: Learner, *args: Any, **kwargs: Any) -> None:
        self.place_model(learn)  # validate()/get_preds() run without before_fit

    def before_batch(self, learn: Learner, *args: Any, **kwargs: Any) -> None:
        batch = learn.batch
        # A batch already there (a CPU run, a loader that moves it) is left as it is: assigning
        # it would split it again, which costs more than this check.
        if not _on_device(batch, self._placed):
            learn.batch = to_device(batch, self.device)

    def __repr__(self) -> str:
        return f"DeviceCB(device={str(self.device)!r})"
