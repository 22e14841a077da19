"""Tests for learnloop.callbacks.schedule: BatchSchedCB, EpochSchedCB, OneCycle, fit_one_cycle."""

from __future__ import annotations

import math
from functools import partial
from itertools import pairwise

import pytest
import torch
from helpers import make_dls
from torch import nn

from learnloop import (
    BatchSchedCB,
    Callback,
    CancelFitException,
    CheckpointCB,
    EpochSchedCB,
    GradAccumCB,
    Learner,
    OneCycle,
)


class RecordHypers(Callback):
    """Records lr and momentum/beta1 of the first param group as each training batch starts."""

    order = 21

    def __init__(self) -> None:
        self.lrs: list[float] = []
        self.moms: list[float] = []

    def before_batch(self, learn, *args, **kwargs):
        if learn.training:
            group = learn.opt.param_groups[0]
            self.lrs.append(group["lr"])
            self.moms.append(
                group["betas"][0] if "betas" in group else group["momentum"]
            )


class TestFitOneCycle:
    def test_lr_curve_shape(self):
        """lr warms up from lr_max/25 to lr_max at 25% of the batches, then anneals to lr_max/1e5."""
        learn = Learner(nn.Linear(4, 3), make_dls(n=160), lr=0.1)  # 10 batches
        learn.fit_one_cycle(4, lr_max=0.1)
        lrs = learn.recorder.lrs
        assert len(lrs) == 40
        peak = lrs.index(max(lrs))
        assert peak == round(0.25 * 39)
        assert lrs[0] == pytest.approx(0.1 / 25)
        assert max(lrs) == pytest.approx(0.1, rel=1e-3)
        assert lrs[-1] == pytest.approx(0.1 / 1e5)
        assert all(a < b for a, b in pairwise(lrs[: peak + 1]))
        assert all(a > b for a, b in pairwise(lrs[peak:]))

    def test_length_of_the_loader_the_fit_reads(self):
        """The schedule is sized at fit start, so a loader swapped there (a DDP shard) still ends the cycle."""

        class HalveLoader(Callback):
            order = -10  # like DistributedCB, which shards learn.dls in before_fit

            def before_fit(self, learn, *args, **kwargs):
                learn.dls = make_dls(n=48)  # 3 batches instead of 6

        learn = Learner(nn.Linear(4, 3), make_dls(), cbs=[HalveLoader()])
        learn.fit_one_cycle(2, lr_max=0.1)
        assert len(learn.recorder.lrs) == 6 and learn.recorder.lrs[-1] == pytest.approx(
            0.1 / 1e5
        )

    def test_recorder_lr_plot_shows_the_schedule(self):
        """The Recorder's lr plot draws the one-cycle curve it recorded."""
        learn = Learner(nn.Linear(4, 3), make_dls())
        learn.fit_one_cycle(2, lr_max=0.05)
        line = learn.recorder.plot_lr().axes[0].lines[0]
        assert list(line.get_ydata()) == learn.recorder.lrs

    def test_adam_beta1_cycles_opposite_to_lr(self):
        """With Adam, beta1 goes 0.95 -> 0.85 (at the lr peak) -> 0.95; beta2 is untouched."""
        rec = RecordHypers()
        learn = Learner(nn.Linear(4, 3), make_dls(n=160), opt_func=torch.optim.Adam)
        learn.fit_one_cycle(2, lr_max=1e-2, cbs=[rec])
        peak = rec.lrs.index(max(rec.lrs))
        assert rec.moms[0] == pytest.approx(0.95)
        assert (
            min(rec.moms) == pytest.approx(0.85, abs=1e-3)
            and rec.moms.index(min(rec.moms)) == peak
        )
        assert rec.moms[-1] == pytest.approx(0.95)
        assert learn.opt.param_groups[0]["betas"][1] == 0.999

    def test_sgd_without_momentum_stays_plain(self):
        """An SGD group with momentum=0 is not given momentum by the schedule."""
        rec = RecordHypers()
        learn = Learner(nn.Linear(4, 3), make_dls())
        learn.fit_one_cycle(1, lr_max=0.1, cbs=[rec])
        assert set(rec.moms) == {0}

    def test_sgd_momentum_is_cycled(self):
        """An SGD group with momentum gets the (0.95, 0.85, 0.95) cycle."""
        rec = RecordHypers()
        learn = Learner(
            nn.Linear(4, 3), make_dls(), opt_func=partial(torch.optim.SGD, momentum=0.9)
        )
        learn.fit_one_cycle(2, lr_max=0.1, cbs=[rec])
        assert rec.moms[0] == pytest.approx(0.95) and min(rec.moms) == pytest.approx(
            0.85, abs=1e-2
        )

    def test_lr_max_per_group(self):
        """A list of lr_max gives each param group its own peak; a wrong length names the groups."""
        model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 3))
        opt = torch.optim.SGD(
            [{"params": model[0].parameters()}, {"params": model[1].parameters()}], lr=1
        )
        sched = OneCycle(opt, total_steps=9, lr_max=[0.01, 0.1], pct_start=0.5)
        for _ in range(4):
            sched.step()
        assert sched.get_last_lr() == pytest.approx([0.01, 0.1])
        with pytest.raises(ValueError, match="3 values for 2 parameter groups"):
            OneCycle(opt, total_steps=9, lr_max=[0.1, 0.1, 0.1])

    def test_state_dict_resumes(self):
        """A OneCycle restored from its state_dict sets the same values as the original."""
        opt = torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=1)
        a = OneCycle(opt, total_steps=20, lr_max=0.1)
        for _ in range(7):
            a.step()
        b = OneCycle(opt, total_steps=20, lr_max=0.1)
        b.load_state_dict(a.state_dict())
        assert b.get_last_lr() == a.get_last_lr() == pytest.approx(b.lr_at(7))

    def test_resume_continues_the_schedule(self, tmp_path):
        """A one-cycle fit stopped after 2 of 4 epochs and resumed from its checkpoint gets the same lrs."""

        class StopAfter(Callback):
            order = 100  # after CheckpointCB has written the epoch

            def after_epoch(self, learn, epoch, **kwargs):
                if epoch == 1:
                    raise CancelFitException()

        full = Learner(nn.Linear(4, 3), make_dls())
        full.fit_one_cycle(4, lr_max=0.1)
        first = Learner(nn.Linear(4, 3), make_dls(), cbs=[CheckpointCB(tmp_path)])
        first.fit_one_cycle(4, lr_max=0.1, cbs=[StopAfter()])
        resumed = Learner(nn.Linear(4, 3), make_dls(), cbs=[CheckpointCB(tmp_path)])
        resumed.fit_one_cycle(4, lr_max=0.1, resume=tmp_path)
        assert (
            resumed.recorder.lrs == full.recorder.lrs
        )  # the whole run's, from the checkpoint

    @pytest.mark.parametrize(
        ("kwargs", "match"),
        [
            ({"total_steps": 0}, "total_steps"),
            ({"pct_start": 1.5}, "pct_start"),
            ({"div": 0}, "div"),
            ({"moms": (0.9, 0.8)}, "moms"),
            ({"lr_max": -1.0}, "lr_max must be a finite number > 0"),
            ({"lr_max": float("nan")}, "lr_max must be a finite number > 0"),
        ],
    )
    def test_bad_arguments(self, kwargs, match):
        """Bad OneCycle arguments raise ValueError naming the argument."""
        opt = torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=1)
        args = {"total_steps": 10, "lr_max": 0.1, **kwargs}
        with pytest.raises(ValueError, match=match):
            OneCycle(opt, **args)

    def test_needs_sized_loader(self):
        """fit_one_cycle on a loader without len() says how to schedule by hand."""
        learn = Learner(nn.Linear(4, 3), make_dls())
        learn.dls.train = iter(list(learn.dls.train))
        with pytest.raises(TypeError, match="has no len"):
            learn.fit_one_cycle(1)


class TestBatchSchedCB:
    def test_steps_once_per_training_batch(self):
        """A torch scheduler advances once per training batch (validation batches don't count)."""
        learn = Learner(nn.Linear(4, 3), make_dls(), lr=1.0)
        learn.fit(
            2,
            cbs=[
                BatchSchedCB(partial(torch.optim.lr_scheduler.ExponentialLR, gamma=0.5))
            ],
        )
        assert learn.recorder.lrs == [0.5**i for i in range(12)]

    def test_with_accumulation_schedule_follows_batches_without_warning(self):
        """With GradAccumCB the schedule still advances per batch, and torch's order warning is silenced."""
        learn = Learner(nn.Linear(4, 3), make_dls(), lr=1.0)
        sched = BatchSchedCB(
            partial(torch.optim.lr_scheduler.LambdaLR, lr_lambda=lambda i: 1 / (i + 1))
        )
        # filterwarnings=error would fail on the warning.
        learn.fit(1, cbs=[sched, GradAccumCB(3)])
        assert learn.recorder.lrs == pytest.approx([1 / (i + 1) for i in range(6)])

    def test_factory_must_be_callable(self):
        """A scheduler instance instead of a factory is refused with the fix."""
        with pytest.raises(TypeError, match="functools.partial"):
            BatchSchedCB(0.1)

    def test_factory_must_return_a_scheduler(self):
        """A factory returning something without step() fails at fit start."""
        learn = Learner(nn.Linear(4, 3), make_dls())
        with pytest.raises(TypeError, match="no step"):
            learn.fit(1, cbs=[BatchSchedCB(lambda opt: 42)])


class TestEpochSchedCB:
    def test_steps_once_per_epoch(self):
        """StepLR(step_size=1, gamma=0.5) halves the lr between epochs."""
        learn = Learner(nn.Linear(4, 3), make_dls(), lr=0.8)
        learn.fit(
            3,
            cbs=[
                EpochSchedCB(
                    partial(torch.optim.lr_scheduler.StepLR, step_size=1, gamma=0.5)
                )
            ],
        )
        assert learn.recorder.lrs == [0.8] * 6 + [0.4] * 6 + [0.2] * 6

    def test_plateau_reads_the_monitored_value(self):
        """ReduceLROnPlateau is stepped with valid_loss, and cuts the lr when it stops improving."""
        # Too small to improve valid_loss by 10%.
        learn = Learner(nn.Linear(4, 3), make_dls(), lr=1e-3)
        plateau = partial(
            torch.optim.lr_scheduler.ReduceLROnPlateau,
            patience=0,
            factor=0.1,
            threshold=0.1,
        )
        learn.fit(3, cbs=[EpochSchedCB(plateau)])
        assert math.isclose(learn.opt.param_groups[0]["lr"], 1e-5, rel_tol=1e-6)

    def test_plateau_missing_monitor_lists_keys(self):
        """A monitor that is not in epoch_log raises, listing what is there."""
        learn = Learner(nn.Linear(4, 3), make_dls())
        cb = EpochSchedCB(
            partial(torch.optim.lr_scheduler.ReduceLROnPlateau), monitor="accuracy"
        )
        with pytest.raises(
            ValueError,
            match="EpochSchedCB monitors .accuracy.*available: train_loss, valid_loss",
        ):
            learn.fit(1, cbs=[cb])
