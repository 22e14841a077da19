"""`lr_find`: an exponential learning-rate sweep that leaves the learner as it found it.

The sweep (`Learner.lr_find`) is a short fit with `LRFinderCB` attached, run by
`learnloop.trial.trial_fit`, which restores the learner afterwards, bit for bit, as checkpoints do:
the model's parameters, buffers and train/eval mode, the optimizer (no optimizer afterwards if there
was none before), the random number generators (python, numpy, torch, CUDA, the train loader's), the
counters (`epoch`, `epochs_done`, `n_epochs`, ...), `epoch_log`, and the callbacks' attributes and
`state_dict()` (e.g. the GradScaler of `MixedPrecisionCB`). This holds when the sweep stops early on
divergence and when it raises.

What the sweep runs with: the callbacks that shape training (DeviceCB, DistributedCB,
MixedPrecisionCB, GradAccumCB, GradClipCB, your own) stay attached; those that report, schedule or
track a fit (Recorder, MetricsCB, ProgressCB, the schedulers, CheckpointCB, EarlyStoppingCB,
TerminateOnNaNCB, the loggers, ActivationStatsCB, and any callback with `run_in_lr_find = False`)
are detached for the sweep, so the Recorder, the metrics history, the logs and the checkpoints
still describe your last real fit. The sweep's own record is on the returned `LRFindResult`.

Reading the loss for the divergence test costs one host sync per sweep batch; the sweep is short.
Under torchrun the loss recorded is the mean over processes (one all-reduce per sweep batch), so
every process sweeps and suggests alike.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch

from ..dist import is_distributed, sum_across_processes, world_size
from ..errors import check_int, check_lr
from ..events import CancelFitException
from ..trial import trial_fit
from .core import ORDERS, Callback

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from ..learner import Learner

__all__ = ["SUGGESTERS", "LRFindResult", "LRFinderCB"]


def _valley(lrs: list[float], losses: list[float]) -> int:
    """fastai's valley: the longest decreasing run of the loss; a point a bit past its middle."""
    n = len(losses)
    lds = [1] * n
    max_start = max_end = 0
    for i in range(1, n):
        for j in range(i):
            if losses[i] < losses[j] and lds[i] < lds[j] + 1:
                lds[i] = lds[j] + 1
            if lds[max_end] < lds[i]:
                max_end = i
                max_start = max_end - lds[max_end]
    sections = (max_end - max_start) / 3
    return max_start + int(sections) + int(sections / 2)


def _steep(lrs: list[float], losses: list[float]) -> int:
    """Where the loss falls fastest against log(lr)."""
    slopes = [
        (losses[i + 1] - losses[i]) / (math.log(lrs[i + 1]) - math.log(lrs[i]))
        for i in range(len(losses) - 1)
    ]
    return min(range(len(slopes)), key=slopes.__getitem__)


def _minimum(lrs: list[float], losses: list[float]) -> int:
    """The lowest loss (the suggestion is that lr divided by 10)."""
    return min(range(len(losses)), key=losses.__getitem__)


SUGGESTERS: dict[str, Callable[[list[float], list[float]], int]] = {
    "valley": _valley,
    "steep": _steep,
    "minimum": _minimum,
}


class LRFindResult(float):
    """A float, the suggested lr, with the sweep: `.lrs`, `.losses`, `.smoothed`, `.plot()`."""

    lrs: list[float]
    losses: list[float]
    smoothed: list[float]
    method: str

    def __new__(  # noqa: PYI034 - typing.Self needs Python 3.11
        cls,
        value: float,
        lrs: Sequence[float] = (),
        losses: Sequence[float] = (),
        smoothed: Sequence[float] = (),
        method: str = "valley",
    ) -> LRFindResult:
        self = super().__new__(cls, value)
        self.lrs, self.losses, self.smoothed = list(lrs), list(losses), list(smoothed)
        self.method = method
        self._figure: Figure | None = None
        return self

    def __reduce__(self) -> tuple[Any, ...]:
        return (
            type(self),
            (float(self), self.lrs, self.losses, self.smoothed, self.method),
        )

    def plot(self) -> Figure:
        """Smoothed loss against learning rate (log axis), the suggestion marked.

        Drawn once: later calls return the same figure, so `lr = learn.lr_find(); lr.plot()` in a
        notebook cell shows it once, not twice (a call in a later cell shows it again).
        """
        from ..notebook import show_at_cell_end

        if self._figure is None:
            self._figure = self._draw()  # a new figure: shown at the cell's end
        else:
            show_at_cell_end(self._figure)
        return self._figure

    def _draw(self) -> Figure:
        from ..figure import new_figure

        fig = new_figure(figsize=(6, 4))
        ax = fig.add_subplot()
        ax.plot(self.lrs, self.losses, alpha=0.3, label="loss (raw)")
        ax.plot(self.lrs, self.smoothed, label="loss (smoothed)")
        lr = float(self)
        nearest = min(
            range(len(self.smoothed)), key=lambda k: abs(math.log(self.lrs[k] / lr))
        )
        y = self.smoothed[nearest]
        ax.axvline(lr, color="red", linestyle="--", linewidth=1)
        ax.plot([lr], [y], "o", color="red", label=f"{self.method}: {lr:.2e}")
        finite = [v for v in self.smoothed if math.isfinite(v)]
        if finite:
            ax.set_ylim(
                min(finite) - 0.05 * abs(min(finite)),
                min(max(finite), 2 * abs(finite[0])) * 1.05,
            )
        ax.set_xscale("log")
        ax.set_xlabel("learning rate (log scale)")
        ax.set_ylabel("loss")
        ax.legend()
        fig.tight_layout()
        return fig


class LRFinderCB(Callback):
    """Raises the learning rate exponentially each training batch and records the loss.

    Stops the fit after `num_it` batches, or when the smoothed loss exceeds `div_factor` times its
    best (or is not finite) if `stop_div`. Use it through `learn.lr_find()`, which restores the
    learner afterwards.

    Example:
        >>> lr = learn.lr_find(num_it=50)  # doctest: +SKIP
    """

    order = ORDERS["LRFinderCB"]

    def __init__(
        self,
        start_lr: float = 1e-7,
        end_lr: float = 10.0,
        num_it: int = 100,
        stop_div: bool = True,
        div_factor: float = 4.0,
        beta: float = 0.98,
    ) -> None:
        check_lr(start_lr, "lr_find start_lr")
        check_lr(end_lr, "lr_find end_lr")
        if not start_lr < end_lr:
            raise ValueError(
                f"Need 0 < start_lr < end_lr, got start_lr={start_lr}, end_lr={end_lr}."
            )
        check_int(num_it, "LRFinderCB num_it", minimum=2, unit="batches")
        self.start_lr, self.end_lr, self.num_it = start_lr, end_lr, num_it
        self.stop_div, self.div_factor, self.beta = stop_div, div_factor, beta
        self.lrs: list[float] = []
        self.losses: list[float] = []
        self.smoothed: list[float] = []

    def before_fit(self, learn: Learner, *args: Any, **kwargs: Any) -> None:
        self.lrs, self.losses, self.smoothed = [], [], []
        self._avg, self._best = 0.0, math.inf

    def before_batch(self, learn: Learner, *args: Any, **kwargs: Any) -> None:
        if not learn.training:
            return
        pct = len(self.lrs) / (self.num_it - 1)
        lr = self.start_lr * (self.end_lr / self.start_lr) ** pct
        for group in learn.opt.param_groups:
            group["lr"] = lr
        self.lrs.append(lr)

    def after_loss(self, learn: Learner, loss: torch.Tensor, **kwargs: Any) -> None:
        if not learn.training:
            return
        loss = loss.detach().float()
        if is_distributed():
            # The global batch's loss: every process records the same losses, so all stop on
            # divergence at the same batch (one stopping alone would leave the others waiting
            # in a collective) and suggest the same lr.
            loss = sum_across_processes(loss) / world_size()
        value = float(loss)
        self.losses.append(value)
        self._avg = self.beta * self._avg + (1 - self.beta) * value
        smooth = self._avg / (1 - self.beta ** len(self.losses))
        self.smoothed.append(smooth)
        if self.stop_div and (
            not math.isfinite(smooth) or smooth > self.div_factor * self._best
        ):
            raise CancelFitException("lr_find: the loss diverged")
        self._best = min(self._best, smooth)

    def after_batch(self, learn: Learner, *args: Any, **kwargs: Any) -> None:
        if learn.training and len(self.losses) >= self.num_it:
            raise CancelFitException("lr_find: sweep done")

    def result(self, suggest: str = "valley") -> LRFindResult:
        """The suggested learning rate, computed with `suggest` (see `SUGGESTERS`) on the smoothed loss."""
        n = len(self.losses)
        lrs, smoothed = self.lrs[:n], self.smoothed
        points = [(lr, s) for lr, s in zip(lrs, smoothed) if math.isfinite(s)]
        if len(points) < 3:
            raise RuntimeError(
                f"lr_find recorded only {len(points)} finite losses before stopping (need 3): "
                f"the loss diverged at once or num_it is tiny; lower start_lr (now {self.start_lr}) "
                "or raise num_it."
            )
        xs, ys = [p[0] for p in points], [p[1] for p in points]
        lr = xs[SUGGESTERS[suggest](xs, ys)]
        if suggest == "minimum":
            lr /= 10
        return LRFindResult(lr, lrs, self.losses, smoothed, suggest)


def run_sweep(learn: Learner, finder: LRFinderCB, cbs: Sequence[Callback] = ()) -> None:
    """Run `finder`'s sweep as a short fit, then restore `learn` as it was (see the module docstring)."""
    # Enough epochs of one batch or more: the finder ends the fit after num_it batches. The
    # loader's length here is not the sweep's under torchrun, where DistributedCB shards it at
    # before_fit (half the batches on 2 processes, which stopped the sweep half way to end_lr).
    trial_fit(
        learn,
        [finder, *cbs],
        skip=lambda cb: not getattr(cb, "run_in_lr_find", True),
        n_epochs=finder.num_it,
        valid=False,
    )
