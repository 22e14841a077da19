"""ProgressCB: the epoch table, bars on a terminal, plain lines elsewhere, cheap running loss."""

from __future__ import annotations

import io
import re

import pytest
from helpers import FakeKernel, count_host_reads, make_data
from torch import nn
from torch.utils.data import DataLoader

from learnloop import (
    Accuracy,
    Callback,
    CancelEpochException,
    CancelFitException,
    CancelTrainException,
    CancelValidException,
    DataLoaders,
    Learner,
    MetricsCB,
    ProgressCB,
)
from learnloop.callbacks.progress import merge_columns


@pytest.fixture
def kernel(monkeypatch) -> FakeKernel:
    return FakeKernel().install(monkeypatch)


class FakeTTY(io.StringIO):
    def isatty(self):
        return True


def fit(out, epochs=2, n=64, bs=16, cbs=(), **kw):
    dls = DataLoaders(
        DataLoader(make_data(n), batch_size=bs),
        DataLoader(make_data(32, seed=1), batch_size=bs),
    )
    learn = Learner(
        nn.Linear(4, 3), dls, cbs=[MetricsCB(Accuracy()), ProgressCB(file=out, **kw)]
    )
    learn.fit(epochs, cbs=list(cbs))
    return learn


def test_not_a_terminal_plain_lines():
    """Written to a file: a header and one line per epoch, no carriage returns, no bars."""
    out = io.StringIO()
    fit(out, epochs=3)
    text = out.getvalue()
    assert "\r" not in text
    lines = text.splitlines()
    assert len(lines) == 4
    assert lines[0].split() == ["epoch", "train_loss", "valid_loss", "accuracy", "time"]
    assert [line.split()[0] for line in lines[1:]] == ["0", "1", "2"]


def test_table_columns_aligned():
    """Every column of the table ends at the same position on every line."""
    out = io.StringIO()
    fit(out, epochs=3)
    lines = out.getvalue().splitlines()
    ends = [
        [
            i
            for i, c in enumerate(line)
            if c != " " and (i + 1 == len(line) or line[i + 1] == " ")
        ]
        for line in lines
    ]
    assert all(e == ends[0] for e in ends)


def test_terminal_shows_bars():
    """On a terminal, tqdm bars are drawn with the running loss, and the table is still printed."""
    out = FakeTTY()
    fit(out, epochs=2, mininterval=0.0)
    text = out.getvalue()
    assert "\r" in text and "epoch" in text and "train" in text and "loss " in text
    assert "valid_loss" in text


def test_running_loss_read_on_interval(monkeypatch):
    """The running loss is read from the device only when the refresh interval has passed."""
    reads = count_host_reads(monkeypatch, ("__float__",))
    out = FakeTTY()
    dls = DataLoaders(DataLoader(make_data(800), batch_size=4), None)
    Learner(nn.Linear(4, 3), dls, cbs=[ProgressCB(file=out, mininterval=3600)]).fit(1)
    assert len(reads) <= 3  # 200 batches, an hour's interval: no per-batch read


def test_bars_closed_after_error(tqdm_bars):
    """An error mid-fit leaves no open bars behind."""

    class Boom(ProgressCB):
        def after_batch(self, learn, *args, **kwargs):
            super().after_batch(learn, *args, **kwargs)
            raise RuntimeError("boom")

    cb = Boom(file=FakeTTY())
    dls = DataLoaders(DataLoader(make_data(32), batch_size=8), None)
    learn = Learner(nn.Linear(4, 3), dls, cbs=[cb])
    with pytest.raises(RuntimeError, match="boom"):
        learn.fit(1)
    assert [(b.first_desc, b.closed) for b in tqdm_bars] == [
        ("epoch", True),
        ("train", True),
    ]


def notebook_fit(kernel, epochs=3, cbs=(), **kw) -> Learner:
    """`fit` with the default ProgressCB (or one made with `kw`) in the fake notebook `kernel`."""
    dls = DataLoaders(
        DataLoader(make_data(64), batch_size=16),
        DataLoader(make_data(32, seed=1), batch_size=16),
    )
    progress = [ProgressCB(**kw)] if kw else []
    learn = Learner(nn.Linear(4, 3), dls, cbs=[MetricsCB(Accuracy()), *progress])
    learn.fit(epochs, cbs=list(cbs))
    return learn


def bar_texts(kernel, label: str) -> list[str]:
    """Every text/plain the bar that was ever labelled `label` was drawn with, in order."""
    (states,) = [
        s for s in kernel.outputs if any(d["text/plain"].startswith(label) for d in s)
    ]
    return [d["text/plain"] for d in states]


class TestNotebook:
    """In a notebook (no ipywidgets needed): bars, table and plot are one output each, updated in place."""

    def test_one_output_each(self, kernel, capsys):
        """A 3-epoch fit shows an epoch bar, a batch bar cleared at the end and a table of 3 rows, nothing printed."""
        notebook_fit(kernel, epochs=3)
        epoch_bar, batch_bar, table = kernel.shown()
        assert "<progress" in epoch_bar["text/html"]
        assert (
            epoch_bar["text/plain"].startswith("epoch: 100%")
            and "3/3" in epoch_bar["text/plain"]
        )
        assert batch_bar == {"text/html": "", "text/plain": ""}
        lines = table["text/plain"].splitlines()
        assert lines[0].split() == [
            "epoch",
            "train_loss",
            "valid_loss",
            "accuracy",
            "time",
        ]
        assert [line.split()[0] for line in lines[1:]] == ["0", "1", "2"]
        assert capsys.readouterr().out == ""

    def test_batch_bar_never_shows_last_phase(self, kernel):
        """Once validation starts, the batch bar never shows 'train' or the training loss, nor 'valid' in training."""
        notebook_fit(kernel, epochs=2, mininterval=0.0)
        texts = [t for t in bar_texts(kernel, "train") if t]
        phase, last_train_loss, seen = None, None, set()
        for text in texts:
            label = text.split(":")[0]
            if label != phase:  # a phase starts: its label, no loss yet
                assert "loss" not in text, text
                phase = label
            seen.add(phase)
            loss = re.search(r"loss \d\.\d+", text)
            if phase == "train" and loss:
                last_train_loss = loss.group()
            if phase == "valid":
                assert "train" not in text and (last_train_loss or "-") not in text, (
                    text
                )
        assert seen == {"train", "valid"} and last_train_loss
        assert [t.split(":")[0] for t in texts].count("valid") >= 2

    def test_counts_drawn_once_per_interval(self, kernel):
        """200 batches with an hour's refresh interval draw the batch bar a handful of times, not per batch."""
        dls = DataLoaders(DataLoader(make_data(800), batch_size=4), None)
        Learner(nn.Linear(4, 3), dls, cbs=[ProgressCB(mininterval=3600)]).fit(1)
        assert len(bar_texts(kernel, "train")) <= 4

    def test_live_plot_one_image(self, kernel):
        """plot=True shows one image, redrawn in place each epoch; the cell's end adds none."""
        notebook_fit(kernel, epochs=3, plot=True, mininterval=3600)
        kernel.end_cell()
        assert kernel.images() == 1
        (plot,) = [s for s in kernel.outputs if "image/png" in s[-1]]
        assert len(plot) == 3
        # Under the table: epoch bar, batch bar, table, plot.
        assert [i for i, s in enumerate(kernel.outputs) if s is plot] == [3]

    def test_validate_outside_fit(self, kernel):
        """validate() outside a fit shows only a batch bar, cleared when it ends."""
        learn = notebook_fit(kernel, epochs=1)
        kernel.outputs.clear()
        learn.validate()
        assert len(kernel.outputs) == 1
        assert kernel.outputs[0][0]["text/plain"].startswith("valid")
        assert kernel.shown() == [{"text/html": "", "text/plain": ""}]

    def test_file_given_writes_there(self, kernel):
        """A ProgressCB given a file writes its table there, not to the notebook's outputs."""
        out = io.StringIO()
        notebook_fit(kernel, epochs=2, file=out)
        assert kernel.outputs == [] and len(out.getvalue().splitlines()) == 3

    def test_silent_off_rank_zero(self, kernel, monkeypatch):
        """Under torchrun, a process other than rank 0 shows nothing in the notebook."""
        from learnloop.callbacks import progress

        monkeypatch.setattr(progress, "is_main_process", lambda: False)
        notebook_fit(kernel, epochs=2, plot=True)
        assert kernel.outputs == []


def test_one_batch_bar_per_fit(tqdm_bars):
    """A fit makes two bars, epochs and batches, and resets the batch bar for each phase."""
    out = FakeTTY()
    fit(out, epochs=3, mininterval=0.0)
    assert [b.first_desc for b in tqdm_bars] == ["epoch", "train"]
    assert "valid" in out.getvalue()


def cancel_validation_in_epoch(epoch):
    """A callback that cancels validation at its start in `epoch`."""

    class Stop(Callback):
        order = -100

        def before_validate(self, learn, *args, **kwargs):
            if learn.epoch == epoch:
                raise CancelValidException()

    return Stop()


def table_learner(out: io.StringIO) -> Learner:
    """A Learner with accuracy and a progress table written to `out` (2 + 2 batches an epoch)."""
    dls = DataLoaders(
        DataLoader(make_data(32), batch_size=16),
        DataLoader(make_data(32, seed=1), batch_size=16),
    )
    return Learner(
        nn.Linear(4, 3), dls, cbs=[MetricsCB(Accuracy()), ProgressCB(file=out)]
    )


def test_table_blank_cells_and_new_header():
    """A row without validation leaves blank cells; a later row with new columns prints the header again."""
    out = io.StringIO()
    learn = table_learner(out)
    learn.fit(2, cbs=[cancel_validation_in_epoch(0)])
    lines = out.getvalue().splitlines()
    assert [line.split() for line in lines[::2]] == [
        ["epoch", "train_loss", "time"],
        ["epoch", "train_loss", "valid_loss", "accuracy", "time"],
    ]
    assert lines[1].split()[0] == "0" and len(lines[1].split()) == 3
    assert lines[3].split()[0] == "1" and len(lines[3].split()) == 5


def test_row_cells_under_their_columns():
    """A row lacking a middle column puts each value under its own header, the missing one blank."""
    out = io.StringIO()
    learn = table_learner(out)
    learn.fit(2, cbs=[cancel_validation_in_epoch(1)])
    header, _, second = out.getvalue().splitlines()
    ends = {m.group(): m.end() for m in re.finditer(r"\S+", header)}
    cells = {m.end(): m.group() for m in re.finditer(r"\S+", second)}
    assert sorted(cells) == sorted([ends["epoch"], ends["train_loss"], ends["time"]])
    assert cells[ends["epoch"]] == "1" and cells[ends["time"]].endswith("s")


def test_batch_bar_starts_each_phase_clean(tqdm_bars):
    """When a phase starts, the batch bar is drawn with its label and without the last phase's loss."""
    out = FakeTTY()
    fit(out, epochs=2, mininterval=0.0)
    draws = [
        re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", d)
        for line in out.getvalue().split("\n")
        for d in line.split("\r")
    ]
    starts = [d for d in draws if d.startswith(("train:", "valid:")) and " 0/" in d]
    assert starts and not [d for d in starts if "loss" in d]
    assert {d.split(":")[0] for d in starts} == {"train", "valid"}


@pytest.mark.parametrize(
    "exc", [CancelFitException, CancelEpochException, CancelTrainException]
)
def test_bars_closed_after_cancel(tqdm_bars, exc):
    """A fit cancelled in a batch leaves no open bars behind."""

    class Stop(Callback):
        def after_loss(self, learn, *args, **kwargs):
            if learn.training and learn.iter == 1:
                raise exc()

    fit(FakeTTY(), epochs=2, cbs=[Stop()])
    assert tqdm_bars and all(b.closed for b in tqdm_bars)


@pytest.mark.parametrize(
    "columns,row,expected",
    [
        (
            ["epoch", "train_loss", "time"],
            ["epoch", "valid_loss", "accuracy", "time"],
            ["epoch", "train_loss", "valid_loss", "accuracy", "time"],
        ),
        (["epoch"], ["epoch", "train_loss", "time"], ["epoch", "train_loss", "time"]),
        (
            ["epoch", "valid_loss", "time"],
            ["epoch", "train_loss", "time"],
            ["epoch", "valid_loss", "train_loss", "time"],
        ),
        ([], ["epoch", "time"], ["epoch", "time"]),
    ],
)
def test_merge_columns(columns, row, expected):
    """New columns go before the next column the row shares with the table (time stays last)."""
    assert merge_columns(columns, dict.fromkeys(row)) == expected
