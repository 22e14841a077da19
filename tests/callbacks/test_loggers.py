"""CSVLoggerCB rows, flushing and appending on resume; TensorBoardCB where tensorboard exists."""

from __future__ import annotations

import csv
import sys

import pytest
from helpers import boom, make_dls
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

    def test_second_fit_with_the_same_logger_appends(self, tmp_path):
        """A second fit with the same logger adds its rows after the first fit's: nothing is lost."""
        path = tmp_path / "h.csv"
        learn = learner(CSVLoggerCB(path))
        learn.fit(3)
        learn.fit(2)
        assert [r["epoch"] for r in read_rows(path)] == ["0", "1", "2", "0", "1"]

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


class TestEarlierRuns:
    def test_fresh_fit_refuses_an_earlier_history(self, tmp_path):
        """A new logger on a file of an earlier run refuses before the first epoch, and the rows stay."""
        path = tmp_path / "h.csv"
        learner(CSVLoggerCB(path)).fit(8)
        before = path.read_text()
        with pytest.raises(FileExistsError) as info:
            learner(CSVLoggerCB(path)).fit(1)
        assert "8 rows (epochs 0 to 7)" in str(info.value)
        assert "overwrite=True" in str(info.value) and "resume=" in str(info.value)
        assert path.read_text() == before

    def test_overwrite_replaces(self, tmp_path):
        """overwrite=True starts the file anew."""
        path = tmp_path / "h.csv"
        learner(CSVLoggerCB(path)).fit(3)
        learner(CSVLoggerCB(path, overwrite=True)).fit(1)
        assert [r["epoch"] for r in read_rows(path)] == ["0"]

    def test_a_failed_start_leaves_the_file(self, tmp_path):
        """With overwrite=True, a fit that fails before its first row leaves the old rows in place."""
        path = tmp_path / "h.csv"
        learner(CSVLoggerCB(path)).fit(2)
        before = path.read_text()
        with pytest.raises(ZeroDivisionError):
            learner(
                CSVLoggerCB(path, overwrite=True),
                boom("after_loss", ZeroDivisionError()),
            ).fit(1)
        assert path.read_text() == before

    def test_a_late_column_widens_the_header(self, tmp_path):
        """A value missing from the first rows (validation cancelled in epoch 0) still gets its column."""
        from learnloop import CancelValidException

        class SkipFirstValidation(Callback):
            order = -100

            def before_validate(self, learn, epoch, **kwargs):
                if epoch == 0:
                    raise CancelValidException()

        path = tmp_path / "h.csv"
        learner(SkipFirstValidation(), CSVLoggerCB(path)).fit(3)
        rows = read_rows(path)
        assert [r["epoch"] for r in rows] == ["0", "1", "2"]
        assert rows[0]["valid_loss"] == "" and float(rows[2]["valid_loss"]) > 0

    def test_folder_path_fails_when_made(self, tmp_path):
        """CSVLoggerCB(path=<a folder>) fails at once."""
        with pytest.raises(IsADirectoryError, match="is a folder: pass a file path"):
            CSVLoggerCB(tmp_path)
