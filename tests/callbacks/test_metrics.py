"""MetricsCB and Accuracy: weighted losses, metric rows, the metric protocol, no per-batch sync."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import count_host_reads, make_data
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
)
from learnloop.callbacks import metrics as metrics_module


def uneven_dls():
    """Batches of 16, 16 and 8 rows, so a mean of batch means would be wrong."""
    return DataLoaders(
        DataLoader(make_data(40), batch_size=16),
        DataLoader(make_data(40, seed=1), batch_size=16),
    )


class TestRows:
    def test_row_per_epoch(self):
        """Each epoch appends one row with epoch, losses, metrics and time, in that order."""
        cb = MetricsCB(Accuracy())
        learn = Learner(nn.Linear(4, 3), uneven_dls(), cbs=[cb])
        learn.fit(2)
        assert [list(r) for r in cb.history] == [
            ["epoch", "train_loss", "valid_loss", "accuracy", "time"]
        ] * 2
        assert [r["epoch"] for r in cb.history] == [0, 1]
        assert learn.epoch_log == cb.history[-1]

    def test_valid_loss_weighted_by_batch_size(self):
        """The validation loss is the mean over rows, not over batches; metrics match a direct computation."""
        cb = MetricsCB(acc=Accuracy())
        learn = Learner(nn.Linear(4, 3), uneven_dls(), cbs=[cb])
        learn.fit(1, train=False)
        x, y = make_data(40, seed=1).tensors
        with torch.no_grad():
            out = learn.model(x)
        assert cb.history[0]["valid_loss"] == pytest.approx(
            F.cross_entropy(out, y).item(), rel=1e-6
        )
        assert cb.history[0]["acc"] == pytest.approx(
            (out.argmax(1) == y).float().mean().item()
        )

    def test_train_loss_weighted(self):
        """The training loss averages each batch's loss, as it was computed, weighted by its size."""
        losses = []

        class Keep(MetricsCB):
            def after_loss(self, learn, loss, **kwargs):
                super().after_loss(learn, loss=loss)
                if learn.training:
                    losses.append((loss.item(), len(learn.yb)))

        cb = Keep()
        Learner(nn.Linear(4, 3), uneven_dls(), cbs=[cb]).fit(1)
        expected = sum(v * n for v, n in losses) / sum(n for _, n in losses)
        assert cb.history[0]["train_loss"] == pytest.approx(expected, rel=1e-6)

    def test_valid_off(self):
        """Without validation the row has no valid columns."""
        cb = MetricsCB(Accuracy())
        Learner(nn.Linear(4, 3), uneven_dls(), cbs=[cb]).fit(1, valid=False)
        assert list(cb.history[0]) == ["epoch", "train_loss", "time"]


def cancel_at(hook, exc, epoch=0, iter=None, order=-100):
    """A callback that raises `exc` at `hook` in `epoch` (at training batch `iter`, for a batch hook)."""

    def fire(self, learn, *args, **kwargs):
        if learn.epoch == epoch and (
            iter is None or (learn.training and learn.iter == iter)
        ):
            raise exc()

    return type("Cancel", (Callback,), {hook: fire, "order": order})()


def keys(cb):
    return [list(r) for r in cb.history]


class TestCancelledPhases:
    """A row holds what ran: no key for a phase without a counted batch, no stale or repeated value."""

    def test_train_cancelled_at_its_start(self):
        """Training cancelled in before_train of the first epoch: the row has no train_loss."""
        cb = MetricsCB(Accuracy())
        learn = Learner(nn.Linear(4, 3), uneven_dls(), cbs=[cb])
        learn.fit(2, cbs=[cancel_at("before_train", CancelTrainException)])
        assert keys(cb) == [
            ["epoch", "valid_loss", "accuracy", "time"],
            ["epoch", "train_loss", "valid_loss", "accuracy", "time"],
        ]

    @pytest.mark.parametrize("order", [-100, 100])
    def test_cancelled_epoch_is_a_bare_row(self, order):
        """An epoch cancelled in before_epoch has the row {'epoch': e}: not the last row again."""
        cb = MetricsCB()
        learn = Learner(nn.Linear(4, 3), uneven_dls(), cbs=[cb])
        stop = cancel_at("before_epoch", CancelEpochException, epoch=1, order=order)
        learn.fit(3, cbs=[stop])
        assert [r["epoch"] for r in cb.history] == [0, 1, 2]
        assert cb.history[1] == {"epoch": 1}
        assert cb.history[0]["train_loss"] != cb.history[2]["train_loss"]

    @pytest.mark.parametrize("order", [-100, 100])
    def test_validation_cancelled_has_no_valid_loss(self, order):
        """Validation cancelled at its start leaves valid_loss and the metrics out, not the train loss."""
        cb = MetricsCB(Accuracy())
        learn = Learner(nn.Linear(4, 3), uneven_dls(), cbs=[cb])
        stop = cancel_at("before_validate", CancelValidException, order=order)
        learn.fit(1, cbs=[stop])
        assert keys(cb) == [["epoch", "train_loss", "time"]]
        assert learn.recorder.valid_losses == []

    def test_phase_without_a_batch_has_no_key(self):
        """Training cancelled before its first batch's loss: no train_loss (not nan)."""
        cb = MetricsCB()
        learn = Learner(nn.Linear(4, 3), uneven_dls(), cbs=[cb])
        learn.fit(1, cbs=[cancel_at("before_batch", CancelTrainException, iter=0)])
        assert keys(cb) == [["epoch", "valid_loss", "time"]]

    @pytest.mark.parametrize("exc", [CancelTrainException, CancelEpochException])
    def test_phase_cut_short_reports_what_ran(self, exc):
        """A phase cancelled part way (by its own cancel or the epoch's) reports the mean over its batches that ran."""
        seen = []

        class Keep(Callback):
            order = MetricsCB.order

            def after_loss(self, learn, loss, **kwargs):
                if learn.training:
                    seen.append((loss.item(), len(learn.yb)))

        cb = MetricsCB()
        learn = Learner(nn.Linear(4, 3), uneven_dls(), cbs=[cb, Keep()])
        learn.fit(1, cbs=[cancel_at("before_batch", exc, iter=2)])
        assert len(seen) == 2
        expected = sum(v * n for v, n in seen) / sum(n for _, n in seen)
        assert cb.history[0]["train_loss"] == pytest.approx(expected, rel=1e-6)

    def test_fit_cancelled_mid_epoch(self):
        """An epoch cut short by CancelFitException has no row; epoch_log is left at the last row."""
        cb = MetricsCB()
        learn = Learner(nn.Linear(4, 3), uneven_dls(), cbs=[cb])
        learn.fit(
            3, cbs=[cancel_at("before_batch", CancelFitException, epoch=1, iter=1)]
        )
        assert [r["epoch"] for r in cb.history] == [0]
        assert learn.epoch_log == cb.history[0]

    def test_long_phase_folded_in_chunks(self, monkeypatch):
        """Summed in chunks (here of 2, and chunks of chunks), the loss still equals the per-batch mean."""
        monkeypatch.setattr(metrics_module, "_CHUNK", 2)
        losses = []

        class Keep(Callback):
            def after_loss(self, learn, loss, **kwargs):
                losses.append((learn.training, loss.item(), len(learn.yb)))

        dls = DataLoaders(
            DataLoader(make_data(70), batch_size=4),  # 18 batches, the last of 2 rows
            DataLoader(make_data(30, seed=1), batch_size=4),
        )
        cb = MetricsCB()
        Learner(nn.Linear(4, 3), dls, cbs=[cb, Keep()]).fit(1)
        for training, key in ((True, "train_loss"), (False, "valid_loss")):
            rows = [(v, n) for t, v, n in losses if t == training]
            expected = sum(v * n for v, n in rows) / sum(n for _, n in rows)
            assert cb.history[0][key] == pytest.approx(expected, rel=1e-6)


class TestProtocol:
    def test_duck_typed_metric(self):
        """Any object with update/compute/reset is a metric, named by its class in snake case."""

        class MeanPred:
            def reset(self):
                self.total, self.n = 0.0, 0

            def update(self, preds, targets):
                self.total += preds.sum().item()
                self.n += preds.numel()

            def compute(self):
                return torch.tensor(self.total / self.n)

        cb = MetricsCB(MeanPred())
        Learner(nn.Linear(4, 3), uneven_dls(), cbs=[cb]).fit(1)
        assert isinstance(cb.history[0]["mean_pred"], float)

    def test_not_a_metric(self):
        """An object with part of the protocol is refused with what it lacks."""

        class UpdateOnly:
            def update(self, preds, targets):
                pass

        with pytest.raises(TypeError, match="lacks compute, reset"):
            MetricsCB(UpdateOnly())

    def test_accuracy_all_reduce(self):
        """Accuracy's all_reduce replaces its counts by their sums; the ratio is computed from the sums."""
        acc = Accuracy()
        acc.update(torch.tensor([[0.0, 1.0], [1.0, 0.0]]), torch.tensor([1, 1]))
        # As if a second process counted 2 of 2 correct.
        acc.all_reduce(lambda t: t + torch.tensor(2))
        assert (int(acc.correct), acc.total) == (3, 4) and acc.compute() == 0.75

    def test_accuracy_shape_mismatch(self):
        """Accuracy names both shapes when predictions and targets disagree."""
        with pytest.raises(
            ValueError, match=r"preds shape \(4, 3\), targets shape \(5,\)"
        ):
            Accuracy().update(torch.zeros(4, 3), torch.zeros(5))


def test_no_host_sync_per_batch(monkeypatch):
    """Losses and accuracy stay on the device during the epoch: few conversions, not one per batch."""
    calls = count_host_reads(monkeypatch)
    dls = DataLoaders(
        DataLoader(make_data(400), batch_size=4),
        DataLoader(make_data(400, seed=1), batch_size=4),
    )
    from learnloop import ProgressCB

    Learner(
        nn.Linear(4, 3), dls, cbs=[MetricsCB(Accuracy()), ProgressCB(bar=False)]
    ).fit(1)
    assert len(calls) <= 5  # 200 batches: a per-batch sync would show as hundreds
