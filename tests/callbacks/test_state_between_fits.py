"""What one call leaves behind for the next: lr_find, load and fit(lr=) before a fresh fit."""

from __future__ import annotations

from functools import partial

import pytest
import torch
from helpers import make_data, make_dls
from torch import nn
from torch.optim.lr_scheduler import LambdaLR
from torch.utils.data import DataLoader

from learnloop import BatchSchedCB, DataLoaders, Learner, MixedPrecisionCB, OneCycle


def one_cycle_learner(seed: int = 0) -> Learner:
    torch.manual_seed(seed)
    sched = BatchSchedCB(partial(OneCycle, total_steps=12, lr_max=0.1))
    return Learner(nn.Linear(4, 3), make_dls(), cbs=[sched])


class TestFreshScheduleAfter:
    def test_lr_find(self):
        """After fit and lr_find, a new fit runs the whole schedule again, as without lr_find."""
        plain, swept = one_cycle_learner(), one_cycle_learner()
        plain.fit(2)
        swept.fit(2)
        swept.lr_find(num_it=5)
        plain.fit(2)
        swept.fit(2)
        assert swept.recorder.lrs == pytest.approx(plain.recorder.lrs)
        assert swept.recorder.lrs[0] < swept.recorder.lrs[3]  # the warm-up is there

    def test_load(self, tmp_path):
        """A fresh fit after load() starts its schedule from the beginning; resume= continues it."""
        learn = one_cycle_learner()
        learn.fit(1)
        learn.save(tmp_path / "ck.pt")
        fresh = one_cycle_learner()
        fresh.fit(2)
        expected = fresh.recorder.lrs
        loaded = one_cycle_learner()
        loaded.load(tmp_path / "ck.pt")
        loaded.fit(2)
        assert loaded.recorder.lrs == pytest.approx(expected)
        resumed = one_cycle_learner()
        resumed.fit(2, resume=tmp_path / "ck.pt")
        # The Recorder's values are in the checkpoint: the whole run's, the first epoch's too.
        assert resumed.recorder.lrs == pytest.approx(expected)

    def test_fit_lr_with_closed_form_scheduler(self):
        """fit(lr=) sets the rate that a scheduler built from `initial_lr` (LambdaLR) starts from."""
        sched = BatchSchedCB(partial(LambdaLR, lr_lambda=lambda step: 1.0))
        learn = Learner(nn.Linear(4, 3), make_dls(), lr=0.1, cbs=[sched])
        learn.fit(1)
        learn.fit(1, lr=1.0)
        assert learn.recorder.lrs == pytest.approx([1.0] * 6)


def test_lr_find_restores_loader_generator():
    """lr_find puts the train loader's own generator back: the next fit shuffles as without it."""

    def learner() -> Learner:
        torch.manual_seed(0)
        g = torch.Generator().manual_seed(7)
        train = DataLoader(make_data(96), batch_size=16, shuffle=True, generator=g)
        return Learner(nn.Linear(4, 3), DataLoaders(train, None), lr=0.1)

    plain, swept = learner(), learner()
    swept.lr_find(num_it=5)
    plain.fit(1)
    swept.fit(1)
    for a, b in zip(plain.model.parameters(), swept.model.parameters()):
        assert torch.equal(a, b)


def test_lr_find_leaves_no_grad_scaler():
    """lr_find before the first fit with float16 leaves no GradScaler behind (it had none)."""
    mp = MixedPrecisionCB(torch.float16)
    learn = Learner(nn.Linear(4, 3), make_dls(), cbs=[mp])
    learn.lr_find(num_it=5)
    assert mp.scaler is None
