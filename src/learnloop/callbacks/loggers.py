"""Loggers of the per-epoch row `learn.epoch_log`: a CSV file, and TensorBoard where it is installed.

The CSV file is opened, appended to and closed at each epoch's end, so every finished epoch is
on disk even if the process dies, and no file handle outlives an interrupted fit.
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..dist import is_main_process
from ..tensors import to_plain
from ..types import PathLike
from .core import ORDERS, Callback

if TYPE_CHECKING:
    from ..learner import Learner

__all__ = ["CSVLoggerCB", "TensorBoardCB"]

log = logging.getLogger(__name__)


class CSVLoggerCB(Callback):
    """Writes `learn.epoch_log` to the CSV file `path`: a header, then one row per epoch.

    A fresh fit starts the file anew. A resumed fit (`fit(n, resume=...)`) appends to it, first
    dropping rows of the epochs it is about to run again, so each epoch appears once.

    Example:
        >>> learn.fit(3, cbs=[CSVLoggerCB("history.csv")])  # doctest: +SKIP
    """

    run_in_lr_find = False  # lr_find detaches it for the sweep

    order = ORDERS["CSVLoggerCB"]

    def __init__(self, path: PathLike = "history.csv") -> None:
        self.path = Path(path)
        self._fields: list[str] | None = None
        self._active = True

    def before_fit(self, learn: Learner, *args: Any, **kwargs: Any) -> None:
        self._fields = None
        self._active = is_main_process()  # under torchrun only rank 0 writes
        if not self._active:
            return
        # Resumed: keep the rows of the epochs already done.
        if learn.epoch > 0 and self.path.is_file():
            self._keep_rows_before(learn.epoch)
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text("")

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
        elif set(row) - set(self._fields):
            log.warning(
                "CSVLoggerCB: %s has columns %s; new values %s are not written.",
                self.path,
                self._fields,
                sorted(set(row) - set(self._fields)),
            )
        self._write([row], mode="a", header=header)

    def _write(self, rows: list[dict[str, Any]], mode: str, header: bool) -> None:
        with open(self.path, mode, newline="") as f:
            writer = csv.DictWriter(
                f, fieldnames=self._fields, restval="", extrasaction="ignore"
            )
            if header:
                writer.writeheader()
            writer.writerows(rows)

    def __repr__(self) -> str:
        return f"CSVLoggerCB(path={str(self.path)!r})"


class TensorBoardCB(Callback):
    """Logs each numeric value of `learn.epoch_log` to TensorBoard in the folder `path` (None: TensorBoard's `runs/<date>_<host>`), step = epoch.

    With `batch_loss=True` it also logs every training batch's loss (one host sync per batch).
    Needs the `tensorboard` package (`pip install tensorboard`).

    Example:
        >>> learn.fit(3, cbs=[TensorBoardCB("runs/exp1")])  # doctest: +SKIP
    """

    run_in_lr_find = False  # lr_find detaches it for the sweep

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
        per_epoch = len(learn.dls.train) if hasattr(learn.dls.train, "__len__") else 0
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
