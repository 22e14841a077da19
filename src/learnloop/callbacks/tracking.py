"""Safety callbacks for long fits: checkpoints, early stopping, and stopping on a non-finite loss.

They read the epoch's row, `learn.epoch_log`, that MetricsCB builds, so they run after it
(`ORDERS`); EarlyStoppingCB runs after the progress table too, so a stopped fit shows its last row.
Under torchrun, every rank captures a checkpoint at the same point and rank 0 writes it (see
`checkpoint.save_checkpoint`).
"""

from __future__ import annotations

import enum
import logging
import math
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import Tensor

from ..checkpoint import checkpoint_state, save_checkpoint
from ..dist import agree_any, is_distributed, is_main_process, world_size
from ..errors import check_int
from ..events import CancelFitException
from ..fsdp import is_sharded
from ..runs import earlier_checkpoints, refuse_earlier_run
from ..sharded import save_sharded
from ..state import unwrap_model
from ..tensors import to_plain
from ..types import PathLike
from .core import ORDERS, Callback

if TYPE_CHECKING:
    from ..learner import Learner

__all__ = ["CheckpointCB", "EarlyStoppingCB", "StopReason", "TerminateOnNaNCB"]

log = logging.getLogger(__name__)


class StopReason(enum.Enum):
    """Why a callback stopped the fit."""

    NOT_STOPPED = "not stopped"
    PATIENCE_EXHAUSTED = "no improvement for `patience` epochs"
    NON_FINITE_METRIC = "the monitored value is nan or infinite"
    NON_FINITE_LOSS = "the loss is nan or infinite"


def monitored_value(learn: Learner, monitor: str, who: str) -> float:
    """`learn.epoch_log[monitor]` as a float; a ValueError lists the values that exist."""
    row = learn.epoch_log
    if monitor not in row:
        have = [k for k in row if k not in ("epoch", "time")]
        hint = (
            f"available: {', '.join(have)}"
            if have
            else "the epoch log is empty: attach MetricsCB (and keep validation on for valid_* values)"
        )
        raise ValueError(
            f"{who} monitors {monitor!r}, which is not in learn.epoch_log; {hint}."
        )
    return float(to_plain(row[monitor]))


class _SkipsCancelledEpochs(Callback):
    """Base of the callbacks that read a monitored value after each epoch.

    When the epoch or its validation was cancelled, the values of the phases that did not run are
    absent from the row (see MetricsCB): `_monitored` then returns None and the epoch is skipped,
    where a value that is missing for any other reason (a misspelled name, validation turned
    off) is an error listing the values that exist.
    """

    _cancelled = False

    def before_epoch(self, learn: Learner, *args: Any, **kwargs: Any) -> None:
        self._cancelled = False

    def after_cancel_epoch(self, learn: Learner, *args: Any, **kwargs: Any) -> None:
        self._cancelled = True

    def after_cancel_validate(self, learn: Learner, *args: Any, **kwargs: Any) -> None:
        self._cancelled = True

    def _monitored(self, learn: Learner, monitor: str, who: str) -> float | None:
        if self._cancelled and monitor not in learn.epoch_log:
            log.info(
                "%s: %r is absent in epoch %d, which was cancelled: not checked.",
                type(self).__name__,
                monitor,
                learn.epoch,
            )
            return None
        return monitored_value(learn, monitor, who)


class _Monitor:
    """Tracks the best value of one metric, in `mode` 'min' or 'max', with a `min_delta` margin."""

    def __init__(self, monitor: str, mode: str, min_delta: float, who: str) -> None:
        if mode not in ("min", "max"):
            raise ValueError(f"{who} mode must be 'min' or 'max', got {mode!r}.")
        if min_delta < 0:
            raise ValueError(f"{who} min_delta must be >= 0, got {min_delta}.")
        self.monitor, self.mode, self.min_delta = monitor, mode, min_delta
        self.best = math.inf if mode == "min" else -math.inf

    def improved(self, value: float) -> bool:
        """Whether `value` beats the best so far by more than `min_delta` (nan never does)."""
        if self.mode == "min":
            return value < self.best - self.min_delta
        return value > self.best + self.min_delta


class CheckpointCB(_SkipsCancelledEpochs):
    """Writes `path/last.pt` every `every` epochs and when the fit ends, and `path/best.pt` whenever
    `monitor` (an `epoch_log` key, e.g. 'valid_loss') improves in `mode` 'min' or 'max'.

    Both are full checkpoints: `learn.fit(n, resume=path)` continues from `path/last.pt`, and
    `learn.load(path / 'best.pt')` restores the best epoch. The best value so far is part of the
    checkpoint, so a resumed fit writes best.pt only when it beats the saved one. An epoch's files
    are written once every callback's `after_epoch` has run (at the next `before_epoch`, or at
    `after_fit`), so they hold the state of callbacks that update in `after_epoch` too (early
    stopping counters, per-epoch schedulers).

    Inside an epoch, `every_steps` (training batches) and `every_minutes` (either or both) write
    `last.pt` at a batch boundary, after the optimizer step and every other built-in callback's
    `after_batch` (this one runs after them: a callback of yours that changes state in
    `after_batch` needs a lower `order`). A fit resumed from it continues at the next batch,
    exactly as if never stopped (see `learnloop.midepoch`). `best.pt` stays per epoch. A
    preemption signal (see `Learner.preempt_signals`) also writes `last.pt` at the batch boundary.

    Under torchrun every rank reaches each write at the same point (the epoch's end, the same
    batch, rank 0's clock and its monitored value deciding for all) and captures its part:
    rank 0 writes the file, with the loss sums and accumulated gradients of every process and
    each rank's random number generators, which each rank gets back on resume (with the same
    number of processes), so per-rank seeds resume exactly too.

    Example:
        >>> learn.fit(4, cbs=[CheckpointCB("ckpt", monitor="valid_loss")])  # doctest: +SKIP
        >>> Learner(model, dls).fit(8, cbs=[CheckpointCB("ckpt")], resume="ckpt")  # doctest: +SKIP
        >>> learn.fit(1, cbs=[CheckpointCB("ckpt", every_steps=500)], resume="auto")  # doctest: +SKIP
    """

    run_in_lr_find = False  # lr_find detaches it for the sweep
    run_in_profile = False  # learn.profile detaches it: it writes files

    order = ORDERS["CheckpointCB"]

    def __init__(
        self,
        path: PathLike = "checkpoints",
        every: int = 1,
        monitor: str | None = "valid_loss",
        mode: str = "min",
        overwrite: bool = False,
        every_steps: int | None = None,
        every_minutes: float | None = None,
    ) -> None:
        self.every = check_int(
            every, "CheckpointCB every", unit="epochs between writes"
        )
        if every_steps is not None:
            check_int(
                every_steps,
                "CheckpointCB every_steps",
                unit="training batches between writes",
            )
        if every_minutes is not None and not (
            isinstance(every_minutes, (int, float))
            and not isinstance(every_minutes, bool)
            and math.isfinite(every_minutes)
            and every_minutes > 0
        ):
            raise ValueError(
                f"CheckpointCB every_minutes must be a number of minutes > 0, got {every_minutes!r}: "
                "e.g. every_minutes=30, or None for no timed writes."
            )
        self.every_steps, self.every_minutes = every_steps, every_minutes
        self._steps = (
            0  # training batches done in the run (saved, so a resume counts on)
        )
        self._last_write = 0.0  # time.monotonic() of the last write, for every_minutes
        self.path = Path(path)
        _check_folder(self.path)
        self.overwrite = overwrite
        # The files this callback wrote: a later fit with it may replace them.
        self._written: set[Path] = set()
        self._best = None
        if monitor is not None:
            self._best = _Monitor(monitor, mode, 0.0, "CheckpointCB")
        # (last, best) owed for the epoch that just ended.
        self._due: tuple[bool, bool] | None = None
        self._owed = (
            False  # a step write waiting for the end of a gradient-accumulation group
        )

    @property
    def best(self) -> float | None:
        """The best monitored value so far (None without `monitor`)."""
        return self._best.best if self._best is not None else None

    def before_fit(self, learn: Learner, *args: Any, **kwargs: Any) -> None:
        self._due, self._owed = None, False
        self._last_write = time.monotonic()
        fresh = learn.resumed_from is None
        if fresh:
            self._steps = 0
        _check_folder(self.path)
        found = None
        if fresh and not self.overwrite and is_main_process():
            found = earlier_checkpoints(self.path, self._written)
        where = str(self.path)
        refuse_earlier_run(
            "CheckpointCB",
            self.path,
            found,
            f"To continue that run: fit(n, resume={where!r}). To keep it: give this fit "
            f"another folder. To replace it: CheckpointCB({where!r}, overwrite=True).",
        )
        # A fresh fit; a resumed one keeps the loaded best.
        if self._best is not None and fresh:
            self._best.best = math.inf if self._best.mode == "min" else -math.inf
        # A state that could not be written (a callback holding a deque, say) fails now, not
        # after the first epoch's training. Local (no collective): every process checks its own.
        checkpoint_state(learn)

    def after_epoch(self, learn: Learner, epoch: int, **kwargs: Any) -> None:
        last = (epoch + 1) % self.every == 0 or epoch + 1 == learn.n_epochs
        # Owed before the monitored value is read: if it is missing, after_fit still writes last.pt.
        self._due = (last, False)
        if self._best is not None:
            value = self._monitored(
                learn, self._best.monitor, "CheckpointCB (monitor=None: last.pt only)"
            )
            improved = value is not None and self._best.improved(value)
            if is_distributed():
                # Every rank must write best.pt, or none: rank 0's value decides (a metric that
                # covers its own shard only differs between processes).
                improved = agree_any(improved and is_main_process())
            if improved:
                self._best.best = value if value is not None else self._best.best
                self._due = (last, True)

    def before_epoch(self, learn: Learner, *args: Any, **kwargs: Any) -> None:
        super().before_epoch(learn)
        self._write(learn, final=False)

    def after_fit(self, learn: Learner, *args: Any, **kwargs: Any) -> None:
        # Still due only if the fit ended between two epochs.
        self._write(learn, final=True)

    def after_batch(self, learn: Learner, *args: Any, **kwargs: Any) -> None:
        if not learn.training or (
            self.every_steps is None and self.every_minutes is None
        ):
            return
        self._steps += 1
        due = self.every_steps is not None and self._steps % self.every_steps == 0
        if self.every_minutes is not None:
            late = time.monotonic() - self._last_write >= 60 * self.every_minutes
            if world_size() > 1:  # rank 0's clock decides, for every process at once
                late = agree_any(late and is_main_process())
            due = due or late
        # Gradients FSDP holds inside itself (GradAccumCB mid-group) cannot be saved: the write
        # waits for the group's end (every process is at the same batch, so all wait).
        self._owed = self._owed or due
        if self._owed and not holds_unsynced_grads(learn):
            self._owed = False
            self.save_last(learn)

    def save_last(self, learn: Learner) -> Path:
        """Write `last.pt` now (inside an epoch: a mid-epoch checkpoint); returns its path."""
        self._last_write = time.monotonic()
        return self._save(learn, "last.pt")

    def _write(self, learn: Learner, final: bool) -> None:
        if self._due is None:
            return
        last, best = self._due
        self._due = None
        if last or final:
            self._save(learn, "last.pt")
        if best:
            self._save(learn, "best.pt")
            log.info(
                "CheckpointCB: %s improved to %.6g; wrote %s.",
                self._best.monitor,
                self.best,
                self.path / "best.pt",
            )

    def _save(self, learn: Learner, name: str) -> Path:
        # Every rank gets here at the same point (see the class docstring).
        if is_sharded(unwrap_model(learn.model)):  # FSDP: a numbered sharded folder
            path = save_sharded(learn, self.path, name.removesuffix(".pt"))
        else:
            path = save_checkpoint(learn, self.path / name, every_rank=True)
        self._written.add(path.resolve())
        return path

    def state_dict(self) -> dict[str, Any]:
        """The best value so far and the training batches counted for `every_steps` (for a resumed fit)."""
        return {"best": self.best, "steps": self._steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the best value so far and the batch count."""
        if self._best is not None and state.get("best") is not None:
            self._best.best = float(state["best"])
        self._steps = int(state.get("steps", 0))

    def __repr__(self) -> str:
        monitor = (
            f", monitor={self._best.monitor!r}, mode={self._best.mode!r}"
            if self._best
            else ""
        )
        steps = "".join(
            f", {k}={v}"
            for k, v in (
                ("every_steps", self.every_steps),
                ("every_minutes", self.every_minutes),
            )
            if v is not None
        )
        return (
            f"CheckpointCB(path={str(self.path)!r}, every={self.every}{steps}{monitor})"
        )


def holds_unsynced_grads(learn: Learner) -> bool:
    """True while a callback holds gradients outside the parameters (GradAccumCB under FSDP, mid-group)."""
    return any(getattr(cb, "holds_unsynced_grads", False) for cb in learn.cbs)


def _check_folder(path: Path) -> None:
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(
            f"CheckpointCB path {path} is a file; it needs a folder (for last.pt and best.pt): "
            "pass a folder path."
        )


class EarlyStoppingCB(_SkipsCancelledEpochs):
    """Stops the fit after `patience` epochs in a row without `monitor` improving by more than `min_delta`.

    A non-finite monitored value stops at once (`check_finite=False` turns that off). After the fit,
    `.stop_reason` (a StopReason) and `.stopped_epoch` say why and when it stopped.

    Example:
        >>> learn.fit(50, cbs=[EarlyStoppingCB("valid_loss", patience=3)])  # doctest: +SKIP
    """

    run_in_lr_find = False  # lr_find detaches it for the sweep
    run_in_profile = False  # learn.profile detaches it: it stops fits

    order = ORDERS["EarlyStoppingCB"]

    def __init__(
        self,
        monitor: str = "valid_loss",
        mode: str = "min",
        patience: int = 3,
        min_delta: float = 0.0,
        check_finite: bool = True,
    ) -> None:
        check_int(patience, "EarlyStoppingCB patience", unit="epochs")
        self._best = _Monitor(monitor, mode, min_delta, "EarlyStoppingCB")
        self.patience, self.check_finite = patience, check_finite
        self._reset()

    def _reset(self) -> None:
        self._best.best = math.inf if self._best.mode == "min" else -math.inf
        self.wait = 0
        self.stop_reason = StopReason.NOT_STOPPED
        self.stopped_epoch: int | None = None

    @property
    def best(self) -> float:
        """The best monitored value so far."""
        return self._best.best

    def before_fit(self, learn: Learner, *args: Any, **kwargs: Any) -> None:
        if (
            learn.resumed_from is None
        ):  # a fresh fit; a resumed one keeps the loaded counters
            self._reset()
        else:
            self.stop_reason, self.stopped_epoch = StopReason.NOT_STOPPED, None

    def after_epoch(self, learn: Learner, epoch: int, **kwargs: Any) -> None:
        value = self._monitored(learn, self._best.monitor, "EarlyStoppingCB")
        if value is None:
            return
        if self.check_finite and not math.isfinite(value):
            self._stop(
                StopReason.NON_FINITE_METRIC, epoch, f"{self._best.monitor} is {value}"
            )
        if self._best.improved(value):
            self._best.best, self.wait = value, 0
            return
        self.wait += 1
        if self.wait >= self.patience:
            self._stop(
                StopReason.PATIENCE_EXHAUSTED,
                epoch,
                f"{self._best.monitor} did not improve on {self.best:.6g} for {self.wait} epochs",
            )

    def _stop(self, reason: StopReason, epoch: int, why: str) -> None:
        self.stop_reason, self.stopped_epoch = reason, epoch
        log.info("EarlyStoppingCB: stopping after epoch %d: %s.", epoch, why)
        raise CancelFitException(f"EarlyStoppingCB: {why}")

    def state_dict(self) -> dict[str, Any]:
        """The best value and the epochs waited since it."""
        return {"best": self.best, "wait": self.wait}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the best value and the epochs waited."""
        self._best.best, self.wait = float(state["best"]), int(state["wait"])

    def __repr__(self) -> str:
        b = self._best
        return (
            f"EarlyStoppingCB(monitor={b.monitor!r}, mode={b.mode!r}, patience={self.patience}, "
            f"min_delta={b.min_delta})"
        )


class TerminateOnNaNCB(Callback):
    """Stops the fit as soon as a batch loss is nan or infinite, before that loss is backpropagated.

    The warning and `.stopped_at` name the epoch, the phase and the batch. Checking costs one host
    sync per batch.

    Example:
        >>> learn.fit(10, cbs=[TerminateOnNaNCB()])  # doctest: +SKIP
    """

    run_in_lr_find = False  # lr_find detaches it for the sweep

    order = ORDERS["TerminateOnNaNCB"]

    def __init__(self) -> None:
        self.stopped_at: tuple[int, str, int] | None = None
        self.stop_reason = StopReason.NOT_STOPPED

    def before_fit(self, learn: Learner, *args: Any, **kwargs: Any) -> None:
        self.stopped_at, self.stop_reason = None, StopReason.NOT_STOPPED

    def after_loss(self, learn: Learner, loss: Tensor, **kwargs: Any) -> None:
        value = float(loss.detach().float().sum())
        if math.isfinite(value):
            return
        phase = "training" if learn.training else "validation"
        self.stopped_at = (learn.epoch, phase, learn.iter)
        self.stop_reason = StopReason.NON_FINITE_LOSS
        log.warning(
            "TerminateOnNaNCB: the loss is %s at epoch %d, %s batch %d; stopping the fit.",
            value,
            learn.epoch,
            phase,
            learn.iter,
        )
        raise CancelFitException(
            f"loss is {value} at epoch {learn.epoch}, {phase} batch {learn.iter}"
        )
