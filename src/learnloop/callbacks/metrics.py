"""`MetricsCB` and `Accuracy`: the loss and metrics of each epoch, without a per-batch host sync.

Any object with `update(preds, targets)`, `compute()` and `reset()` is a metric, so torchmetrics
and torcheval metrics work as they are. Batch results stay on the device as tensors, summed
there in chunks; they are turned into Python numbers once, at the end of a phase.

Under torch.distributed the loss is summed with its sample count over processes, and a metric
that keeps sums (as `Accuracy` does) says so with `all_reduce(sum_fn)`, called before `compute()`;
torchmetrics metrics synchronise themselves in `compute()`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from ..dist import (
    capturing_on_every_rank,
    gather_objects,
    is_distributed,
    rank,
    sum_across_processes,
    world_size,
)
from ..tensors import stack_scalars, to_plain
from .core import ORDERS, Callback

if TYPE_CHECKING:
    from ..learner import Learner

__all__ = ["Accuracy", "MetricsCB"]

log = logging.getLogger(__name__)

# Batch losses are folded into one device-side sum every this many batches.
_CHUNK = 512


class Accuracy:
    """Share of rows whose arg-max prediction equals the target (counts kept on the device)."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """Forget every update."""
        self.correct: Tensor | int = 0
        self.total = 0

    def update(self, preds: Tensor, targets: Tensor) -> None:
        """Count the correct rows of one batch."""
        if preds.shape[0] != targets.shape[0]:
            raise ValueError(
                f"Accuracy got {preds.shape[0]} predictions for {targets.shape[0]} targets "
                f"(preds shape {tuple(preds.shape)}, targets shape {tuple(targets.shape)})."
            )
        self.correct = self.correct + (preds.argmax(dim=-1) == targets).sum()
        self.total += targets.shape[0]

    def all_reduce(self, sum_fn: Callable[[Tensor], Tensor]) -> None:
        """Replace the counts by their sums over processes (`sum_fn` sums a tensor across them)."""
        self.correct = sum_fn(torch.as_tensor(self.correct))
        self.total = int(sum_fn(torch.as_tensor(self.total)))

    def compute(self) -> float:
        """Accuracy over every update since the last reset."""
        if self.total == 0:
            return float("nan")
        return float(self.correct) / self.total

    def __repr__(self) -> str:
        return "Accuracy()"


def _metric_name(metric: Any) -> str:
    name = type(metric).__name__
    return "".join(
        "_" + c.lower() if c.isupper() and i else c.lower() for i, c in enumerate(name)
    )


def _batch_size(yb: Any, xb: Any) -> int:
    for x in (yb, xb):
        if isinstance(x, Tensor) and x.dim() > 0:
            return x.shape[0]
        if isinstance(x, (tuple, list)) and x:
            return _batch_size(x[0], None)
    return 1


class MetricsCB(Callback):
    """Averages the loss (weighted by batch size) and computes `metrics` on the validation set.

    After each epoch one row `{'epoch', 'train_loss', 'valid_loss', <metrics>..., 'time'}` is
    appended to `.history` and set as `learn.epoch_log`, where later callbacks (progress,
    loggers, early stopping) read it.

    A row holds what ran, and nothing else. A batch counts once its loss reaches `after_loss`.
    `train_loss` is there if a training batch counted: a phase cancelled part way reports the
    mean over the batches that ran; one that ran no batch (or did not run) has no key, never nan
    and never another phase's or epoch's value. Likewise `valid_loss` and the metrics, for
    validation; `time` is there if either phase has a value. So an epoch cancelled before any
    batch ran (CancelEpochException in `before_epoch`, say) has the row `{'epoch': e}`. An epoch
    cut short by CancelFitException has no row (its `after_epoch` never fires), and
    `learn.epoch_log` is left at the last row.

    The batch losses are summed on the device in chunks of 512, so a long epoch keeps no tensor
    per batch, and nothing is read to the host before the phase ends.

    Its state (`state_dict`) is the history and, inside an epoch, the row so far and the open
    training phase's sums, so a fit resumed from a checkpoint has every row of the run in
    `.history`, and one resumed mid-epoch ends the epoch with the row an uninterrupted run has.
    Under torchrun a checkpoint every rank writes (CheckpointCB's, inside `dist.every_rank()`)
    carries the sums of every process, each of which gets its own back (with another number of
    processes, rank 0 gets their total); one that rank 0 writes alone
    (`learn.save` from a hook on rank 0) carries rank 0's own sums, so the resumed epoch's
    `train_loss` counts only rank 0's share of the batches before the save.

    Example:
        >>> learn = Learner(model, dls, cbs=[MetricsCB(Accuracy(), f1=F1Score())])  # doctest: +SKIP
    """

    # a MetricsCB passed to the Learner or to fit replaces the attached one
    unique = True

    run_in_lr_find = False  # lr_find detaches it for the sweep

    order = ORDERS["MetricsCB"]

    def __init__(self, *metrics: Any, **named_metrics: Any) -> None:
        for m in (*metrics, *named_metrics.values()):
            missing = [
                a
                for a in ("update", "compute", "reset")
                if not callable(getattr(m, a, None))
            ]
            if missing:
                raise TypeError(
                    f"{m!r} is not a metric: it lacks {', '.join(missing)}. A metric needs "
                    "update(preds, targets), compute() and reset() (torchmetrics metrics have them)."
                )
        self.metrics: dict[str, Any] = {_metric_name(m): m for m in metrics}
        self.metrics.update(named_metrics)
        self.history: list[dict[str, Any]] = []
        # The open phase ('train' or 'valid'), the epoch whose row is being built, and whether
        # that row has a phase's values yet.
        self._phase: str | None = None
        self._epoch: int | None = None
        self._ran = False
        self._start = 0.0
        self._elapsed = 0.0
        self._row: dict[str, Any] = {}
        self._loaded = False  # a state was loaded since the last fit (load_state_dict)
        self._clear()

    def _clear(self) -> None:
        # This chunk's batch losses (detached) and batch sizes; then, for each earlier chunk,
        # the sum of loss * batch size, and the batch sizes summed over those chunks.
        self._losses: list[Tensor] = []
        self._counts: list[int] = []
        self._sums: list[Tensor] = []
        self._rows = 0

    def before_fit(self, learn: Learner, *args: Any, **kwargs: Any) -> None:
        loaded, self._loaded = self._loaded, False
        if learn.resumed_from is None:
            self.history = []
        if learn.start_iter and loaded:
            return  # the resumed epoch goes on with the loaded row and sums
        self._phase, self._epoch, self._ran = None, None, False
        self._clear()

    def before_epoch(self, learn: Learner, epoch: int, **kwargs: Any) -> None:
        if learn.start_iter and self._epoch == epoch:  # resumed inside this epoch
            self._start = time.perf_counter() - self._elapsed
            learn.epoch_log = self._row
            return
        self._start = time.perf_counter()
        self._phase, self._epoch, self._ran = None, epoch, False
        learn.epoch_log = self._row = {"epoch": epoch}

    def before_train(self, learn: Learner, *args: Any, **kwargs: Any) -> None:
        if learn.start_iter and self._phase == "train":
            return  # resumed inside this phase: its sums so far are loaded
        self._phase = "train"
        self._clear()

    def before_validate(self, learn: Learner, *args: Any, **kwargs: Any) -> None:
        self._phase = "valid"
        self._clear()
        for m in self.metrics.values():
            m.reset()

    def after_loss(self, learn: Learner, loss: Tensor, **kwargs: Any) -> None:
        self._losses.append(loss.detach())
        self._counts.append(_batch_size(learn.yb, learn.xb))
        if len(self._losses) >= _CHUNK:
            self._stack()
        if not learn.training:
            for m in self.metrics.values():
                m.update(learn.preds.detach(), learn.yb)

    def _stack(self) -> None:
        """Fold this chunk's losses into one weighted sum, on their device (no host sync)."""
        if not self._losses:
            return
        self._sums.append(self._chunk_sum())
        self._rows += sum(self._counts)
        self._losses, self._counts = [], []
        if len(self._sums) >= _CHUNK:
            self._sums = [torch.stack(self._sums).sum()]

    def _chunk_sum(self) -> Tensor:
        """This chunk's losses weighted by their batch sizes, summed (there must be losses)."""
        losses = stack_scalars(self._losses)
        counts = torch.tensor(self._counts, dtype=losses.dtype)
        return (losses * counts.to(losses.device, non_blocking=True)).sum()

    def _mean_loss(self) -> float | None:
        """The open phase's loss per row, over every process; None if no process saw a batch."""
        self._stack()
        total = torch.stack(self._sums).sum() if self._sums else torch.zeros(())
        # Every rank calls this, even with an empty shard, so the all-reduces match.
        total, rows = sum_across_processes(total), int(sum_across_processes(self._rows))
        return float(total) / rows if rows else None

    def _sync_metrics(self) -> None:
        if not is_distributed():
            return
        for name, m in self.metrics.items():
            if callable(getattr(m, "all_reduce", None)):
                m.all_reduce(sum_across_processes)
            # torchmetrics syncs itself in compute()
            elif not hasattr(m, "sync_on_compute"):
                log.warning(
                    "Metric %r has no all_reduce(sum_fn): it covers this process's shard only.",
                    name,
                )

    def _close(self, learn: Learner) -> None:
        """Write the open phase's loss (and, for validation, the metrics) into the row, if it saw a batch."""
        phase, self._phase = self._phase, None
        mean = self._mean_loss()
        self._clear()
        if mean is None:
            return
        row = learn.epoch_log
        if phase == "train":
            row["train_loss"] = mean
        else:
            row["valid_loss"] = mean
            self._sync_metrics()
            for name, m in self.metrics.items():
                row[name] = to_plain(m.compute())
        self._ran = True

    def after_train(self, learn: Learner, *args: Any, **kwargs: Any) -> None:
        if self._phase == "train":
            self._close(learn)

    def after_validate(self, learn: Learner, *args: Any, **kwargs: Any) -> None:
        # Not open when another callback cancelled before_validate before this one saw it.
        if self._phase == "valid":
            self._close(learn)

    def after_epoch(self, learn: Learner, epoch: int, **kwargs: Any) -> None:
        # Another callback cancelled before_epoch before this one saw it: the row is bare.
        if self._epoch != epoch:
            learn.epoch_log = self._row = {"epoch": epoch}
        # A phase cut short by CancelEpochException (no after_train): what ran counts.
        if self._phase is not None:
            self._close(learn)
        if self._ran:
            learn.epoch_log["time"] = time.perf_counter() - self._start
        self.history.append(dict(learn.epoch_log))
        self._epoch, self._ran = None, False

    def after_fit(self, learn: Learner, *args: Any, **kwargs: Any) -> None:
        # An epoch cut short by CancelFitException (or an error) has no row.
        if self._epoch is not None:
            learn.epoch_log = dict(self.history[-1]) if self.history else {}
        self._phase, self._epoch, self._ran = None, None, False
        self._clear()

    def state_dict(self) -> dict[str, Any]:
        """The rows so far; inside an epoch also its row and the open training phase's sums.

        Inside `dist.every_rank()` under torch.distributed every process must call it at the same
        batch (CheckpointCB does): the sums are added up over processes. Elsewhere it is local,
        with this process's own sums.
        """
        state: dict[str, Any] = {"history": [_plain_row(r) for r in self.history]}
        if self._epoch is None:
            return state
        state["epoch"] = {
            "epoch": self._epoch,
            "phase": self._phase if self._phase == "train" else None,
            "ran": self._ran,
            "elapsed": time.perf_counter() - self._start,
            "row": _plain_row(self._row),
        }
        if self._phase == "train":
            state["epoch"].update(self._sums_state())
        return state

    def _sums_state(self) -> dict[str, Any]:
        """The open phase's sums as tensors, as they are on this process (so the resumed sums are
        bitwise the same).

        In a capture every rank makes, every process's own sums (`ranks`, which each rank takes
        back with the same number of processes), and their total over processes for rank 0
        otherwise. The live sums are not folded for it: that would change this run's loss.
        """
        own = {
            "losses": stack_scalars(self._losses).cpu()
            if self._losses
            else torch.zeros(0),
            "counts": list(self._counts),
            "sums": torch.stack(self._sums).cpu() if self._sums else torch.zeros(0),
            "rows": self._rows,
        }
        if not capturing_on_every_rank():
            return own
        parts = self._sums + ([self._chunk_sum()] if self._losses else [])
        total = torch.stack(parts).sum() if parts else torch.zeros(())
        return {
            "losses": torch.zeros(0),
            "counts": [],
            "sums": sum_across_processes(total).reshape(1).float().cpu(),
            "rows": int(sum_across_processes(self._rows + sum(self._counts))),
            "ranks": gather_objects(own),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the rows (and the open epoch's row and sums) that `state_dict` saved."""
        self.history = [dict(r) for r in state.get("history", [])]
        self._loaded = True
        epoch = state.get("epoch")
        self._clear()
        if epoch is None:
            self._phase, self._epoch, self._ran = None, None, False
            return
        self._epoch, self._phase, self._ran = (
            epoch["epoch"],
            epoch["phase"],
            epoch["ran"],
        )
        self._elapsed, self._row = float(epoch["elapsed"]), dict(epoch["row"])
        if epoch["phase"] != "train":
            return
        sums = epoch if rank() == 0 else None  # rank 0 carries the total over processes
        ranks = epoch.get("ranks")
        if ranks is not None and len(ranks) == world_size():
            sums = ranks[rank()]  # each process its own, as they were
        if sums is not None:
            self._losses = list(sums["losses"].unbind())
            self._counts = [int(c) for c in sums["counts"]]
            self._sums = list(sums["sums"].unbind())
            self._rows = int(sums["rows"])

    def __repr__(self) -> str:
        return f"MetricsCB({', '.join(self.metrics)})"


def _plain_row(row: dict[str, Any]) -> dict[str, Any]:
    """A row with plain values only (for checkpoints)."""
    return {k: to_plain(v) for k, v in row.items()}
