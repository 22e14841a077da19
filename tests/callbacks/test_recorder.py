"""Recorder: per-batch learning rates and losses, and the loss and lr plots."""

from __future__ import annotations

import pytest
import torch
from helpers import count_host_reads, make_data, make_dls
from torch import nn

from learnloop import Callback, DataLoaders, GradClipCB, Learner, Recorder
from learnloop.callbacks.recorder import smooth


def test_records_every_training_batch():
    """One lr and one loss per training batch, none for validation; losses equal the batch losses."""
    seen = []

    class Keep(Callback):
        def after_loss(self, learn, loss, **kwargs):
            if learn.training:
                seen.append(loss.item())

    learn = Learner(nn.Linear(4, 3), make_dls(), lr=0.05, cbs=[Keep()])
    learn.fit(2)
    rec = learn.recorder
    assert len(rec.losses) == len(rec.lrs) == 12
    assert rec.losses == pytest.approx(seen)
    assert rec.lrs == [0.05] * 12
    assert [x for x, _ in rec.valid_losses] == [6, 12]


def test_lr_read_before_scheduler_steps():
    """lrs[i] is the rate batch i stepped with, even when a scheduler changes it after each step."""

    class Halve(Callback):
        def after_step(self, learn, *args, **kwargs):
            for g in learn.opt.param_groups:
                g["lr"] /= 2

    learn = Learner(nn.Linear(4, 3), make_dls(), lr=1.0, cbs=[Halve()])
    learn.fit(1)
    assert learn.recorder.lrs == [1.0, 0.5, 0.25, 0.125, 0.0625, 0.03125]


@pytest.mark.parametrize("plot", ["plot_loss", "plot_lr"])
def test_plots_written(tmp_path, plot):
    """Both plots are matplotlib Figures with data that save to non-empty PNGs."""
    learn = Learner(nn.Linear(4, 3), make_dls(), cbs=[Recorder()])
    learn.fit(2)
    fig = getattr(learn.recorder, plot)()
    lines = fig.axes[0].get_lines()
    assert lines and all(len(line.get_xdata()) > 0 for line in lines)
    path = tmp_path / f"{plot}.png"
    fig.savefig(path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000


def test_plot_loss_has_valid_curve():
    """The loss plot shows raw, smoothed and per-epoch validation losses."""
    learn = Learner(nn.Linear(4, 3), make_dls())
    learn.fit(2)
    labels = [
        line.get_label() for line in learn.recorder.plot_loss().axes[0].get_lines()
    ]
    assert labels == ["train (raw)", "train (smoothed)", "valid (per epoch)"]


def test_smooth_debiased():
    """The debiased moving average of a constant is that constant."""
    assert smooth([2.0] * 5) == pytest.approx([2.0] * 5)
    assert smooth([0.0, 1.0], beta=0.5) == pytest.approx([0.0, 2 / 3])


def test_recorder_property_missing():
    """learn.recorder says how to attach one when there is none."""
    learn = Learner(nn.Linear(4, 3), make_dls(), default_cbs=False)
    with pytest.raises(AttributeError, match=r"cbs=\[Recorder\(\)\]"):
        _ = learn.recorder


def test_long_run_values_as_per_batch():
    """Over several chunks and epochs, lrs and losses equal the per-batch values, as lists of floats."""
    seen_losses, seen_lrs = [], []

    class Keep(Callback):
        def after_loss(self, learn, loss, **kwargs):
            if learn.training:
                seen_losses.append(torch.tensor(loss.item()).float().item())
                seen_lrs.append(learn.opt.param_groups[0]["lr"])

        def after_step(self, learn, *args, **kwargs):
            for g in learn.opt.param_groups:
                g["lr"] *= 0.999  # every rate differs

    x, y = make_data(8).tensors
    dls = DataLoaders([(x, y)] * 700, None)
    learn = Learner(nn.Linear(4, 3), dls, lr=0.05, cbs=[Keep()])
    learn.fit(2)
    rec = learn.recorder
    assert type(rec.lrs) is list and type(rec.losses) is list
    assert all(type(v) is float for v in rec.lrs + rec.losses)
    assert rec.losses == seen_losses  # float32 values, exactly
    assert rec.lrs == seen_lrs


def test_no_host_read_per_batch(monkeypatch):
    """Recording reads nothing back from the device per batch: a few reads an epoch, not one a batch."""
    x, y = make_data(8).tensors
    dls = DataLoaders([(x, y)] * 300, None)
    names = ("item", "__float__", "tolist", "cpu", "numpy")
    reads = count_host_reads(monkeypatch, names)
    Learner(nn.Linear(4, 3), dls, default_cbs=False).fit(2)
    without = len(reads)
    reads.clear()
    Learner(
        nn.Linear(4, 3), dls, cbs=[Recorder(), GradClipCB(1.0)], default_cbs=False
    ).fit(2)
    # Two logs moved to the host once an epoch (cpu, numpy): 8; a read per batch would be 600.
    assert len(reads) - without <= 8
