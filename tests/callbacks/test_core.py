"""Registration checks: instances only, no misspelled or foreign hook names, signatures that take (learn, **context)."""

from __future__ import annotations

import pytest
from helpers import make_dls, training_loop
from torch import nn

from learnloop import ORDERS, Callback, Learner


def learner(*cbs):
    return Learner(nn.Linear(4, 3), make_dls(), cbs=list(cbs), default_cbs=False)


class TestHookNames:
    @pytest.mark.parametrize(
        "name,suggestion",
        [
            ("before_epoc", "before_epoch"),
            ("afterbatch", "after_batch"),
            ("After_Fit", "after_fit"),
            ("before_bacward", "before_backward"),
            ("after_cancel_btach", "after_cancel_batch"),
        ],
    )
    def test_misspelled_hook(self, name, suggestion):
        """A method named like an event but misspelled is refused with the nearest event."""
        cb = type("Typo", (Callback,), {name: lambda self, learn, **kw: None})()
        with pytest.raises(
            ValueError,
            match=f"Typo.{name} looks like an event.*did you mean {suggestion}\\?",
        ):
            learner(cb)

    def test_ordinary_methods_allowed(self):
        """Helper methods that look like no event are fine."""
        cb = type(
            "Fine",
            (Callback,),
            {"plot_stats": lambda self: None, "reset": lambda self: None},
        )()
        assert cb in learner(cb).cbs

    @pytest.mark.parametrize("attach", ["init", "add_cbs", "fit"])
    def test_checked_everywhere(self, attach):
        """The same check runs at construction, in add_cbs and in fit(cbs=...), before any batch."""
        ran = []
        cb = type(
            "Typo",
            (Callback,),
            {
                "before_epoc": lambda self, learn, **kw: None,
                "before_batch": lambda self, learn, **kw: ran.append(1),
            },
        )()
        with pytest.raises(ValueError, match="did you mean before_epoch"):
            if attach == "init":
                learner(cb)
            elif attach == "add_cbs":
                learner().add_cbs(cb)
            else:
                learner().fit(1, cbs=[cb])
        assert ran == []

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

    def test_helper_starting_with_after_refused(self):
        """A helper whose name starts with 'after_' would never be called: refused unless marked."""
        cb = type("Report", (Callback,), {"after_fit_report": lambda self: None})()
        with pytest.raises(
            ValueError, match="Report.after_fit_report looks like an event"
        ):
            Learner(nn.Linear(4, 3), make_dls(), cbs=[cb])


class TestSignatures:
    @pytest.mark.parametrize(
        "hook",
        [
            lambda self: None,
            lambda self, learn: None,
            lambda self, learn, epoch, extra: None,
        ],
        ids=["no-learn", "no-context", "extra-required"],
    )
    def test_bad_signature(self, hook):
        """A hook that cannot be called as hook(learn, **context) is refused with the fix."""
        cb = type("Bad", (Callback,), {"after_epoch": hook})()
        with pytest.raises(
            TypeError,
            match=r"Bad.after_epoch.*def after_epoch\(self, learn, \*args, \*\*kwargs\)",
        ):
            learner(cb)

    @pytest.mark.parametrize(
        "hook",
        [
            lambda self, learn, *args, **kwargs: self.epochs.append(kwargs["epoch"]),
            lambda self, learn, epoch: self.epochs.append(epoch),
            lambda self, learn, epoch=None, **kw: self.epochs.append(epoch),
        ],
        ids=["swallow", "exact", "defaults"],
    )
    def test_good_signature(self, hook, capsys):
        """Hooks that take the event's context, named or swallowed, are accepted and run in a fit."""
        cb = type("Good", (Callback,), {"after_epoch": hook})()
        cb.epochs = []
        learn = learner(cb)
        assert training_loop(learn, capsys)["after_epoch"] == "Good"
        learn.fit(2)
        assert cb.epochs == [0, 1]


class TestInstances:
    def test_class_instead_of_instance(self):
        """Passing a callback class says to instantiate it."""

        class MyCB(Callback):
            pass

        with pytest.raises(
            TypeError,
            match=r"Got the class MyCB, not an instance: pass MyCB\(\) instead",
        ):
            learner(MyCB)

    def test_not_a_callback(self):
        """Something that is no callback at all is named in the error."""
        with pytest.raises(TypeError, match="is not a callback"):
            learner("progress")


class TestDefaults:
    def test_default_replaced_by_same_kind(self):
        """A passed callback of a default's kind replaces that default."""
        from learnloop import DeviceCB, MetricsCB, ProgressCB, Recorder

        mine = ProgressCB(bar=False)
        learn = Learner(nn.Linear(4, 3), make_dls(), cbs=[mine])
        kinds = [type(cb) for cb in learn.cbs]
        assert kinds == [DeviceCB, MetricsCB, Recorder, ProgressCB]
        assert learn.cbs[-1] is mine
        assert learn.recorder is learn.cbs[2]


class TestOrders:
    def test_each_builtin_takes_its_order_from_the_table(self):
        """Every built-in callback's order is its entry in ORDERS, and every entry is a callback."""
        import learnloop.callbacks as cbs

        for name, order in ORDERS.items():
            assert getattr(cbs, name).order == order, name

    def test_no_ties_across_concerns(self):
        """Built-in orders are distinct, but for the two schedulers (one concern)."""
        values = [v for k, v in ORDERS.items() if k != "EpochSchedCB"]
        assert len(values) == len(set(values))

    def test_user_callback_placed_by_name(self):
        """`order = MetricsCB.order + 1` runs a callback right after MetricsCB."""
        from learnloop import MetricsCB, Recorder

        class After(Callback):
            order = MetricsCB.order + 1

            def after_batch(self, learn, *args, **kwargs):
                pass

        learn = Learner(nn.Linear(4, 3), make_dls(), cbs=[After()])
        kinds = [type(cb) for cb in learn.cbs]
        assert kinds.index(MetricsCB) + 1 == kinds.index(After) < kinds.index(Recorder)
