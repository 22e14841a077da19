"""`Recorder`: the learning rate and loss of every training batch, and their plots.

Losses are kept as detached tensors and turned into floats in one go when read, so recording
costs no host sync per batch. The learning rate is read in `after_loss`, before the step and
before any scheduler moves it (they step in `after_step` or later), so `lrs[i]` is the rate
batch `i` stepped with.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from .core import ORDERS, Callback

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from ..learner import Learner

__all__ = ["Recorder"]


def smooth(values: list[float], beta: float = 0.98) -> list[float]:
    """Exponential moving average of `values`, debiased as in fastai (`beta` is the decay)."""
    out, avg = [], 0.0
    for i, v in enumerate(values, start=1):
        avg = beta * avg + (1 - beta) * v
        out.append(avg / (1 - beta**i))
    return out


class Recorder(Callback):
    """Records `.lrs` and `.losses` per training batch and the validation loss per epoch.

    Example:
        >>> learn.fit(3)  # doctest: +SKIP
        >>> learn.recorder.plot_loss().savefig("loss.png")  # doctest: +SKIP
    """

    # a Recorder passed to the Learner or to fit replaces the attached one
    unique = True

    run_in_lr_find = False  # lr_find detaches it for the sweep

    order = ORDERS["Recorder"]

    def __init__(self) -> None:
        self._reset()

    def _reset(self) -> None:
        self._lrs: list[float] = []
        self._losses: list[Tensor] = []
        self._floats: list[float] = []
        self.valid_losses: list[tuple[int, float]] = []

    def before_fit(self, learn: Learner, *args: Any, **kwargs: Any) -> None:
        self._reset()

    def after_loss(self, learn: Learner, loss: Tensor, **kwargs: Any) -> None:
        if learn.training:
            self._lrs.append(learn.opt.param_groups[0]["lr"])
            self._losses.append(loss.detach())

    def after_epoch(self, learn: Learner, *args: Any, **kwargs: Any) -> None:
        value = learn.epoch_log.get("valid_loss")
        if value is not None:
            self.valid_losses.append((len(self._lrs), float(value)))

    @property
    def lrs(self) -> list[float]:
        """Learning rate of each training batch."""
        return list(self._lrs)

    @property
    def losses(self) -> list[float]:
        """Loss of each training batch, as floats (converted once, when read)."""
        if len(self._floats) < len(self._losses):
            new = self._losses[len(self._floats) :]
            self._floats += torch.stack([x.float().reshape(()) for x in new]).tolist()
        return list(self._floats)

    def plot_loss(self, beta: float | None = None) -> Figure:
        """Raw and smoothed training loss per batch, and validation loss per epoch.

        `beta` is the smoothing decay; by default it averages over about a twentieth of the
        run (at most 50 batches), so a short run's curve does not lag behind its data.
        """
        from matplotlib.figure import Figure

        losses = self.losses
        if beta is None:
            beta = 1 - 1 / min(50, max(1, len(losses) // 20))
        fig = Figure(figsize=(6, 4))
        ax = fig.add_subplot()
        ax.plot(losses, alpha=0.3, label="train (raw)")
        ax.plot(smooth(losses, beta), label="train (smoothed)")
        if self.valid_losses:
            xs, ys = zip(*self.valid_losses)
            ax.plot(xs, ys, "o-", label="valid (per epoch)")
        ax.set_xlabel("batch")
        ax.set_ylabel("loss")
        ax.legend()
        fig.tight_layout()
        return fig

    def plot_lr(self) -> Figure:
        """Learning rate per training batch."""
        from matplotlib.figure import Figure

        fig = Figure(figsize=(6, 4))
        ax = fig.add_subplot()
        ax.plot(self._lrs)
        ax.set_xlabel("batch")
        ax.set_ylabel("learning rate")
        fig.tight_layout()
        return fig
