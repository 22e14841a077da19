"""SingleBatchCB and LimitBatchesCB shorten a fit without skipping the hooks of the batches that run."""

from __future__ import annotations

import pytest
from helpers import make_dls
from torch import nn

from learnloop import Callback, Learner, LimitBatchesCB, MetricsCB, SingleBatchCB


class Record(Callback):
    """Records (event, training) for a few events, after the built-in callbacks."""

    order = 500

    def __init__(self):
        self.events = []

    def before_validate(self, learn, *args, **kwargs):
        self.events.append("before_validate")

    def after_batch(self, learn, *args, **kwargs):
        self.events.append(("batch", learn.training, learn.n_iter))

    def after_fit(self, learn, *args, **kwargs):
        self.events.append("after_fit")


class TestSingleBatchCB:
    def test_one_training_batch_then_stop(self):
        """One training batch runs with every after_batch hook, then the fit stops before validation."""
        model, rec = nn.Linear(4, 3), Record()
        before = model.weight.detach().clone()
        Learner(model, make_dls(), default_cbs=False, cbs=[rec]).fit(
            3, cbs=[SingleBatchCB()]
        )
        assert rec.events == [("batch", True, 6), "after_fit"]
        assert not model.weight.detach().equal(before)  # the step was taken


class TestLimitBatchesCB:
    def test_limits_each_phase_every_epoch(self):
        """train=2, valid=1 runs 2 training and 1 validation batch per epoch, and n_iter says so."""
        rec, metrics = Record(), MetricsCB()
        learn = Learner(
            nn.Linear(4, 3),
            make_dls(),
            default_cbs=False,
            cbs=[metrics, rec, LimitBatchesCB(2, 1)],
        )
        learn.fit(2)
        batches = [e for e in rec.events if isinstance(e, tuple)]
        assert (
            batches == [("batch", True, 2), ("batch", True, 2), ("batch", False, 1)] * 2
        )
        assert all(row["valid_loss"] > 0 for row in metrics.history)

    def test_none_means_no_limit(self):
        """LimitBatchesCB(valid=1) leaves the training phase whole."""
        rec = Record()
        Learner(
            nn.Linear(4, 3),
            make_dls(),
            default_cbs=False,
            cbs=[rec, LimitBatchesCB(valid=1)],
        ).fit(1)
        assert [e[1] for e in rec.events if isinstance(e, tuple)] == [True] * 6 + [
            False
        ]

    @pytest.mark.parametrize("kwargs", [{"train": 0}, {"valid": 1.5}])
    def test_bad_limits(self, kwargs):
        """Limits must be positive ints."""
        with pytest.raises(
            ValueError,
            match=r"LimitBatchesCB (train|valid) \(None for all\) must be an int >= 1",
        ):
            LimitBatchesCB(**kwargs)
