"""Review findings kept fixed: cleanup of evaluations and fits, fit-only replacements, state hygiene."""

from __future__ import annotations

import io

import pytest
import torch
from helpers import make_data, make_dls
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from learnloop import (
    Callback,
    CancelFitException,
    DataLoaders,
    DeviceCB,
    Learner,
    MetricsCB,
    MixedPrecisionCB,
    ProgressCB,
)


def boom(event, exc):
    """A Boom whose hook is a real method of its class (attached hooks are looked up on the class)."""
    cls = type(
        "Boom",
        (Callback,),
        {event: lambda self, learn, *a, **k: (_ for _ in ()).throw(exc)},
    )
    return cls()


class TestEvaluationCleanup:
    @pytest.mark.parametrize("method", ["validate", "get_preds"])
    @pytest.mark.parametrize("exc", [RuntimeError("boom"), KeyboardInterrupt()])
    def test_error_leaves_no_autocast_or_bar(self, method, exc):
        """An error inside validate()/get_preds() still ends autocast and closes the bar."""
        bar = ProgressCB(file=io.StringIO(), bar=True)
        learn = Learner(nn.Linear(4, 3), make_dls(), cbs=[MixedPrecisionCB(), bar])
        with pytest.raises(type(exc)):
            getattr(learn, method)(cbs=[boom("after_loss", exc)])
        assert not torch.is_autocast_enabled("cpu")
        assert bar._batch_bar is None
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32

    def test_cancel_fit_ends_validate_cleanly(self):
        """A CancelFitException raised during validate() (say, a nan check) ends it without escaping."""
        bar = ProgressCB(file=io.StringIO(), bar=True)
        learn = Learner(nn.Linear(4, 3), make_dls(), cbs=[bar])
        result = learn.validate(cbs=[boom("after_loss", CancelFitException())])
        assert "valid_loss" in result and bar._batch_bar is None

    def test_get_preds_keeps_epoch_log(self):
        """get_preds and validate leave the last fit's row in learn.epoch_log as it was."""
        learn = Learner(nn.Linear(4, 3), make_dls())
        learn.fit(1)
        row = dict(learn.epoch_log)
        learn.get_preds(DataLoader(make_data(8, seed=5), batch_size=4))
        learn.validate(DataLoader(make_data(8, seed=6), batch_size=4))
        assert learn.epoch_log == row

    def test_get_preds_several_targets(self):
        """Batches (x, y, w) give a tuple of concatenated targets."""
        x, y = make_data(20).tensors
        ds = TensorDataset(x, y, torch.rand(20))
        loss = lambda p, y, w: (
            nn.functional.cross_entropy(p, y, reduction="none") * w
        ).mean()
        learn = Learner(
            nn.Linear(4, 3),
            DataLoaders(DataLoader(ds, 8), DataLoader(ds, 8)),
            loss_func=loss,
        )
        preds, (ys, ws) = learn.get_preds()
        assert (
            preds.shape == (20, 3)
            and torch.equal(ys, y)
            and torch.equal(ws, ds.tensors[2])
        )


def learner_with_failing_cleanup():
    """A Learner whose BadCleanup.after_fit (order 30) divides by zero, before ProgressCB's (60)."""
    bar = ProgressCB(file=io.StringIO(), bar=True)
    bad_cleanup = type(
        "BadCleanup",
        (Callback,),
        {"order": 30, "after_fit": lambda s, learn, **k: 1 / 0},
    )()
    return Learner(nn.Linear(4, 3), make_dls(), cbs=[bar, bad_cleanup]), bar


class TestFitCleanup:
    def test_after_fit_reaches_every_callback(self):
        """When one after_fit hook fails, the others still run, and the fit's own error is the one raised."""
        learn, bar = learner_with_failing_cleanup()
        with pytest.raises(ValueError, match="in the loss") as info:
            learn.fit(1, cbs=[boom("after_loss", ValueError("in the loss"))])
        assert bar._epoch_bar is None and bar._batch_bar is None
        assert any(
            "BadCleanup.after_fit" in n and "ZeroDivisionError" in n
            for n in info.value.__notes__
        )

    def test_after_fit_error_raised_after_all_ran(self):
        """Without an earlier error, a failing after_fit hook is raised once every hook has run."""
        learn, bar = learner_with_failing_cleanup()
        with pytest.raises(ZeroDivisionError):
            learn.fit(1)
        assert bar._epoch_bar is None

    def test_no_graph_outlives_fit(self):
        """After a fit stopped between loss and backward, the learner holds no batch, preds or loss."""
        learn = Learner(nn.Linear(4, 3), make_dls())
        learn.fit(1, cbs=[boom("after_loss", CancelFitException())])
        assert learn.loss is None and learn.preds is None and learn.batch is None

    def test_cancelled_batch_reports_no_stale_loss(self):
        """A batch cancelled in before_batch passes loss=None to after_batch, not the last batch's loss."""
        from learnloop import CancelBatchException

        seen = []

        class Skip(Callback):
            def before_batch(self, learn, iter, **kwargs):
                if iter == 1:
                    raise CancelBatchException()

            def after_batch(self, learn, iter, loss, **kwargs):
                seen.append(loss is None)

        Learner(nn.Linear(4, 3), make_dls(), default_cbs=False).fit(
            1, valid=False, cbs=[Skip()]
        )
        assert seen == [False, True, False, False, False, False]


class TestFitOnlyCallbacks:
    def test_same_instance_twice_refused(self):
        """Attaching a callback that is already attached is an error, and the Learner keeps it."""
        cb = Callback()
        learn = Learner(nn.Linear(4, 3), make_dls(), cbs=[cb])
        with pytest.raises(ValueError, match="already attached"):
            learn.fit(1, cbs=[cb])
        assert cb in learn.cbs

    @pytest.mark.parametrize("kind", [ProgressCB, MetricsCB])
    def test_fit_cb_replaces_default_for_that_fit(self, kind):
        """fit(cbs=[ProgressCB(...)]) replaces the attached one for that fit, which comes back afterwards."""
        learn = Learner(nn.Linear(4, 3), make_dls())
        default = next(cb for cb in learn.cbs if isinstance(cb, kind))
        mine = kind(file=io.StringIO()) if kind is ProgressCB else kind()
        learn.fit(1, cbs=[mine])
        assert [cb for cb in learn.cbs if isinstance(cb, kind)] == [default]
        if kind is ProgressCB:
            assert mine.file.getvalue().count("train_loss") == 1
        else:
            assert len(mine.history) == 1 and default.history == []


class TestHookNames:
    @pytest.mark.parametrize(
        "name,suggestion",
        [
            ("begin_fit", "before_fit"),
            ("begin_batch", "before_batch"),
            ("on_epoch_end", "after_epoch"),
            ("on_train_batch_start", "before_batch"),
            ("on_validation_epoch_end", "after_validate"),
            ("on_before_optimizer_step", "before_step"),
        ],
    )
    def test_foreign_names(self, name, suggestion):
        """fastai v1, Lightning and Keras hook names are refused with our event's name."""
        cb = type("Ported", (Callback,), {name: lambda self, learn, **kw: None})()
        with pytest.raises(ValueError, match=f"did you mean {suggestion}\\?"):
            Learner(nn.Linear(4, 3), make_dls(), cbs=[cb])

    def test_helper_starting_with_after_allowed(self):
        """A helper method whose name merely starts with 'after' is not taken for an event."""
        cb = type("Report", (Callback,), {"after_fit_report": lambda self: None})()
        learn = Learner(nn.Linear(4, 3), make_dls(), cbs=[cb])
        assert cb in learn.cbs and "after_fit_report" not in learn._table


def test_optimizer_state_follows_params():
    """move_optimizer_state puts momenta on their parameter's device and leaves Adam's step count."""
    from learnloop.callbacks.device import move_optimizer_state

    # 'meta' stands in for a GPU: tensors move, nothing computes.
    model = nn.Linear(4, 3).to("meta")
    opt = torch.optim.Adam(model.parameters())
    for p in model.parameters():  # state as a checkpoint loaded on the CPU leaves it
        opt.state[p] = {"step": torch.tensor(3.0), "exp_avg": torch.zeros(p.shape)}
    move_optimizer_state(opt)
    for p, state in opt.state.items():
        assert (
            state["exp_avg"].device.type == "meta"
            and state["step"].device.type == "cpu"
        )


def test_device_cb_moves_optimizer_state(monkeypatch):
    """When DeviceCB moves the model, it moves the optimizer's state too (a resumed fit's, say)."""
    from learnloop.callbacks import device

    moved = []
    monkeypatch.setattr(device, "move_optimizer_state", moved.append)
    learn = Learner(nn.Linear(4, 3), make_dls(), default_cbs=False)
    learn.fit(1)
    DeviceCB("meta").before_fit(learn)
    assert moved == [learn.opt]
