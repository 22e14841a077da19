"""CSVLoggerCB rows, flushing and appending on resume; TensorBoardCB where tensorboard exists."""

from __future__ import annotations

import csv
import sys

import pytest
from helpers import make_dls
from torch import nn

from learnloop import (
    Callback,
    CheckpointCB,
    CSVLoggerCB,
    Learner,
    MetricsCB,
    TensorBoardCB,
)


def learner(*cbs) -> Learner:
    return Learner(
        nn.Linear(4, 3), make_dls(), lr=0.1, default_cbs=False, cbs=[MetricsCB(), *cbs]
    )


def read_rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


class RowsOnDisk(Callback):
    """After each epoch (and after the logger), counts the rows already on disk."""

    order = 50

    def __init__(self, path):
        self.path, self.counts = path, []

    def after_epoch(self, learn, *args, **kwargs):
        self.counts.append(len(read_rows(self.path)))


class TestCSVLoggerCB:
    def test_header_then_one_row_per_epoch_flushed(self, tmp_path):
        """A fresh fit writes a header and one row per epoch, each on disk when its epoch ends."""
        path = tmp_path / "log" / "history.csv"
        spy = RowsOnDisk(path)
        learner(CSVLoggerCB(path), spy).fit(3)
        rows = read_rows(path)
        assert spy.counts == [1, 2, 3]
        assert list(rows[0]) == ["epoch", "train_loss", "valid_loss", "time"]
        assert [r["epoch"] for r in rows] == ["0", "1", "2"]
        assert all(float(r["valid_loss"]) > 0 for r in rows)

    def test_fresh_fit_starts_the_file_anew(self, tmp_path):
        """A second, non-resumed fit replaces the old rows."""
        path = tmp_path / "h.csv"
        learn = learner(CSVLoggerCB(path))
        learn.fit(3)
        learn.fit(2)
        assert [r["epoch"] for r in read_rows(path)] == ["0", "1"]

    def test_resumed_fit_appends(self, tmp_path):
        """fit(4, resume=...) after 2 epochs appends rows 2 and 3 under the same header."""
        path = tmp_path / "h.csv"
        learner(CSVLoggerCB(path), CheckpointCB(tmp_path / "ck")).fit(2)
        first = read_rows(path)
        learner(CSVLoggerCB(path)).fit(4, resume=tmp_path / "ck")
        rows = read_rows(path)
        assert [r["epoch"] for r in rows] == ["0", "1", "2", "3"]
        assert rows[:2] == first
        assert path.read_text().count("epoch,") == 1

    def test_resume_drops_rows_logged_after_the_checkpoint(self, tmp_path):
        """Rows of epochs the resumed fit runs again (logged after the checkpoint was taken) appear once."""
        path = tmp_path / "h.csv"
        learner(CSVLoggerCB(path), CheckpointCB(tmp_path / "ck")).fit(2)
        with open(path, "a") as f:
            # Epoch 2 was logged, then the process died before its checkpoint.
            f.write("2,9.0,9.0,1.0\n")
        learner(CSVLoggerCB(path)).fit(3, resume=tmp_path / "ck")
        rows = read_rows(path)
        assert [r["epoch"] for r in rows] == ["0", "1", "2"]
        assert rows[2]["train_loss"] != "9.0"


class TestTensorBoardCB:
    def test_missing_package_says_what_to_install(self, monkeypatch):
        """Without tensorboard, the error names the pip install."""
        monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
        with pytest.raises(ImportError, match="pip install tensorboard"):
            TensorBoardCB()

    def test_writes_event_files(self, tmp_path):
        """With tensorboard installed, a fit writes an event file to the folder `path`."""
        pytest.importorskip("tensorboard")
        from tensorboard.backend.event_processing.event_accumulator import (
            EventAccumulator,
        )

        learner(TensorBoardCB(tmp_path, batch_loss=True)).fit(2)
        events = EventAccumulator(str(tmp_path))
        events.Reload()
        assert [e.step for e in events.Scalars("epoch/valid_loss")] == [0, 1]
        assert len(events.Scalars("batch/train_loss")) == 12
