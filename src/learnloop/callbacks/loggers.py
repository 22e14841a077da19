"""Loggers of the per-epoch row `learn.epoch_log`: a CSV file, and TensorBoard where it is installed.

The CSV file is opened, appended to and closed at each epoch's end, so every finished epoch is
on disk even if the process dies, and no file handle outlives an interrupted fit.
"""

from __future__ import annotations

import csv
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..dist import is_main_process
from ..runs import earlier_rows, refuse_earlier_run
from ..tensors import to_plain
from ..types import PathLike, length
from .core import ORDERS, Callback

if TYPE_CHECKING:
    from ..learner import Learner

__all__ = ["CSVLoggerCB", "TensorBoardCB"]

log = logging.getLogger(__name__)


class CSVLoggerCB(Callback):
    """Writes `learn.epoch_log` to the CSV file `path`: a header, then one row per epoch.

    A file that holds an earlier run is never overwritten by surprise: a fresh fit refuses to start
    (before its first epoch) unless `overwrite=True`. A resumed fit (`fit(n, resume=...)`) appends,
    first dropping the rows of the epochs it is about to run again, so each epoch appears once. A
    later fit with the same logger appends its rows to the ones it wrote.

    Example:
        >>> learn.fit(3, cbs=[CSVLoggerCB("history.csv")])  # doctest: +SKIP
    """

    run_in_lr_find = False  # lr_find detaches it for the sweep
    run_in_profile = False  # learn.profile detaches it: it writes files

    order = ORDERS["CSVLoggerCB"]

    def __init__(self, path: PathLike = "history.csv", overwrite: bool = False) -> None:
        self.path = Path(path)
        if self.path.is_dir():
            raise IsADirectoryError(
                f"CSVLoggerCB path {self.path} is a folder: pass a file path, e.g. "
                f"{self.path / 'history.csv'}."
            )
        self.overwrite = overwrite
        self._fields: list[str] | None = None
        self._active = True
        self._written: set[Path] = set()  # resolved paths this logger wrote
        # How the first row of this fit goes in: "w" starts the file, "a" appends.
        self._start = "w"

    def before_fit(self, learn: Learner, *args: Any, **kwargs: Any) -> None:
        self._fields = None
        self._active = is_main_process()  # under torchrun only rank 0 writes
        resumed = learn.resumed_from is not None
        found = None
        if self._active and not resumed and not self.overwrite:
            found = earlier_rows(self.path, self._written)
        where = str(self.path)
        refuse_earlier_run(
            "CSVLoggerCB",
            self.path,
            found,
            "To continue that run: fit(n, resume=<its checkpoint>) appends to it. To keep it: "
            f"log this fit to another file. To replace it: CSVLoggerCB({where!r}, "
            "overwrite=True).",
        )
        if not self._active:
            return
        # A fresh start writes nothing until the first row: a fit that fails before it leaves
        # the file be. A resumed fit drops the rows of the epochs it runs again.
        self._start = "a" if self.path.is_file() else "w"
        if resumed and self._start == "a":
            self._keep_rows_before(learn.epoch)  # reads the header too
        elif self._start == "a" and self.path.resolve() in self._written:
            self._fields = self._header()
        else:
            self._start = "w"

    def _header(self) -> list[str] | None:
        with open(self.path, newline="") as f:
            return next(csv.reader(f), None) or None

    def _keep_rows_before(self, epoch: int) -> None:
        with open(self.path, newline="") as f:
            reader = csv.DictReader(f)
            self._fields = list(reader.fieldnames or []) or None
            rows = list(reader)
        kept = [
            r
            for r in rows
            if not (r.get("epoch", "").isdigit() and int(r["epoch"]) >= epoch)
        ]
        if len(kept) < len(rows):
            self._write(kept, mode="w", header=True)

    def after_epoch(self, learn: Learner, *args: Any, **kwargs: Any) -> None:
        row = {k: to_plain(v) for k, v in learn.epoch_log.items()}
        if not row or not self._active:
            return
        header = self._fields is None
        if header:
            self._fields = list(row)
            self.path.parent.mkdir(parents=True, exist_ok=True)
        elif set(row) - set(self._fields):
            # A value the first rows lacked (a phase that did not run then): widen the header.
            self._fields += [k for k in row if k not in self._fields]
            if self._start == "a":
                self._rewrite_with_header()
        mode, self._start = self._start, "a"
        self._write([row], mode=mode, header=header)

    def _rewrite_with_header(self) -> None:
        with open(self.path, newline="") as f:
            rows = list(csv.DictReader(f))
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=self._fields, restval="")
            writer.writeheader()
            writer.writerows(rows)
        os.replace(tmp, self.path)  # the old rows are never half-written

    def _write(self, rows: list[dict[str, Any]], mode: str, header: bool) -> None:
        self._written.add(self.path.resolve())
        with open(self.path, mode, newline="") as f:
            writer = csv.DictWriter(
                f, fieldnames=self._fields, restval="", extrasaction="ignore"
            )
            if header:
                writer.writeheader()
            writer.writerows(rows)

    def __repr__(self) -> str:
        flag = ", overwrite=True" if self.overwrite else ""
        return f"CSVLoggerCB(path={str(self.path)!r}{flag})"


class TensorBoardCB(Callback):
    """Logs each numeric value of `learn.epoch_log` to TensorBoard in the folder `path` (None: TensorBoard's `runs/<date>_<host>`), step = epoch.

    With `batch_loss=True` it also logs every training batch's loss (one host sync per batch).
    Needs the `tensorboard` package (`pip install tensorboard`).

    Example:
        >>> learn.fit(3, cbs=[TensorBoardCB("runs/exp1")])  # doctest: +SKIP
    """

    run_in_lr_find = False  # lr_find detaches it for the sweep
    run_in_profile = False  # learn.profile detaches it: it writes files

    order = ORDERS["TensorBoardCB"]

    def __init__(self, path: PathLike | None = None, batch_loss: bool = False) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:
            raise ImportError(
                "TensorBoardCB needs the tensorboard package: pip install tensorboard"
            ) from e
        self._writer_cls = SummaryWriter
        self.path = None if path is None else Path(path)
        self.batch_loss = batch_loss
        self.writer: Any = None
        self._step = 0

    def before_fit(self, learn: Learner, *args: Any, **kwargs: Any) -> None:
        if not is_main_process():  # under torchrun only rank 0 writes
            self.writer = None
            return
        self.writer = self._writer_cls(
            log_dir=None if self.path is None else str(self.path)
        )
        per_epoch = length(learn.dls.train) or 0
        self._step = learn.epoch * per_epoch  # a resumed fit continues the batch axis

    def after_batch(self, learn: Learner, loss: Any, **kwargs: Any) -> None:
        if (
            self.writer is not None
            and self.batch_loss
            and learn.training
            and loss is not None
        ):
            self.writer.add_scalar("batch/train_loss", float(loss.detach()), self._step)
            self._step += 1

    def after_epoch(self, learn: Learner, epoch: int, **kwargs: Any) -> None:
        if self.writer is None:
            return
        for key, value in learn.epoch_log.items():
            value = to_plain(value)
            if key != "epoch" and isinstance(value, (int, float)):
                self.writer.add_scalar(f"epoch/{key}", value, epoch)
        self.writer.flush()

    def after_fit(self, learn: Learner, *args: Any, **kwargs: Any) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
