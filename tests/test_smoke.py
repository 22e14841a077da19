"""Smoke test that the core trains (fuller tests live in test_learner.py)."""

from helpers import make_dls
from torch import nn

from learnloop import Accuracy, Learner, MetricsCB


def test_fit_learns():
    """Three epochs of SGD on a separable task reach high validation accuracy."""
    learn = Learner(nn.Linear(4, 3), make_dls(), lr=0.5, cbs=[MetricsCB(Accuracy())])
    learn.fit(3)
    assert learn.epoch_log["accuracy"] > 0.8
