"""`ProgressCB`: progress bars for epochs and batches, and the per-epoch table of metrics.

On a terminal: tqdm's epoch bar, a batch bar with the running loss, and the table above them.
In a notebook (with or without ipywidgets): the same bars and table, each one output updated in
place (`learnloop.notebook`: tqdm's text bars stack in Jupyter, which ignores their cursor-up
escapes), and with `plot=True` a live loss plot, one image updated in place. Where the output is
not a terminal (CI logs, `> file`): no bars and no carriage returns, one line per epoch.
The running loss is read (a host sync) only when the bar's refresh interval has passed.
Under torchrun only rank 0 writes anything; the other processes stay silent.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import IO, TYPE_CHECKING, Any

from ..dist import is_main_process
from ..notebook import LiveOutput, NotebookBar, in_notebook, mark_shown
from .core import ORDERS, Callback

if TYPE_CHECKING:
    from ..learner import Learner

__all__ = ["ProgressCB"]

log = logging.getLogger(__name__)


def _fmt(key: str, value: Any) -> str:
    if key == "time" and isinstance(value, float):
        return (
            f"{value:.1f}s"
            if value < 60
            else f"{int(value // 60)}:{int(value % 60):02d}"
        )
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def format_row(row: dict[str, Any], columns: list[str], widths: list[int]) -> str:
    """Right-align each value of `row` in its column (`columns`, `widths`); a missing value is blank."""
    return "  ".join(
        (_fmt(k, row[k]) if k in row else "").rjust(w) for k, w in zip(columns, widths)
    ).rstrip()


def merge_columns(columns: list[str], row: dict[str, Any]) -> list[str]:
    """`columns` with the keys of `row` they lack, each before the next key of `row` they have."""
    out, keys = list(columns), list(row)
    for i, key in enumerate(keys):
        if key not in out:
            after = [k for k in keys[i + 1 :] if k in out]
            out.insert(out.index(after[0]) if after else len(out), key)
    return out


class ProgressCB(Callback):
    """Progress bars and a per-epoch table of `learn.epoch_log`.

    The table has a line for each epoch that has a row, with a blank cell for a value the row
    lacks (a cancelled phase's, see MetricsCB); a row bringing new columns (validation cancelled
    in the first epoch, say) prints the header again. Each phase starts the batch bar afresh,
    with its own label and no loss; the bars are closed when the fit ends, however it ends.

    In a notebook each bar, the table and the plot are one output, updated in place; the batch
    bar is cleared when the fit ends.

    Args:
        plot: in a notebook, redraw the loss plot live (needs a Recorder).
        file: where to write (default: sys.stdout at fit time, or the notebook's outputs).
        bar: force the bars on or off; None shows them on a terminal or in a notebook.
        mininterval: seconds between bar refreshes (and running-loss reads).

    Example:
        >>> learn = Learner(model, dls, cbs=[ProgressCB(plot=True)])  # doctest: +SKIP
    """

    # a ProgressCB passed to the Learner or to fit replaces the attached one
    unique = True

    run_in_lr_find = False  # lr_find detaches it for the sweep

    order = ORDERS["ProgressCB"]

    def __init__(
        self,
        plot: bool = False,
        file: IO[str] | None = None,
        bar: bool | None = None,
        mininterval: float = 0.2,
    ) -> None:
        self.plot, self.file, self.bar, self.mininterval = plot, file, bar, mininterval
        self._epoch_bar: Any = None
        self._batch_bar: Any = None
        self._columns: list[str] = []
        self._widths: list[int] = []
        self._plot_out: LiveOutput | None = None
        self._table: LiveOutput | None = None
        self._lines: list[str] = []
        self._bars: bool | None = None
        self._in_fit = False
        self._pending = 0
        self._drawn = 0.0
        self._silent = self._notebook = self._live = False

    def _tqdm(self) -> Any:
        if self._live:
            return NotebookBar
        from tqdm import tqdm

        return tqdm

    def _setup(self) -> None:
        # Under torchrun only rank 0 shows progress.
        self._silent = not is_main_process()
        self._out = self.file if self.file is not None else sys.stdout
        self._notebook = in_notebook() and not self._silent
        # Bars and table as notebook outputs, unless a file was asked for.
        self._live = self._notebook and self.file is None
        isatty = getattr(self._out, "isatty", lambda: False)()
        self._bars = self.bar if self.bar is not None else (isatty or self._live)
        self._bars = self._bars and not self._silent

    def before_fit(self, learn: Learner, n_epochs: int, **kwargs: Any) -> None:
        self._setup()
        self._in_fit = True
        self._columns, self._widths = [], []
        self._plot_out = None
        if self.plot and not self._notebook:
            log.info(
                "ProgressCB(plot=True) draws live plots only in a notebook; use learn.recorder.plot_loss()."
            )
        if self._bars:
            self._epoch_bar = self._tqdm()(
                total=n_epochs,
                initial=learn.epoch if n_epochs > learn.epoch else 0,
                desc="epoch",
                file=self._out,
                mininterval=self.mininterval,
                dynamic_ncols=True,
            )
        if self._live:
            # The notebook's outputs in their order, bars above the table above the plot: the
            # batch bar's (blank until the first phase sets it) and the table's made now.
            if self._bars:
                self._batch_bar = NotebookBar(leave=False, visible=False)
            self._lines, self._table = [], LiveOutput()
            self._table.update({"text/plain": ""})

    def _start_batches(self, learn: Learner, desc: str) -> None:
        if self._bars is None:  # validate()/get_preds() outside a fit
            self._setup()
        if not self._bars:
            return
        self._last = time.monotonic()
        self._pending = 0
        if self._batch_bar is not None:  # one batch bar per fit, reset for each phase
            # Label and loss first: reset() redraws, and must not show the last phase's.
            self._batch_bar.set_description_str(desc, refresh=False)
            self._batch_bar.set_postfix_str("", refresh=False)
            self._batch_bar.reset(total=learn.n_iter)
        else:
            self._batch_bar = self._tqdm()(
                total=learn.n_iter,
                desc=desc,
                leave=False,
                file=self._out,
                mininterval=self.mininterval,
                dynamic_ncols=True,
            )
        if learn.training and learn.start_iter:  # resumed inside the epoch
            self._batch_bar.update(learn.start_iter)

    def before_train(self, learn: Learner, *args: Any, **kwargs: Any) -> None:
        self._start_batches(learn, "train")

    def before_validate(self, learn: Learner, *args: Any, **kwargs: Any) -> None:
        self._start_batches(learn, "valid")

    def after_batch(self, learn: Learner, loss: Any, **kwargs: Any) -> None:
        bar = self._batch_bar
        if bar is None:
            return
        # Batches are counted here and handed to tqdm once per refresh interval: a tqdm.update
        # per batch costs more than a small model's step.
        self._pending += 1
        now = time.monotonic()
        if now - self._last >= self.mininterval:
            self._last = now
            if loss is not None:
                bar.set_postfix_str(f"loss {float(loss.detach()):.4f}", refresh=False)
            if (
                self.plot
                and self._notebook
                and learn.training
                and now - self._drawn >= 5
            ):
                self._draw(learn)  # a whole figure: at most every 5 s within an epoch
            self._flush_count()

    def _flush_count(self) -> None:
        if self._batch_bar is not None and self._pending:
            self._batch_bar.update(self._pending)
        self._pending = 0

    def after_train(self, learn: Learner, *args: Any, **kwargs: Any) -> None:
        self._flush_count()

    def after_validate(self, learn: Learner, *args: Any, **kwargs: Any) -> None:
        self._flush_count()
        if not self._in_fit:  # validate()/get_preds(): nothing else will close it
            self._close_batch_bar()

    def after_epoch(self, learn: Learner, epoch: int, **kwargs: Any) -> None:
        row = dict(learn.epoch_log)
        # A row left from another epoch (nobody built this one) is not shown twice.
        if row and row.get("epoch", epoch) == epoch:
            lines = []
            if set(row) - set(self._columns):
                self._columns = merge_columns(self._columns, row)
                self._widths = [max(len(k), 9) for k in self._columns]
                lines.append(
                    "  ".join(k.rjust(w) for k, w in zip(self._columns, self._widths))
                )
            lines.append(format_row(row, self._columns, self._widths))
            self._write(*lines)  # one write: the bars are cleared and redrawn once
        if self._epoch_bar is not None:
            self._epoch_bar.update(1)
        if self.plot and self._notebook:
            self._draw(learn)

    def after_fit(self, learn: Learner, *args: Any, **kwargs: Any) -> None:
        self._in_fit = False
        self._close_batch_bar()
        if self._epoch_bar is not None:
            self._epoch_bar.close()
            self._epoch_bar = None
        self._bars = None
        self._table = self._plot_out = None

    def _close_batch_bar(self) -> None:
        self._flush_count()
        if self._batch_bar is not None:
            self._batch_bar.close()
            self._batch_bar = None

    def _write(self, *lines: str) -> None:
        if self._silent:
            return
        if self._table is not None:  # in a notebook: the whole table, one output
            self._lines.extend(lines)
            self._table.update({"text/plain": "\n".join(self._lines)})
        elif self._bars:
            from tqdm import tqdm

            tqdm.write("\n".join(lines), file=self._out)
        else:
            print(*lines, sep="\n", file=self._out, flush=True)

    def _draw(self, learn: Learner) -> None:
        try:
            recorder = learn.recorder
        except AttributeError:
            return
        from ..figure import png_data  # imports matplotlib, as plot_loss just did

        self._drawn = time.monotonic()
        fig = recorder.plot_loss()
        mark_shown(fig)  # shown here, in place: not again when the cell ends
        if self._plot_out is None:
            self._plot_out = LiveOutput()
        self._plot_out.update(png_data(fig))
