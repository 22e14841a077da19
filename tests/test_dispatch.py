"""CallbackHost: attaching and removing callbacks, callbacks for one fit, cleanup hooks that all run."""

from __future__ import annotations

import io

import pytest
from helpers import boom, make_dls
from torch import nn

from learnloop import Callback, Learner, MetricsCB, ProgressCB


def learner(*cbs, **kw):
    return Learner(nn.Linear(4, 3), make_dls(), cbs=list(cbs), **kw)


class TestAddRemove:
    def test_add_and_remove(self):
        """add_cbs attaches in order; remove_cbs detaches; removing a stranger is an error."""

        class A(Callback):
            order = 5

        a, b = A(), Callback()
        learn = learner(default_cbs=False)
        learn.add_cbs(a, b)
        assert learn.cbs == [b, a]
        learn.remove_cbs(a)
        assert learn.cbs == [b]
        with pytest.raises(ValueError, match="is not attached"):
            learn.remove_cbs(a)

    def test_same_instance_twice_refused(self):
        """Attaching a callback that is already attached is an error, and the Learner keeps it."""
        cb = Callback()
        learn = learner(cb)
        with pytest.raises(ValueError, match="already attached"):
            learn.fit(1, cbs=[cb])
        assert cb in learn.cbs


class TestFitOnlyCallbacks:
    @pytest.mark.parametrize("kind", [ProgressCB, MetricsCB])
    def test_fit_cb_replaces_default_for_that_fit(self, kind):
        """fit(cbs=[ProgressCB(...)]) replaces the attached one for that fit, which comes back afterwards."""
        learn = learner()
        default = next(cb for cb in learn.cbs if isinstance(cb, kind))
        mine = kind(file=io.StringIO()) if kind is ProgressCB else kind()
        learn.fit(1, cbs=[mine])
        assert [cb for cb in learn.cbs if isinstance(cb, kind)] == [default]
        if kind is ProgressCB:
            assert mine.file.getvalue().count("train_loss") == 1
        else:
            assert len(mine.history) == 1 and default.history == []


def learner_with_failing_cleanup():
    """A Learner whose BadCleanup.after_fit (order 30) divides by zero, before ProgressCB's (60)."""
    bar = ProgressCB(file=io.StringIO(), bar=True)
    bad_cleanup = type(
        "BadCleanup",
        (Callback,),
        {"order": 30, "after_fit": lambda s, learn, **k: 1 / 0},
    )()
    return learner(bar, bad_cleanup)


class TestCleanupHooks:
    def test_after_fit_reaches_every_callback(self, tqdm_bars):
        """When one after_fit hook fails, the others still run, and the fit's own error is the one raised."""
        learn = learner_with_failing_cleanup()
        with pytest.raises(ValueError, match="in the loss") as info:
            learn.fit(1, cbs=[boom("after_loss", ValueError("in the loss"))])
        # ProgressCB.after_fit ran after BadCleanup's: both its bars are closed.
        assert [(b.first_desc, b.closed) for b in tqdm_bars] == [
            ("epoch", True),
            ("train", True),
        ]
        assert any(
            "BadCleanup.after_fit" in n and "ZeroDivisionError" in n
            for n in info.value.__notes__
        )

    def test_after_fit_error_raised_after_all_ran(self, tqdm_bars):
        """Without an earlier error, a failing after_fit hook is raised once every hook has run."""
        learn = learner_with_failing_cleanup()
        with pytest.raises(ZeroDivisionError):
            learn.fit(1)
        assert [(b.first_desc, b.closed) for b in tqdm_bars] == [
            ("epoch", True),
            ("train", True),
        ]
