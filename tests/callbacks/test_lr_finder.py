"""Tests for learnloop.callbacks.lr_finder: the sweep, the suggestion, the plot, and the restore."""

from __future__ import annotations

import pickle

import pytest
import torch
from helpers import assert_same, make_dls
from torch import nn

from learnloop import (
    Callback,
    CheckpointCB,
    CSVLoggerCB,
    EarlyStoppingCB,
    GradClipCB,
    Learner,
    LRFinderCB,
    LRFindResult,
    MetricsCB,
    MixedPrecisionCB,
)


def small_model() -> nn.Module:
    """A model with parameters and buffers (BatchNorm running stats)."""
    return nn.Sequential(
        nn.Linear(4, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3)
    )


def trained_learner(**kw) -> Learner:
    """A learner after one epoch of AdamW, so the optimizer has state."""
    learn = Learner(
        small_model(), make_dls(n=320), lr=1e-2, opt_func=torch.optim.AdamW, **kw
    )
    learn.fit(1)
    return learn


class Boom(Callback):
    """Raises in the middle of the sweep."""

    def after_batch(self, learn, iter, **kwargs):
        if iter == 5:
            raise RuntimeError("boom")


class TestRestore:
    def test_weights_and_optimizer_are_restored_bitwise(self):
        """Model parameters, buffers and opt.state_dict() (state and param_groups) are bitwise unchanged."""
        learn = trained_learner()
        model_before = {k: v.clone() for k, v in learn.model.state_dict().items()}
        opt_before = pickle.loads(pickle.dumps(learn.opt.state_dict()))
        opt = learn.opt
        learn.lr_find(num_it=30)
        assert learn.opt is opt
        assert_same(model_before, learn.model.state_dict())
        assert_same(opt_before, learn.opt.state_dict())
        assert not learn.model.training  # as the fit left it

    @pytest.mark.parametrize("training", [True, False])
    def test_model_mode_is_restored(self, training):
        """The model comes back in the train or eval mode it was in before the sweep."""
        learn = trained_learner()
        learn.model.train(training)
        learn.lr_find(num_it=10)
        assert learn.model.training is training

    def test_no_optimizer_before_means_none_after(self):
        """If the learner had no optimizer yet, it has none after the sweep, and the weights are unchanged."""
        learn = Learner(small_model(), make_dls(n=320))
        before = {k: v.clone() for k, v in learn.model.state_dict().items()}
        learn.lr_find(num_it=20)
        assert learn.opt is None
        assert_same(before, learn.model.state_dict())

    def test_restored_after_divergence(self):
        """A sweep stopped by divergence still restores the state."""
        learn = trained_learner()
        before = {k: v.clone() for k, v in learn.model.state_dict().items()}
        opt_before = pickle.loads(pickle.dumps(learn.opt.state_dict()))
        result = learn.lr_find(start_lr=1e-3, end_lr=1e6, num_it=100)
        assert len(result.losses) < 100
        assert_same(before, learn.model.state_dict())
        assert_same(opt_before, learn.opt.state_dict())

    def test_restored_after_an_exception(self):
        """An error in the sweep propagates, and weights, optimizer and callbacks are restored."""
        learn = trained_learner()
        cbs = list(learn.cbs)
        before = {k: v.clone() for k, v in learn.model.state_dict().items()}
        opt_before = pickle.loads(pickle.dumps(learn.opt.state_dict()))
        with pytest.raises(RuntimeError, match="boom"):
            learn.lr_find(num_it=30, cbs=[Boom()])
        assert learn.cbs == cbs
        assert_same(before, learn.model.state_dict())
        assert_same(opt_before, learn.opt.state_dict())

    def test_recorder_and_metrics_keep_the_last_fit(self):
        """The sweep is not recorded by the Recorder or MetricsCB; epoch_log and epoch are unchanged."""
        learn = trained_learner()
        losses, history = learn.recorder.losses, list(learn.cbs[1].history)
        log, epoch = dict(learn.epoch_log), learn.epoch
        learn.lr_find(num_it=30)
        assert learn.recorder.losses == losses
        assert (
            next(cb for cb in learn.cbs if isinstance(cb, MetricsCB)).history == history
        )
        assert learn.epoch_log == log and learn.epoch == epoch

    def test_random_state_is_restored(self):
        """lr_find leaves torch's generator as it was, so a later fit trains as without it."""
        learn = trained_learner()
        state = torch.get_rng_state()
        learn.lr_find(num_it=20)
        assert torch.equal(state, torch.get_rng_state())

    def test_scaler_state_is_restored(self):
        """Callbacks with a state_dict (the fp16 GradScaler) get it back after the sweep."""
        mp = MixedPrecisionCB(torch.float16)
        learn = trained_learner(cbs=[mp])
        before = mp.state_dict()
        learn.lr_find(start_lr=1e-2, end_lr=1e8, num_it=40)
        assert mp.state_dict() == before

    def test_opted_out_callbacks_are_detached(self):
        """A callback with run_in_lr_find = False sees no sweep batch, and is attached again afterwards."""

        class Tracker(Callback):
            run_in_lr_find = False

            def __init__(self):
                self.batches = 0

            def after_batch(self, learn, *args, **kwargs):
                self.batches += 1

        tracker = Tracker()
        learn = Learner(small_model(), make_dls(n=320), cbs=[tracker])
        learn.lr_find(num_it=10)
        assert tracker.batches == 0 and tracker in learn.cbs

    def test_tracking_callbacks_sit_out(self, tmp_path):
        """Checkpoints, early stopping and logs see nothing of the sweep; epochs_done is unchanged."""
        cbs = [
            CheckpointCB(tmp_path / "ck"),
            EarlyStoppingCB(patience=1),
            CSVLoggerCB(tmp_path / "log.csv"),
        ]
        learn = Learner(small_model(), make_dls(n=320), cbs=cbs)
        learn.lr_find(num_it=30)
        assert not (tmp_path / "ck").exists() and not (tmp_path / "log.csv").exists()
        assert learn.epochs_done == 0

    def test_training_callbacks_take_part(self):
        """Callbacks that shape training (GradClipCB) run during the sweep."""
        clip = GradClipCB(1.0)
        learn = Learner(small_model(), make_dls(n=320), cbs=[clip])
        learn.lr_find(num_it=15)
        assert len(clip.norms) > 0


class TestSuggestion:
    def test_returns_a_float_inside_the_sweep(self):
        """The result is a float between start_lr and end_lr, below the divergence point."""
        learn = Learner(small_model(), make_dls(n=320), opt_func=torch.optim.AdamW)
        lr = learn.lr_find()
        assert isinstance(lr, float) and isinstance(lr, LRFindResult)
        assert 1e-7 <= lr <= max(lr.lrs)
        assert 1e-5 < lr < 1.0  # AdamW on this task trains well in this range

    @pytest.mark.parametrize(
        ("method", "expected"), [("valley", 1e-3), ("steep", 1e-2), ("minimum", 1.0)]
    )
    def test_methods_on_a_known_curve(self, method, expected):
        """Each method reads the right point of a synthetic curve (flat, falling, bottom, rising)."""
        cb = LRFinderCB(1e-8, 1e3, num_it=12)
        cb.lrs = [10.0 ** (k - 8) for k in range(12)]
        cb.losses = cb.smoothed = [2.0] * 4 + [1.9, 1.6, 1.2, 0.7, 0.5, 0.45, 1.0, 5.0]
        assert cb.result(method) == pytest.approx(expected)

    def test_unknown_method(self):
        """An unknown suggest= lists the methods."""
        learn = Learner(small_model(), make_dls())
        with pytest.raises(ValueError, match="valley"):
            learn.lr_find(suggest="best")

    def test_too_few_points(self):
        """A sweep that diverges at once raises with what to change."""
        cb = LRFinderCB()
        cb.lrs, cb.losses, cb.smoothed = (
            [1e-7, 1e-6],
            [1.0, float("nan")],
            [1.0, float("nan")],
        )
        with pytest.raises(RuntimeError, match="lower start_lr"):
            cb.result()

    def test_bad_range(self):
        """start_lr must be below end_lr."""
        with pytest.raises(ValueError, match="start_lr < end_lr"):
            LRFinderCB(start_lr=1.0, end_lr=0.1)

    def test_sweep_is_exponential(self):
        """The learning rates go from start_lr to end_lr geometrically over num_it batches."""
        learn = Learner(small_model(), make_dls(n=320))
        lr = learn.lr_find(start_lr=1e-5, end_lr=1e-1, num_it=5, stop_div=False)
        assert lr.lrs == pytest.approx([1e-5, 1e-4, 1e-3, 1e-2, 1e-1])

    def test_result_pickles(self):
        """The result survives pickling with its sweep."""
        r = LRFindResult(0.01, [1e-3, 1e-2], [1.0, 0.5], [1.0, 0.7], "steep")
        back = pickle.loads(pickle.dumps(r))
        assert back == 0.01 and back.lrs == r.lrs and back.method == "steep"


class TestPlot:
    def test_log_axis_and_marked_suggestion(self):
        """plot() returns a Figure with a log x axis and a marker at the suggested lr."""
        from matplotlib.figure import Figure

        learn = Learner(small_model(), make_dls(n=320))
        lr = learn.lr_find(num_it=40)
        fig = lr.plot()
        assert isinstance(fig, Figure)
        ax = fig.axes[0]
        assert ax.get_xscale() == "log"
        marker = next(line for line in ax.lines if line.get_marker() == "o")
        assert list(marker.get_xdata()) == [float(lr)]
        assert "valley" in ax.get_legend().get_texts()[-1].get_text()
