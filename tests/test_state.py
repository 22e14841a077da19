"""capture/restore: a learner put back exactly as it was, or not at all."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from helpers import make_dls
from torch import nn

from learnloop import Callback, Learner
from learnloop.state import capture, restore


class Counter(Callback):
    """A stateful callback; `fail` makes its load_state_dict raise."""

    def __init__(self, fail: bool = False):
        self.n, self.fail = 0, fail

    def after_batch(self, learn, *args, **kwargs):
        self.n += 1

    def state_dict(self):
        return {"n": self.n}

    def load_state_dict(self, state):
        if self.fail:
            raise RuntimeError("refused")
        self.n = state["n"]


def trained(*cbs) -> Learner:
    learn = Learner(
        nn.Linear(4, 3),
        make_dls(shuffle=True),
        opt_func=torch.optim.AdamW,
        default_cbs=False,
        cbs=list(cbs),
    )
    learn.fit(1)
    return learn


def draws() -> tuple:
    return (
        random.random(),
        float(np.random.rand()),
        torch.rand(1).item(),
        torch.randperm(10).tolist(),
    )


def test_restore_undoes_a_fit_bitwise():
    """Weights, optimizer state, callback state, counters and every RNG come back exactly."""
    counter = Counter()
    learn = trained(counter)
    state = capture(learn, clone=True)
    weights = [p.detach().clone() for p in learn.model.parameters()]
    expected = draws()
    restore(learn, capture(learn, clone=True))  # a no-op restore changes nothing
    learn.fit(2)
    restore(learn, state)
    assert all(torch.equal(a, b) for a, b in zip(weights, learn.model.parameters()))
    assert (
        learn.opt.state_dict()["state"][0]["step"]
        == state["optimizer"]["state"][0]["step"]
    )
    assert counter.n == 8 and learn.epochs_done == 1
    assert draws() == expected


def test_clone_is_independent_of_the_live_model():
    """capture(clone=True) does not change when training goes on; capture() shares storage."""
    learn = trained()
    cloned, shared = capture(learn, clone=True), capture(learn)
    learn.fit(1)
    live = learn.model.weight
    assert torch.equal(shared["model"]["weight"], live)
    assert not torch.equal(cloned["model"]["weight"], live)


def test_failing_callback_state_changes_nothing():
    """A callback that refuses its state: ValueError naming it, and the learner is unchanged."""
    ok, bad = Counter(), Counter(fail=True)
    learn = trained(ok, bad)
    state = capture(learn, clone=True)
    learn.fit(1)
    weights = learn.model.weight.detach().clone()
    with pytest.raises(ValueError, match="Counter_1.load_state_dict failed.*refused"):
        restore(learn, state)
    assert ok.n == 16 and torch.equal(learn.model.weight, weights)
