"""The loop's words when something is off: error notes that name the right place, empty loaders,
bad losses, cancels after the fit, and a resume with nothing left to run."""

from __future__ import annotations

import pytest
import torch
from helpers import boom, make_data, make_dls
from torch import nn
from torch.utils.data import DataLoader

import learnloop.long_runs as long_runs_module
from learnloop import (
    Callback,
    CancelEpochException,
    CancelFitException,
    CancelValidException,
    CheckpointCB,
    DataLoaders,
    Learner,
    MetricsCB,
)


def learner(cbs=(), **kw) -> Learner:
    return Learner(nn.Linear(4, 3), make_dls(n=32, bs=16), cbs=list(cbs), **kw)


def notes(info) -> str:
    return "\n".join(getattr(info.value, "__notes__", []))


class TestErrorNotes:
    """A note says where the loop was: the event and epoch outside a batch, never a stale batch."""

    @pytest.mark.parametrize(
        ("event", "where"),
        [
            ("before_fit", "Boom.before_fit (before epoch 0, the first of this fit)"),
            ("before_epoch", "Boom.before_epoch (epoch 0)"),
            ("after_epoch", "Boom.after_epoch (epoch 0)"),
            ("before_validate", "Boom.before_validate (epoch 0, validation)"),
            ("after_train", "Boom.after_train (epoch 0, training)"),
            ("after_fit", "Boom.after_fit (the fit's end, epochs_done=1)"),
            ("after_loss", "Boom.after_loss (epoch 0, training batch 0)"),
        ],
    )
    def test_hook_errors_name_their_place(self, event, where):
        """A hook's error outside a batch says its event and epoch; inside a batch, the batch."""
        with pytest.raises(ZeroDivisionError) as info:
            learner([boom(event, ZeroDivisionError("x"))], default_cbs=False).fit(1)
        assert f"learnloop: raised in {where}." in notes(info)
        if "batch" not in where:
            assert "batch" not in notes(info)

    def test_after_epoch_of_a_later_epoch(self):
        """After epoch 3's batches ran, an after_epoch error says 'epoch 3', not 'validation batch 0'."""

        class FailAt3(Callback):
            def after_epoch(self, learn, epoch, **kwargs):
                if epoch == 3:
                    raise KeyError("three")

        with pytest.raises(KeyError) as info:
            learner([FailAt3()], default_cbs=False).fit(5)
        assert "FailAt3.after_epoch (epoch 3)." in notes(info)

    def test_loader_errors_are_noted(self):
        """An error raised by the loader while fetching says which loader and which batch."""

        class Broken(torch.utils.data.Dataset):
            def __len__(self):
                return 8

            def __getitem__(self, i):
                if i == 5:
                    raise OSError("unreadable file 5")
                return torch.zeros(4), 0

        dls = DataLoaders(DataLoader(Broken(), batch_size=2), None)
        learn = Learner(nn.Linear(4, 3), dls, default_cbs=False)
        with pytest.raises(OSError, match="unreadable") as info:
            learn.fit(1)
        assert "raised by the training loader fetching batch 2 (epoch 0)" in notes(info)

    def test_preemption_check_errors_are_not_the_loaders(self, monkeypatch):
        """Under torchrun, an error as the processes agree on a preemption signal (a peer gone) is not blamed on the loader."""
        learn = learner(default_cbs=False)
        # Set after the Learner is built, so no DistributedCB is attached.
        monkeypatch.setenv("WORLD_SIZE", "2")

        def peer_gone(flag):
            raise RuntimeError("Connection reset by peer")

        monkeypatch.setattr(long_runs_module, "agree_any", peer_gone)
        with pytest.raises(RuntimeError, match="reset by peer") as info:
            learn.fit(1)
        assert notes(info) == (
            "learnloop: raised checking for a preemption signal after epoch 0, training batch 0."
        )


class TestCancelAfterTheFit:
    @pytest.mark.parametrize(
        "exc", [CancelFitException(), CancelEpochException(), CancelValidException()]
    )
    def test_cancel_in_after_fit_does_not_escape(self, exc):
        """A Cancel* raised in after_fit stops nothing (the fit is over): fit returns normally."""
        ran = []

        class Later(Callback):
            order = 1000

            def after_fit(self, learn, *args, **kwargs):
                ran.append("after_fit")

        learn = learner([boom("after_fit", exc), Later()])
        learn.fit(1)
        assert ran == ["after_fit"]  # the other cleanup hooks still ran
        assert learn.epochs_done == 1


class TestEmptyLoaders:
    def test_empty_validation_loader_warns_once(self):
        """An empty validation loader warns once per fit, and logs no nan valid_loss."""
        dls = make_dls(n=32, bs=16)
        dls.valid = DataLoader(make_data(4), batch_size=8, drop_last=True)
        learn = Learner(nn.Linear(4, 3), dls)
        with pytest.warns(UserWarning, match="valid loader yielded no batches") as got:
            learn.fit(3)
        assert len([w for w in got if "yielded no batches" in str(w.message)]) == 1
        history = next(cb for cb in learn.cbs if isinstance(cb, MetricsCB)).history
        assert len(history) == 3
        assert all("valid_loss" not in row for row in history)

    def test_used_up_training_iterator_warns(self):
        """A training generator is used up after epoch 0: epoch 1 warns instead of doing nothing silently."""
        batches = list(make_dls(n=32, bs=16).train)
        dls = DataLoaders(iter(batches), None)
        learn = Learner(nn.Linear(4, 3), dls, default_cbs=False)
        with pytest.warns(
            UserWarning, match="train loader yielded no batches in epoch 1"
        ):
            learn.fit(3)


class TestBadLoss:
    @pytest.mark.parametrize(
        ("loss_func", "match"),
        [
            (lambda p, y: 0.5, "returned float 0.5"),
            (
                lambda p, y: nn.functional.cross_entropy(p, y, reduction="none"),
                r"returned a tensor of shape \(16,\)",
            ),
        ],
    )
    def test_loss_must_be_one_value_tensor(self, loss_func, match):
        """A loss that is a Python number or a per-sample tensor fails at the first batch, saying how to fix it."""
        learn = Learner(nn.Linear(4, 3), make_dls(n=32, bs=16), loss_func=loss_func)
        before = [p.detach().clone() for p in learn.model.parameters()]
        with pytest.raises(TypeError, match=match) as info:
            learn.fit(1)
        assert "reduction='mean'" in str(info.value)
        assert "(epoch 0, training batch 0)" in notes(info)
        assert all(torch.equal(a, b) for a, b in zip(before, learn.model.parameters()))

    def test_checked_in_validation_too(self):
        """validate() checks the loss as well."""
        learn = Learner(
            nn.Linear(4, 3), make_dls(n=32, bs=16), loss_func=lambda p, y: 1
        )
        with pytest.raises(TypeError, match="returned int 1"):
            learn.validate()


class TestResume:
    def test_nothing_left_warns(self, tmp_path):
        """A resume that finds every epoch done warns (users see warnings; INFO logs they do not)."""
        learner([CheckpointCB(tmp_path)]).fit(2)
        with pytest.warns(UserWarning, match="Nothing to resume"):
            learner().fit(2, resume=tmp_path)

    def test_resumed_from(self, tmp_path):
        """learn.resumed_from is the checkpoint a fit resumed from, seen at before_fit; None when fresh."""
        seen = []

        class Look(Callback):
            def before_fit(self, learn, *args, **kwargs):
                seen.append(learn.resumed_from)

        learner([CheckpointCB(tmp_path), Look()]).fit(1)
        learn = learner([Look()])
        learn.fit(2, resume=tmp_path)
        learn.fit(1)
        assert seen == [None, tmp_path / "last.pt", None]
