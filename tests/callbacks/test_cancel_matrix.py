"""MetricsCB, Recorder and ProgressCB under every cancel: rows, history, recorded values, table, bars.

Each case is one 3-epoch fit (3 training and 3 validation batches an epoch) in which `Canceller`
raises one Cancel* exception once: at one hook, in epoch 0 or 1, ordered before (-100) or after
(100) the built-in callbacks. In a batch it strikes batch `epoch` of its phase: in epoch 0 the
first (the phase may end with no batch counted), in epoch 1 the second (one batch ran before it).
A Cancel* raised outside the level it cancels is the loop's RuntimeError; those cases check the
same things on the rows that were made.

`Witness` runs right after MetricsCB (same order, attached later), so it sees the losses that
MetricsCB and the Recorder see; the expected rows are computed from what it saw, in plain Python.
"""

from __future__ import annotations

import io
import math
import re

import pytest
import torch
from helpers import make_data
from torch.utils.data import DataLoader

from learnloop import (
    Accuracy,
    Callback,
    CancelBackwardException,
    CancelBatchException,
    CancelEpochException,
    CancelFitException,
    CancelStepException,
    CancelTrainException,
    CancelValidException,
    DataLoaders,
    Learner,
    MetricsCB,
    ProgressCB,
)

LR = 0.05
N_EPOCHS = 3
TRAIN_HOOKS = ["before_batch", "after_pred", "after_loss", "before_backward"]
TRAIN_HOOKS += ["before_step", "after_step"]
# (hook, phase): phase is None for the hooks outside a batch.
SITES = [
    ("before_fit", None),
    ("before_epoch", None),
    ("before_train", None),
    ("before_validate", None),
    *[(h, "train") for h in TRAIN_HOOKS],
    *[(h, "valid") for h in ("before_batch", "after_pred", "after_loss")],
]
EXCEPTIONS = [
    CancelFitException,
    CancelEpochException,
    CancelTrainException,
    CancelValidException,
    CancelBatchException,
    CancelBackwardException,
    CancelStepException,
]


def levels(hook: str, phase: str | None) -> set[type]:
    """The Cancel* exceptions that `hook` may raise: those of the levels around it."""
    around = {CancelFitException}
    if hook != "before_fit":
        around.add(CancelEpochException)
    if hook == "before_train" or phase == "train":
        around.add(CancelTrainException)
    if hook == "before_validate" or phase == "valid":
        around.add(CancelValidException)
    if phase is not None:
        around.add(CancelBatchException)
    around |= {
        "before_backward": {CancelBackwardException},
        "before_step": {CancelStepException},
    }.get(hook, set())
    return around


CASES = [
    pytest.param(
        hook,
        phase,
        epoch,
        exc,
        order,
        id=f"{hook}-{phase}-e{epoch}-{exc.__name__}-{order}",
    )
    for hook, phase in SITES
    for epoch in ((0,) if hook == "before_fit" else (0, 1))
    for exc in EXCEPTIONS
    for order in (-100, 100)
]


class FakeTTY(io.StringIO):
    def isatty(self):
        return True


def canceller(hook: str, phase: str | None, epoch: int, exc: type, order: int):
    """A callback that raises `exc()` once, at `hook` in `epoch` (batch `epoch` of `phase`)."""

    def fire(self, learn, *args, **kwargs):
        if self.fired or (hook != "before_fit" and learn.epoch != epoch):
            return
        if phase is not None and (
            learn.training != (phase == "train") or learn.iter != epoch
        ):
            return
        self.fired = True
        raise exc()

    cls = type("Canceller", (Callback,), {hook: fire, "order": order, "fired": False})
    return cls()


class Witness(Callback):
    """Sees each counted loss where MetricsCB does, and checks the batch bar as each batch starts."""

    order = MetricsCB.order

    def __init__(self, bars: list) -> None:
        self.bars = bars
        # (epoch, training, loss, batch size, correct predictions) of each counted batch
        self.seen: list[tuple[int, bool, float, int, int]] = []
        self.ended: list[int] = []  # epochs whose after_epoch fired
        self.phase_losses: list[float] = []  # losses after_batch passed in this phase
        self.problems: list[str] = []

    def before_train(self, learn, *args, **kwargs):
        self.phase_losses = []

    def before_validate(self, learn, *args, **kwargs):
        self.phase_losses = []

    def before_batch(self, learn, iter, **kwargs):
        bar = [b for b in self.bars if b.first_desc != "epoch"][-1]
        label = "train" if learn.training else "valid"
        shown = {"", None} | {f"loss {x:.4f}" for x in self.phase_losses}
        if bar.desc != label or bar.postfix not in shown:
            self.problems.append(
                f"epoch {learn.epoch} {label} batch {iter}: bar {bar.desc!r} {bar.postfix!r}"
            )

    def after_loss(self, learn, loss, **kwargs):
        correct = int((learn.preds.argmax(-1) == learn.yb).sum())
        self.seen.append(
            (learn.epoch, learn.training, loss.item(), len(learn.yb), correct)
        )

    def after_batch(self, learn, loss, **kwargs):
        if loss is not None:
            self.phase_losses.append(loss.item())

    def after_epoch(self, learn, epoch, **kwargs):
        self.ended.append(epoch)

    def expected_rows(self) -> list[dict]:
        """The rows the documented rule gives (time: None, for any float)."""
        rows = []
        for e in self.ended:
            row: dict = {"epoch": e}
            for training, key in ((True, "train"), (False, "valid")):
                seen = [s for s in self.seen if s[0] == e and s[1] == training]
                if seen:
                    n = sum(s[3] for s in seen)
                    row[f"{key}_loss"] = sum(s[2] * s[3] for s in seen) / n
                    if not training:
                        row["accuracy"] = sum(s[4] for s in seen) / n
            if len(row) > 1:
                row["time"] = None
            rows.append(row)
        return rows


def drawn_lines(text: str) -> list[str]:
    """What a terminal shows of each line ProgressCB wrote: cursor moves dropped, the text after the last \r."""
    return [_ESCAPE.sub("", line).rsplit("\r", 1)[-1] for line in text.split("\n")]


def table_lines(text: str) -> list[str]:
    """The table's lines in what ProgressCB wrote to a terminal (bars have a '|')."""
    return [line for line in drawn_lines(text) if line.strip() and "|" not in line]


def bar_draws(text: str) -> list[str]:
    """Every drawing of a batch bar in what ProgressCB wrote (a terminal shows the last of each line)."""
    draws = [_ESCAPE.sub("", d) for line in text.split("\n") for d in line.split("\r")]
    return [d for d in draws if d.startswith(("train:", "valid:"))]


def read_table(lines: list[str]) -> list[dict[str, str]]:
    """The table's data lines as {column: cell}, each cell matched to its header by where it ends."""
    rows, ends = [], {}
    for line in lines:
        cells = [(m.end(), m.group()) for m in _TOKEN.finditer(line)]
        if cells and cells[0][1] == "epoch":
            ends = {end: name for end, name in cells}
        else:
            assert all(end in ends for end, _ in cells), (line, ends)
            rows.append({ends[end]: cell for end, cell in cells})
    return rows


_TOKEN = re.compile(r"\S+")
_ESCAPE = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def check_cell(cell: str, key: str, value) -> bool:
    if key == "epoch":
        return cell == str(value)
    if key == "time":
        return cell.endswith("s")
    return cell == f"{value:.4f}"


@pytest.mark.parametrize("hook,phase,epoch,exc,order", CASES)
def test_cancel_matrix(hook, phase, epoch, exc, order, tqdm_bars):
    """Rows hold only what ran (no stale value, no duplicate), the Recorder only batches that ran, the table one line per row, and every bar is closed."""
    torch.manual_seed(0)
    dls = DataLoaders(
        DataLoader(make_data(12), batch_size=4),
        DataLoader(make_data(10, seed=1), batch_size=4),  # 4, 4, 2 rows: weights matter
    )
    out = FakeTTY()
    metrics, witness = MetricsCB(Accuracy()), Witness(tqdm_bars)
    cbs = [metrics, ProgressCB(file=out, bar=True, mininterval=0.0), witness]
    learn = Learner(torch.nn.Linear(4, 3), dls, lr=LR, cbs=cbs)
    stop = canceller(hook, phase, epoch, exc, order)
    if exc in levels(hook, phase):
        learn.fit(N_EPOCHS, cbs=[stop])
    else:
        with pytest.raises(RuntimeError, match="outside the level it cancels"):
            learn.fit(N_EPOCHS, cbs=[stop])
    assert stop.fired

    # Rows: one per epoch that ended, in order, holding exactly what ran.
    expected, history = witness.expected_rows(), metrics.history
    assert [list(r) for r in history] == [list(r) for r in expected]
    for got, want in zip(history, expected):
        for key, value in want.items():
            if key == "time":
                assert isinstance(got[key], float) and got[key] >= 0
            else:
                assert got[key] == pytest.approx(value, rel=1e-5), (key, history)
                assert not math.isnan(got[key])
    assert learn.epoch_log == (history[-1] if history else {})

    # Recorder: the training batches that ran, and the valid loss of epochs that validated.
    rec = learn.recorder
    train_losses = [s[2] for s in witness.seen if s[1]]
    assert rec.losses == pytest.approx(train_losses, rel=1e-6)
    assert rec.lrs == [LR] * len(train_losses)
    assert rec.valid_losses == [
        (sum(1 for s in witness.seen if s[1] and s[0] <= r["epoch"]), r["valid_loss"])
        for r in history
        if "valid_loss" in r
    ]

    # The table: a line per row, a blank cell for each missing value, nothing else.
    table = read_table(table_lines(out.getvalue()))
    assert len(table) == len(history)
    for cells, row in zip(table, history):
        assert set(cells) == set(row), (cells, row)
        assert all(check_cell(cells[k], k, row[k]) for k in row), (cells, row)

    # Bars: the batch bar never showed another phase's label or loss; all are closed.
    assert witness.problems == []
    stale = [d for d in bar_draws(out.getvalue()) if " 0/" in d and "loss" in d]
    assert stale == [], "a batch bar drawn before its phase's first batch shows a loss"
    assert [b.first_desc == "epoch" for b in tqdm_bars].count(True) <= 1
    assert len(tqdm_bars) <= 2 and all(b.closed for b in tqdm_bars)
