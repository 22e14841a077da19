"""`MetricsCB` and `Accuracy`: the loss and metrics of each epoch, without a per-batch host sync.

Any object with `update(preds, targets)`, `compute()` and `reset()` is a metric, so torchmetrics
and torcheval metrics work as they are; so is a plain function `f(preds, targets) -> number`
(fastai's `accuracy`, a lambda, a `functools.partial`), averaged over the rows as fastai's
`AvgMetric` does. Batch results stay on the device as tensors, summed there; they are turned
into Python numbers once, at the end of a phase.

Every value reaches the row as a plain number, because the table, the CSV file, TensorBoard and
the monitors of EarlyStoppingCB and CheckpointCB all read numbers: a `compute()` that returns a
dict or several values (per-class scores) is spread over several columns here, once, rather
than taught to each reader.

Under torch.distributed the loss is summed with its sample count over processes, and a metric
that keeps sums (as `Accuracy` does) says so with `all_reduce(sum_fn)`, called before `compute()`;
torchmetrics metrics synchronise themselves in `compute()`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
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
from .metric_kinds import as_metric, batch_size, cells, free_name, metric_name

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


# The row's own columns, which MetricsCB writes itself; no metric may take their names.
_ROW_KEYS = ("epoch", "train_loss", "valid_loss", "time")


class MetricsCB(Callback):
    """Averages the loss (weighted by batch size) and computes `metrics` on the validation set.

    After each epoch one row `{'epoch', 'train_loss', 'valid_loss', <metrics>..., 'time'}` is
    appended to `.history` and set as `learn.epoch_log`, where later callbacks (progress,
    loggers, early stopping) read it.

    A metric is an object with `update(preds, targets)`, `compute()` and `reset()` (torchmetrics
    and torcheval metrics, `Accuracy`), or a function `f(preds, targets)` that returns one number
    per batch (a tensor stays on its device), averaged over the rows weighted by batch size, as
    fastai's `AvgMetric` does (several targets are passed as `f(preds, *targets)`).

    Columns: a keyword metric is named by its keyword; a positional one by its class in snake
    case (`F1Score()` -> 'f1_score') or, for a function, by its `__name__` (a partial's
    function's, 'lambda' for a lambda). Every name is distinct: a positional name already taken
    (by a keyword or an earlier metric) gets `_2`, `_3`, ... (`f1_score`, `f1_score_2`); the names
    of the row's own columns (epoch, train_loss, valid_loss, time) are refused. Each cell is a
    plain number: a dict from `compute()` (a torchmetrics MetricCollection) gives a column per
    key, named by the key alone; several values (a per-class tensor, a list, a numpy array) give
    `name_0`, `name_1`, ... (`name_0_1` for 2-d), nested values `key_0` or `name_key`. A column
    that would clash with another is suffixed the same way (and logged once); columns named after
    their metric keep their names before a dict's keys do.

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
        >>> MetricsCB(Accuracy(), Accuracy(), lambda p, y: (p - y).abs().mean())
        MetricsCB(accuracy, accuracy_2, lambda)
    """

    # a MetricsCB passed to the Learner or to fit replaces the attached one
    unique = True

    run_in_lr_find = False  # lr_find detaches it for the sweep

    order = ORDERS["MetricsCB"]

    def __init__(self, *metrics: Any, **named_metrics: Any) -> None:
        for key in named_metrics:
            if key in _ROW_KEYS:
                raise ValueError(
                    f"MetricsCB({key}=...): {key!r} is a column MetricsCB writes itself; pass "
                    f"the metric by another keyword name, e.g. MetricsCB(my_{key}=...)."
                )
        named = {k: as_metric(m, k) for k, m in named_metrics.items()}
        taken = set(named)
        positional: dict[str, Any] = {}
        for m in metrics:
            m = as_metric(m, None)
            name = metric_name(m)
            if name in _ROW_KEYS:
                raise ValueError(
                    f"MetricsCB got a metric named {name!r} ({m!r}), a column MetricsCB writes "
                    f"itself; pass it by another keyword name, e.g. MetricsCB(my_{name}=...)."
                )
            # Keyword names keep theirs; a positional metric whose name is taken is suffixed.
            name = free_name(name, taken)
            taken.add(name)
            positional[name] = m
        self.metrics: dict[str, Any] = {**positional, **named}
        self._renamed: set[str] = set()  # columns renamed to stay distinct, logged once
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
        losses, yb = self._losses, learn.yb
        losses.append(loss.detach())
        # The usual targets, one tensor, counted without batch_size's walk (this runs per batch).
        if type(yb) is Tensor and yb.dim():
            self._counts.append(yb.shape[0])
        else:
            self._counts.append(batch_size(yb, learn.xb))
        if len(losses) >= _CHUNK:
            self._stack()
        if not learn.training and self.metrics:
            preds = learn.preds.detach()
            for m in self.metrics.values():
                m.update(preds, yb)

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
            self._write_metrics(row)
        self._ran = True

    def _write_metrics(self, row: dict[str, Any]) -> None:
        """Each metric's value into `row` as plain numbers, one column each, no two alike."""
        values = [(name, m.compute()) for name, m in self.metrics.items()]
        spread = [cells(name, v, keys_as_names=True) for name, v in values]
        # A metric's own name (one value) is claimed first, then the columns of several values
        # (`name_0`, ...), then a dict's keys: a column's name does not depend on the order the
        # metrics were given in, and a keyword name is kept.
        taken = set(_ROW_KEYS) | set(row)
        columns: dict[tuple[int, int], str] = {}

        def claim_order(i: int) -> int:
            if isinstance(values[i][1], Mapping):
                return 2
            return 0 if [c for c, _ in spread[i]] == [values[i][0]] else 1

        for i in sorted(range(len(values)), key=claim_order):
            for j, (column, _) in enumerate(spread[i]):
                columns[i, j] = free = free_name(column, taken)
                taken.add(free)
                if free != column and column not in self._renamed:
                    self._renamed.add(column)
                    log.warning(
                        "Metric %r gives a column %r that is already taken; it is logged as %r.",
                        values[i][0],
                        column,
                        free,
                    )
        for i, metric_cells in enumerate(spread):
            for j, (_, value) in enumerate(metric_cells):
                row[columns[i, j]] = value

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
