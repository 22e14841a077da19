"""Error notes and input checks shared by the loop: say where it happened and what to do."""

from __future__ import annotations

import math
import sys
import warnings
from typing import Any

from torch import Tensor

from .types import length

__all__ = [
    "add_note",
    "check_int",
    "check_loss",
    "check_lr",
    "check_not_empty",
    "describe",
    "warn_empty_loader",
]


def add_note(e: BaseException, note: str, once: bool = True) -> None:
    """Attach `note` to `e` (shown under the traceback on Python >= 3.11).

    With `once`, only the first such note sticks: the innermost place an error was raised in.
    """
    if once and getattr(e, "_learnloop_noted", False):
        return
    if sys.version_info >= (3, 11):
        e.add_note(note)
    else:  # pragma: no cover - 3.10 has no add_note; keep the text where tools look for it
        e.__notes__ = [*getattr(e, "__notes__", []), note]  # type: ignore[attr-defined]
    if once:
        e._learnloop_noted = True  # type: ignore[attr-defined]


def describe(x: Any) -> str:
    """Shape and dtype of a tensor (recursively for tuples and lists), else the type's name."""
    if isinstance(x, Tensor):
        return f"shape {tuple(x.shape)} {str(x.dtype).removeprefix('torch.')}"
    if isinstance(x, (tuple, list)):
        return "(" + ", ".join(describe(v) for v in x) + ")"
    return type(x).__name__


def check_not_empty(dl: Any, name: str) -> None:
    """Raise if the `name` loader is None or has no batches."""
    if dl is None:
        raise ValueError(f"dls.{name} is None: a Learner needs a {name} DataLoader.")
    if length(dl) == 0:
        raise ValueError(
            f"dls.{name} is empty (0 batches): check the dataset's length, and that batch_size "
            "is not larger than the dataset while drop_last=True."
        )


def check_int(value: object, name: str, minimum: int = 1, unit: str = "") -> int:
    """Return `value` if it is an int >= `minimum`, else raise a ValueError naming `name`.

    `name` says whose argument it is (`"CheckpointCB every"`); `unit` what it counts (`"epochs"`).
    """
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        what = f" ({unit})" if unit else ""
        raise ValueError(f"{name} must be an int >= {minimum}{what}, got {value!r}.")
    return value


def check_lr(value: object, name: str = "lr") -> float:
    """Return `value` if it is a finite, positive number, else raise a ValueError naming `name`.

    `lr <= 0` alone lets nan through (every comparison with nan is False), and a nan or infinite
    learning rate turns the weights into nan at the first step.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(
            f"{name} must be a number, got {type(value).__name__} {value!r}."
        )
    if not math.isfinite(value) or value <= 0:
        raise ValueError(
            f"{name} must be a finite number > 0, got {value!r}: try 1e-3, or run "
            "learn.lr_find() for a suggestion."
        )
    return float(value)


def check_loss(loss: Any, loss_func: Any) -> None:
    """Raise a TypeError unless `loss` (what `loss_func` returned) is a one-value tensor."""
    if isinstance(loss, Tensor) and loss.numel() == 1:
        return
    got = (
        f"a tensor of shape {tuple(loss.shape)}"
        if isinstance(loss, Tensor)
        else f"{type(loss).__name__} {loss!r}"[:80]
    )
    name = getattr(loss_func, "__qualname__", None) or type(loss_func).__name__
    raise TypeError(
        f"The loss must be a one-value tensor, but {name} returned {got}: return a torch "
        "scalar computed from the predictions (a Python number carries no gradient; a "
        "per-sample loss needs reduction='mean' or .mean())."
    )


def warn_empty_loader(training: bool, epoch: int) -> None:
    """Warn that the training (`training`) or validation loader yielded no batch in `epoch`."""
    if training:
        name = "train"
        hint = "an iterator or generator is used up after one pass: pass a DataLoader or another re-iterable"
    else:
        name = "valid"
        hint = "check the validation set's length and batch_size with drop_last, or pass valid=False"
    warnings.warn(
        f"The {name} loader yielded no batches in epoch {epoch}, so that phase did nothing "
        f"and its loss is absent from the row; {hint}.",
        stacklevel=4,
    )
