"""CheckpointCB, EarlyStoppingCB, TerminateOnNaNCB, and what an interrupted fit leaves behind."""

from __future__ import annotations

import io
import logging
import math

import pytest
import torch
from helpers import make_dls
from torch import nn

from learnloop import (
    ActivationStatsCB,
    Callback,
    CheckpointCB,
    EarlyStoppingCB,
    Learner,
    MetricsCB,
    ProgressCB,
    StopReason,
    TerminateOnNaNCB,
)
from learnloop.checkpoint import read_checkpoint


class SetValidLoss(Callback):
    """Replaces the epoch's valid_loss with `values[epoch]`, after MetricsCB computed it."""

    order = 15

    def __init__(self, values):
        self.values = values

    def after_epoch(self, learn, epoch, **kwargs):
        learn.epoch_log["valid_loss"] = self.values[epoch]


class FilesSeen(Callback):
    """Once per finished epoch (CheckpointCB writes at the next before_epoch or at after_fit), records
    the epochs_done stored in `folder`'s last.pt and best.pt (None if absent)."""

    order = CheckpointCB.order + 1

    def __init__(self, folder):
        self.folder, self.seen = folder, []

    def before_fit(self, learn, *args, **kwargs):
        self.start = learn.epoch

    def before_epoch(self, learn, epoch, **kwargs):
        if epoch > self.start:
            self._record()

    def after_fit(self, learn, *args, **kwargs):
        self._record()

    def _record(self):
        def done(name):
            path = self.folder / name
            return read_checkpoint(path)["epochs_done"] if path.exists() else None

        self.seen.append((done("last.pt"), done("best.pt")))


def learner(*cbs) -> Learner:
    return Learner(
        nn.Linear(4, 3), make_dls(), lr=0.1, default_cbs=False, cbs=[MetricsCB(), *cbs]
    )


class TestCheckpointCB:
    def test_best_written_on_improvement_only(self, tmp_path):
        """best.pt is rewritten exactly at the epochs whose valid_loss beats every earlier one."""
        spy = FilesSeen(tmp_path)
        learner(
            SetValidLoss([3.0, 2.0, 4.0, 1.0, 5.0]),
            CheckpointCB(tmp_path, monitor="valid_loss"),
            spy,
        ).fit(5)
        assert [best for _, best in spy.seen] == [1, 2, 2, 4, 4]
        assert [last for last, _ in spy.seen] == [1, 2, 3, 4, 5]

    def test_mode_max(self, tmp_path):
        """With mode='max', best.pt follows the largest value."""
        spy = FilesSeen(tmp_path)
        learner(
            SetValidLoss([1.0, 3.0, 2.0]),
            CheckpointCB(tmp_path, monitor="valid_loss", mode="max"),
            spy,
        ).fit(3)
        assert [best for _, best in spy.seen] == [1, 2, 2]

    def test_every_and_final_epoch(self, tmp_path):
        """every=2 writes last.pt after epochs 2 and 4, and after the fit's final epoch."""
        spy = FilesSeen(tmp_path)
        learner(CheckpointCB(tmp_path, every=2, monitor=None), spy).fit(5)
        assert [last for last, _ in spy.seen] == [None, 2, 2, 4, 5]
        assert not (tmp_path / "best.pt").exists()

    def test_missing_monitor_still_writes_last(self, tmp_path):
        """The default monitor (valid_loss) missing: an error saying monitor=None, and last.pt written."""
        with pytest.raises(
            ValueError, match=r"monitor=None: last.pt only\) monitors 'valid_loss'"
        ):
            learner(CheckpointCB(tmp_path)).fit(2, valid=False)
        assert read_checkpoint(tmp_path / "last.pt")["epochs_done"] == 1
        assert not (tmp_path / "best.pt").exists()

    def test_resumed_fit_keeps_the_best_value(self, tmp_path):
        """A resumed fit writes best.pt only when it beats the best value saved before."""
        values = [3.0, 2.0, 2.5, 1.0]
        learner(SetValidLoss(values), CheckpointCB(tmp_path, monitor="valid_loss")).fit(
            2
        )
        spy, ckpt = FilesSeen(tmp_path), CheckpointCB(tmp_path, monitor="valid_loss")
        learner(SetValidLoss(values), ckpt, spy).fit(4, resume=tmp_path)
        assert [best for _, best in spy.seen] == [2, 4]
        assert ckpt.best == 1.0

    def test_early_stopped_fit_writes_its_last_epoch(self, tmp_path):
        """A fit stopped between epochs writes last.pt with every callback's final state, whatever `every` is."""
        es = EarlyStoppingCB(patience=2)
        learner(
            SetValidLoss([1.0, 2.0, 3.0, 4.0, 5.0]), CheckpointCB(tmp_path, every=5), es
        ).fit(5)
        ck = read_checkpoint(tmp_path / "last.pt")
        assert ck["epochs_done"] == 3
        assert ck["callbacks"]["EarlyStoppingCB"] == {"best": 1.0, "wait": 2}

    def test_missing_monitor_lists_the_metrics(self, tmp_path):
        """Monitoring a value the epoch log lacks names the values that exist."""
        with pytest.raises(
            ValueError, match="monitors 'accuracy'.*available: train_loss, valid_loss"
        ):
            learner(CheckpointCB(tmp_path, monitor="accuracy")).fit(1)

    @pytest.mark.parametrize(
        "kwargs, match",
        [
            ({"every": 0}, "every must be an int >= 1"),
            ({"monitor": "valid_loss", "mode": "best"}, "mode must be"),
        ],
    )
    def test_bad_arguments(self, tmp_path, kwargs, match):
        """Bad arguments are refused at construction."""
        with pytest.raises(ValueError, match=match):
            CheckpointCB(tmp_path, **kwargs)


class TestEarlyStoppingCB:
    @pytest.mark.parametrize(
        "values, patience, min_delta, mode, stop_epoch",
        [
            ([5.0, 4.0, 3.0, 2.0, 1.0], 2, 0.0, "min", None),
            ([1.0, 2.0, 3.0, 4.0, 5.0], 2, 0.0, "min", 2),
            ([1.0, 2.0, 3.0, 0.5, 4.0, 5.0, 6.0], 3, 0.0, "min", 6),
            ([1.0, 0.97, 0.96, 0.5], 2, 0.05, "min", 2),
            ([1.0, 1.0, 1.0], 2, 0.0, "min", 2),
            ([0.1, 0.2, 0.2, 0.2, 0.9], 2, 0.0, "max", 3),
        ],
    )
    def test_stop_epoch(self, values, patience, min_delta, mode, stop_epoch):
        """The fit stops after `patience` epochs in a row without an improvement larger than min_delta."""
        es = EarlyStoppingCB(
            "valid_loss", mode=mode, patience=patience, min_delta=min_delta
        )
        learn = learner(SetValidLoss(values), es)
        learn.fit(len(values))
        assert es.stopped_epoch == stop_epoch
        assert learn.epochs_done == (
            len(values) if stop_epoch is None else stop_epoch + 1
        )
        assert es.stop_reason == (
            StopReason.NOT_STOPPED
            if stop_epoch is None
            else StopReason.PATIENCE_EXHAUSTED
        )

    def test_non_finite_value_stops_at_once(self):
        """A nan monitored value stops the fit at that epoch."""
        es = EarlyStoppingCB(patience=5)
        learner(SetValidLoss([1.0, math.nan, 0.5]), es).fit(3)
        assert (es.stopped_epoch, es.stop_reason) == (1, StopReason.NON_FINITE_METRIC)

    def test_resume_keeps_the_patience_count(self, tmp_path):
        """Epochs waited before the checkpoint count after resuming."""
        values = [1.0, 2.0, 3.0, 4.0, 5.0]
        learner(
            SetValidLoss(values), EarlyStoppingCB(patience=3), CheckpointCB(tmp_path)
        ).fit(2)
        es = EarlyStoppingCB(patience=3)
        learner(SetValidLoss(values), es).fit(5, resume=tmp_path)
        assert es.stopped_epoch == 3

    def test_missing_monitor_lists_the_metrics(self):
        """An unknown monitor names the available values."""
        with pytest.raises(
            ValueError,
            match="EarlyStoppingCB monitors 'val_loss'.*available: train_loss, valid_loss",
        ):
            learner(EarlyStoppingCB("val_loss")).fit(1)

    def test_empty_epoch_log_says_what_to_attach(self):
        """Without MetricsCB the message says to attach it."""
        learn = Learner(
            nn.Linear(4, 3), make_dls(), default_cbs=False, cbs=[EarlyStoppingCB()]
        )
        with pytest.raises(ValueError, match="attach MetricsCB"):
            learn.fit(1)

    def test_bad_patience(self):
        """patience must be a positive int."""
        with pytest.raises(ValueError, match="patience must be an int >= 1"):
            EarlyStoppingCB(patience=0)


class NanAt(Callback):
    """Turns the inputs of one batch into nan."""

    def __init__(self, epoch, iter):
        self.at = (epoch, iter)

    def before_batch(self, learn, iter, **kwargs):
        if (learn.epoch, iter) == self.at and learn.training:
            learn.batch = (torch.full_like(learn.batch[0], math.nan), learn.batch[1])


class TestTerminateOnNaNCB:
    def test_stops_before_the_nan_is_applied(self, caplog):
        """A nan loss stops the fit, names epoch and batch, and never reaches the weights."""
        nan = TerminateOnNaNCB()
        learn = learner(NanAt(1, 2), nan)
        with caplog.at_level(logging.WARNING, logger="learnloop"):
            learn.fit(3)
        assert nan.stopped_at == (1, "training", 2)
        assert nan.stop_reason == StopReason.NON_FINITE_LOSS
        assert "epoch 1, training batch 2" in caplog.text
        assert all(torch.isfinite(p).all() for p in learn.model.parameters())
        assert learn.epochs_done == 1


class Interrupt(Callback):
    """Raises KeyboardInterrupt at one training batch, as Ctrl-C would."""

    def __init__(self, epoch, iter):
        self.at = (epoch, iter)

    def after_batch(self, learn, iter, **kwargs):
        if (learn.epoch, iter) == self.at and learn.training:
            raise KeyboardInterrupt


def test_keyboard_interrupt_leaves_everything_usable(tmp_path, tqdm_bars):
    """Ctrl-C mid-epoch: bars closed, hooks removed, last.pt from the last full epoch, fit works again."""
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    progress, stats = (
        ProgressCB(bar=True, file=io.StringIO()),
        ActivationStatsCB(nn.ReLU),
    )
    learn = Learner(
        model, make_dls(), lr=0.1, cbs=[progress, stats, CheckpointCB(tmp_path)]
    )
    with pytest.raises(KeyboardInterrupt):
        learn.fit(3, cbs=[Interrupt(1, 3)])
    assert [(b.first_desc, b.closed) for b in tqdm_bars] == [
        ("epoch", True),
        ("train", True),
    ]
    assert all(not m._forward_hooks for m in model.modules())
    assert read_checkpoint(tmp_path / "last.pt")["epochs_done"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pt", "last.pt"]
    assert (
        not model.training
    )  # a fit leaves the model in eval mode, an interrupted one too
    learn.fit(3, resume=tmp_path)
    assert learn.epochs_done == 3


class TestEarlierRuns:
    """A fresh fit never overwrites an earlier run's checkpoints; it says what is there and the ways on."""

    def test_fresh_fit_refuses_an_earlier_run(self, tmp_path):
        """The refusal comes before the first epoch, names epochs done and best value, and leaves the files."""
        learner(SetValidLoss([3.0, 2.0, 2.5]), CheckpointCB(tmp_path)).fit(3)
        before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
        epochs = []

        class Count(Callback):
            def before_epoch(self, learn, epoch, **kwargs):
                epochs.append(epoch)

        with pytest.raises(FileExistsError) as info:
            learner(CheckpointCB(tmp_path), Count()).fit(1)
        message = str(info.value)
        assert "already holds an earlier run" in message
        assert "last.pt (3 epochs done, best value 2" in message
        assert "best.pt (2 epochs done" in message
        assert f"resume={str(tmp_path)!r}" in message and "overwrite=True" in message
        assert epochs == []
        assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before

    def test_resume_and_overwrite_are_the_ways_on(self, tmp_path):
        """resume= continues the run; overwrite=True replaces it."""
        learner(CheckpointCB(tmp_path)).fit(2)
        learner(CheckpointCB(tmp_path)).fit(3, resume=tmp_path)
        assert read_checkpoint(tmp_path / "last.pt")["epochs_done"] == 3
        learner(CheckpointCB(tmp_path, overwrite=True)).fit(1)
        assert read_checkpoint(tmp_path / "last.pt")["epochs_done"] == 1

    def test_the_same_callback_fits_again(self, tmp_path):
        """Files a CheckpointCB wrote itself are its own run: a second fit with it goes on."""
        learn = learner(CheckpointCB(tmp_path))
        learn.fit(2)
        learn.fit(1)
        assert read_checkpoint(tmp_path / "last.pt")["epochs_done"] == 1

    def test_unrelated_files_are_no_run(self, tmp_path):
        """A folder with other files (no last.pt or best.pt) is fine to write into."""
        (tmp_path / "notes.txt").write_text("mine")
        learner(CheckpointCB(tmp_path)).fit(1)
        assert (tmp_path / "last.pt").exists()

    def test_path_that_is_a_file_fails_when_made(self, tmp_path):
        """CheckpointCB(path=<a file>) fails at once, not after epoch 0's training."""
        file = tmp_path / "ckpt"
        file.write_text("")
        with pytest.raises(NotADirectoryError, match="is a file; it needs a folder"):
            CheckpointCB(file)


class TestCancelledEpochs:
    """An epoch whose validation was cancelled has no valid_loss: monitoring skips it, no error."""

    @pytest.mark.parametrize("at", [1, 2])
    def test_skipped_not_an_error(self, tmp_path, at):
        """Early stopping and checkpoints go on past an epoch whose validation was cancelled."""
        from learnloop import CancelValidException

        class SkipValidation(Callback):
            order = -100

            def before_validate(self, learn, epoch, **kwargs):
                if epoch == at:
                    raise CancelValidException()

        es, ck = EarlyStoppingCB(patience=5), CheckpointCB(tmp_path)
        learn = learner(SkipValidation(), es, ck)
        learn.fit(4)
        assert learn.epochs_done == 4
        assert es.stop_reason is StopReason.NOT_STOPPED
        assert read_checkpoint(tmp_path / "last.pt")["epochs_done"] == 4
