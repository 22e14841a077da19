"""`Recorder`: the learning rate and loss of every training batch, and their plots.

Recording costs no host sync per batch and 12 bytes per batch however long the run: losses go
into a `ScalarLog` (float32 chunks on the device, moved to the host once per epoch, 4 bytes
each) and learning rates into an `array('d')` (8 bytes each; a list of floats would take 32).
The learning rate is read in `after_loss`, before the step and before any scheduler moves it
(they step in `after_step` or later), so `lrs[i]` is the rate batch `i` stepped with.
"""

from __future__ import annotations

from array import array
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from ..tensors import ScalarLog, array_tensor
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

    A batch counts once its loss reaches `after_loss`: a batch cancelled before that (or a phase
    cancelled before its batches) records nothing. `.valid_losses` holds `(batches so far,
    valid_loss)` for each epoch whose row has a validation loss, that is whose validation ran.

    Its values are part of checkpoints (`state_dict`): after `fit(n, resume=...)` they cover the
    whole run, as if it had never stopped (under torchrun, rank 0's values on every process).

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
        self._lrs = array("d")
        self._losses = ScalarLog()
        self.valid_losses: list[tuple[int, float]] = []

    def before_fit(self, learn: Learner, *args: Any, **kwargs: Any) -> None:
        if learn.resumed_from is None:  # a resumed fit goes on with the loaded values
            self._reset()

    def after_loss(self, learn: Learner, loss: Tensor, **kwargs: Any) -> None:
        if learn.training:
            self._lrs.append(learn.opt.param_groups[0]["lr"])
            self._losses.append(loss.detach())

    def after_epoch(self, learn: Learner, epoch: int, **kwargs: Any) -> None:
        self._losses.to_host()  # one copy per epoch frees the device's chunks
        row = learn.epoch_log
        # A row from another epoch would repeat that epoch's loss (see MetricsCB).
        if row.get("epoch", epoch) == epoch and row.get("valid_loss") is not None:
            self.valid_losses.append((len(self._lrs), float(row["valid_loss"])))

    def after_fit(self, learn: Learner, *args: Any, **kwargs: Any) -> None:
        self._losses.to_host()  # an epoch cut short by CancelFitException has no after_epoch

    def state_dict(self) -> dict[str, Any]:
        """The values so far, as tensors (12 bytes a batch)."""
        return {
            "lrs": array_tensor(self._lrs, torch.float64),
            "losses": self._losses.as_tensor(),
            "valid_losses": [list(v) for v in self.valid_losses],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the values `state_dict` saved."""
        self._reset()
        self._lrs.frombytes(state["lrs"].double().numpy().tobytes())
        self._losses.extend(state["losses"])
        self.valid_losses = [(int(n), float(v)) for n, v in state["valid_losses"]]

    @property
    def lrs(self) -> list[float]:
        """Learning rate of each training batch."""
        return self._lrs.tolist()

    @property
    def losses(self) -> list[float]:
        """Loss of each training batch, as floats (float32 values, as computed or cast)."""
        return self._losses.tolist()

    def plot_loss(self, beta: float | None = None) -> Figure:
        """Raw and smoothed training loss per batch, and validation loss per epoch.

        `beta` is the smoothing decay; by default it averages over about a twentieth of the
        run (at most 50 batches), so a short run's curve does not lag behind its data. In a
        notebook the figure shows itself, as the cell's value or at its end (`learnloop.figure`).
        """
        from ..figure import new_figure

        losses = self.losses
        if beta is None:
            beta = 1 - 1 / min(50, max(1, len(losses) // 20))
        fig = new_figure(figsize=(6, 4))
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
        from ..figure import new_figure

        fig = new_figure(figsize=(6, 4))
        ax = fig.add_subplot()
        ax.plot(self.lrs)
        ax.set_xlabel("batch")
        ax.set_ylabel("learning rate")
        fig.tight_layout()
        return fig
