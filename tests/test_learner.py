"""The loop: event order, cancel levels, fit-only callbacks, cleanup, error notes, inference, the oracle."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
import torch.nn.functional as F
from helpers import boom, make_data, make_dls, training_loop
from torch import nn
from torch.utils.data import DataLoader, IterableDataset, TensorDataset

from learnloop import (
    EVENTS,
    Callback,
    CancelBackwardException,
    CancelBatchException,
    CancelEpochException,
    CancelFitException,
    CancelStepException,
    CancelTrainException,
    CancelValidException,
    DataLoaders,
    Learner,
    MixedPrecisionCB,
    ProgressCB,
)


def _recording_class():
    """A callback class with a method for every event that appends the event's name."""

    def make(event):
        def hook(self, learn, *args, **kwargs):
            self.events.append(event)
            if self.trigger == event and self.fired < self.times:
                self.fired += 1
                raise self.exc

        return hook

    return type("Recording", (Callback,), {e: make(e) for e in EVENTS})


Recording = _recording_class()


def recorder(trigger=None, exc=None, times=1):
    cb = Recording()
    cb.events, cb.trigger, cb.exc, cb.times, cb.fired = [], trigger, exc, times, 0
    return cb


def tiny_learner(cbs, n_train=16, n_valid=8, **kw):
    """1 train batch and 1 valid batch."""
    dls = make_dls(n=n_train, bs=n_train)
    dls.valid = DataLoader(make_data(n_valid, seed=1), batch_size=n_valid)
    return Learner(nn.Linear(4, 3), dls, cbs=cbs, default_cbs=False, **kw)


TRAIN_BATCH = [
    "before_batch",
    "after_pred",
    "after_loss",
    "before_backward",
    "after_backward",
    "before_step",
    "after_step",
    "after_batch",
]
VALID_BATCH = ["before_batch", "after_pred", "after_loss", "after_batch"]


def clean_epoch():
    return [
        "before_epoch",
        "before_train",
        *TRAIN_BATCH,
        "after_train",
        "before_validate",
        *VALID_BATCH,
        "after_validate",
        "after_epoch",
    ]


class TestEventOrder:
    def test_full_sequence(self):
        """Two epochs fire the exact nested sequence of DESIGN.md."""
        cb = recorder()
        tiny_learner([cb]).fit(2)
        assert cb.events == ["before_fit", *clean_epoch(), *clean_epoch(), "after_fit"]

    def test_train_only_and_valid_only(self):
        """fit(train=False) skips the training phase; fit(valid=False) the validation phase."""
        cb = recorder()
        learn = tiny_learner([cb])
        learn.fit(1, valid=False)
        assert "before_validate" not in cb.events and "before_train" in cb.events
        cb.events.clear()
        learn.fit(1, train=False)
        assert "before_train" not in cb.events and "before_validate" in cb.events

    def test_hooks_receive_context(self):
        """Hooks get the event's context as keywords: epoch, iter, loss, n_epochs."""
        seen = {}

        class Ctx(Callback):
            def before_fit(self, learn, n_epochs, **kwargs):
                seen["n_epochs"] = n_epochs

            def after_epoch(self, learn, epoch, **kwargs):
                seen.setdefault("epochs", []).append(epoch)

            def after_batch(self, learn, iter, loss, **kwargs):
                seen["loss_is_learn_loss"] = loss is learn.loss
                seen["iter"] = iter

        tiny_learner([Ctx()]).fit(3)
        assert seen == {
            "n_epochs": 3,
            "epochs": [0, 1, 2],
            "loss_is_learn_loss": True,
            "iter": 0,
        }

    def test_order_and_stable_ties(self):
        """Callbacks run by ascending order; equal orders keep the order they were attached in."""
        calls = []

        def cb(name, order):
            return type(
                name,
                (Callback,),
                {
                    "order": order,
                    "before_fit": lambda self, learn, **k: calls.append(name),
                },
            )()

        tiny_learner([cb("c", 5), cb("a", 1), cb("b1", 3), cb("b2", 3)]).fit(1)
        assert calls == ["a", "b1", "b2", "c"]


CANCEL_CASES = [
    # (raised in, exception, the sequence expected around it)
    (
        "after_pred",
        CancelBatchException,
        [
            "before_batch",
            "after_pred",
            "after_cancel_batch",
            "after_batch",
            "after_train",
        ],
    ),
    (
        "before_backward",
        CancelBackwardException,
        ["before_backward", "after_cancel_backward", "after_backward", "before_step"],
    ),
    (
        "before_step",
        CancelStepException,
        ["before_step", "after_cancel_step", "after_step", "after_batch"],
    ),
    (
        "before_train",
        CancelTrainException,
        ["before_train", "after_cancel_train", "after_train", "before_validate"],
    ),
    (
        "before_validate",
        CancelValidException,
        ["before_validate", "after_cancel_validate", "after_validate", "after_epoch"],
    ),
    (
        "before_epoch",
        CancelEpochException,
        [
            "before_fit",
            "before_epoch",
            "after_cancel_epoch",
            "after_epoch",
            "after_fit",
        ],
    ),
    (
        "after_train",
        CancelFitException,
        ["after_train", "after_cancel_fit", "after_fit"],
    ),
]


class TestCancel:
    @pytest.mark.parametrize(
        "event,exc,expected", CANCEL_CASES, ids=[c[1].__name__ for c in CANCEL_CASES]
    )
    def test_cancel_levels(self, event, exc, expected):
        """Each Cancel* skips the rest of its level, then after_cancel_<level> and after_<level> run."""
        cb = recorder(trigger=event, exc=exc())
        tiny_learner([cb]).fit(1)
        events = cb.events
        windows = [events[i : i + len(expected)] for i in range(len(events))]
        assert expected in windows, events
        assert events[-1] == "after_fit"

    def test_cancel_batch_in_validation(self):
        """A validation batch cancelled after predict fires after_cancel_batch, after_batch, after_validate."""

        class CancelValid(Callback):
            def after_pred(self, learn, *args, **kwargs):
                if not learn.training:
                    raise CancelBatchException()

        cb = recorder()
        tiny_learner([cb, CancelValid()]).fit(1)
        start = cb.events.index("before_validate")
        assert cb.events[start:] == [
            "before_validate",
            "before_batch",
            "after_pred",
            "after_cancel_batch",
            "after_batch",
            "after_validate",
            "after_epoch",
            "after_fit",
        ]

    def test_cancel_step_keeps_weights(self):
        """A step cancelled on every batch leaves the weights untouched."""
        cb = recorder(trigger="before_step", exc=CancelStepException(), times=10**6)
        learn = tiny_learner([cb])
        before = copy.deepcopy(learn.model.state_dict())
        learn.fit(2)
        assert all(
            torch.equal(before[k], v) for k, v in learn.model.state_dict().items()
        )

    def test_cancel_fit_stops_epochs(self):
        """CancelFitException in after_epoch ends the fit after that epoch."""
        cb = recorder(trigger="after_epoch", exc=CancelFitException())
        tiny_learner([cb]).fit(5)
        assert cb.events.count("before_epoch") == 1

    def test_cancel_outside_its_level(self):
        """A batch cancel raised at fit level is reported as a misuse, and after_fit still runs."""
        cb = recorder(trigger="before_fit", exc=CancelBatchException())
        with pytest.raises(
            RuntimeError,
            match="CancelBatchException was raised in Recording.before_fit, outside the level",
        ):
            tiny_learner([cb]).fit(1)
        assert cb.events[-1] == "after_fit"


class TestCleanup:
    @pytest.mark.parametrize("exc", [RuntimeError("boom"), KeyboardInterrupt()])
    def test_after_fit_runs_on_error(self, exc):
        """after_fit runs when a hook raises an error or a KeyboardInterrupt, which then propagates."""
        cb = recorder(trigger="after_loss", exc=exc)
        with pytest.raises(type(exc)):
            tiny_learner([cb]).fit(1)
        assert cb.events[-1] == "after_fit"

    def test_interrupted_fit_leaves_no_gradients(self):
        """After a KeyboardInterrupt between backward and zero_grad, the next fit starts from clean gradients."""
        cb = recorder(trigger="after_backward", exc=KeyboardInterrupt())
        learn = tiny_learner([cb])
        with pytest.raises(KeyboardInterrupt):
            learn.fit(1)
        assert any(p.grad is not None for p in learn.model.parameters())
        grads = []

        class Spy(Callback):
            def before_backward(self, learn, *args, **kwargs):
                grads.append([p.grad for p in learn.model.parameters()])

        learn.remove_cbs(cb)
        learn.fit(1, cbs=[Spy()])
        assert grads[0] == [None, None]

    @pytest.mark.parametrize("fails", [False, True])
    def test_fit_only_callbacks_removed(self, fails):
        """Callbacks passed to fit(cbs=...) are gone afterwards, whether the fit ended well or not."""
        learn = tiny_learner([])
        extra = recorder(trigger="after_pred" if fails else None, exc=ValueError("x"))
        if fails:
            with pytest.raises(ValueError):
                learn.fit(1, cbs=[extra])
        else:
            learn.fit(1, cbs=[extra])
        assert extra.events and extra not in learn.cbs
        before = len(extra.events)
        learn.fit(1)
        assert len(extra.events) == before

    def test_validation_in_eval_no_grad(self):
        """Validation runs in eval mode without autograd; after the fit the model is in eval mode."""
        modes = []

        class Spy(Callback):
            def after_pred(self, learn, preds, **kwargs):
                modes.append(
                    (learn.training, learn.model.training, preds.requires_grad)
                )

        learn = tiny_learner([Spy()])
        learn.fit(1)
        assert modes == [(True, True, True), (False, False, False)]
        assert not learn.model.training

    @pytest.mark.parametrize("method", ["validate", "get_preds"])
    @pytest.mark.parametrize("training", [True, False])
    def test_evaluation_keeps_the_model_mode(self, method, training):
        """validate() and get_preds() run in eval mode and leave the model in the mode they found."""
        learn = tiny_learner([])
        learn.model.train(training)
        getattr(learn, method)()
        assert learn.model.training is training

    def test_no_graph_outlives_fit(self):
        """After a fit stopped between loss and backward, the learner holds no batch, preds or loss."""
        learn = Learner(nn.Linear(4, 3), make_dls())
        learn.fit(1, cbs=[boom("after_loss", CancelFitException())])
        assert learn.loss is None and learn.preds is None and learn.batch is None

    def test_cancelled_batch_reports_no_stale_loss(self):
        """A batch cancelled in before_batch passes loss=None to after_batch, not the last batch's loss."""
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


class TestErrors:
    def test_empty_train_loader(self):
        """An empty train DataLoader is refused at construction, before any batch."""
        dls = DataLoaders(DataLoader(make_data(0), batch_size=4), None)
        with pytest.raises(ValueError, match="dls.train is empty"):
            Learner(nn.Linear(4, 3), dls)

    def test_model_error_note(self):
        """A model error names the step, epoch, batch and input shapes."""
        learn = Learner(nn.Linear(5, 3), make_dls(), default_cbs=False)
        with pytest.raises(RuntimeError) as info:
            learn.fit(1)
        note = "\n".join(getattr(info.value, "__notes__", []))
        assert (
            "predict" in note
            and "epoch 0, training batch 0" in note
            and "shape (16, 4)" in note
        )

    def test_loss_error_note(self):
        """A loss error shows the shapes and dtypes of preds and targets."""
        x, y = make_data(16).tensors
        # Targets (16, 1): a common mistake.
        dl = DataLoader(TensorDataset(x, y[:, None]), batch_size=16)
        learn = Learner(nn.Linear(4, 3), DataLoaders(dl, None), default_cbs=False)
        with pytest.raises(RuntimeError) as info:
            learn.fit(1)
        note = "\n".join(getattr(info.value, "__notes__", []))
        assert (
            "get_loss" in note
            and "preds shape (16, 3) float32" in note
            and "targets shape (16, 1) int64" in note
        )

    @pytest.mark.parametrize(
        ("piece", "says"),
        [("step", "the optimizer step (step)"), ("zero_grad", "zero_grad")],
    )
    def test_optimizer_error_note(self, piece, says):
        """An error in the optimizer step or zero_grad is noted with where the loop was and the loss."""

        calls = []

        def broken(self, *args, **kwargs):
            calls.append(piece)  # fit's own zero_grad before the first batch passes
            if piece == "step" or len(calls) > 1:
                raise ZeroDivisionError

        Broken = type("Broken", (torch.optim.SGD,), {piece: broken})
        learn = Learner(nn.Linear(4, 3), make_dls(), opt_func=Broken, default_cbs=False)
        with pytest.raises(ZeroDivisionError) as info:
            learn.fit(1)
        note = "\n".join(info.value.__notes__)
        assert f"raised in {says} (epoch 0, training batch 0)" in note
        assert "loss shape () float32" in note

    def test_callback_error_note(self):
        """An error in a hook names the callback, the event, the epoch and the batch."""
        cb = recorder(trigger="after_loss", exc=ZeroDivisionError("oops"))
        with pytest.raises(ZeroDivisionError) as info:
            tiny_learner([cb]).fit(1)
        assert "Recording.after_loss (epoch 0, training batch 0)" in "\n".join(
            info.value.__notes__
        )

    def test_dict_batches(self):
        """Dict batches get an error pointing at collate_dict."""
        dl = DataLoader([{"x": torch.zeros(4), "y": 0}] * 4, batch_size=2)
        learn = Learner(nn.Linear(4, 3), DataLoaders(dl, None), default_cbs=False)
        with pytest.raises(TypeError, match="collate_dict"):
            learn.fit(1)

    @pytest.mark.parametrize(
        "kwargs,match",
        [({"n_epochs": -1}, "n_epochs"), ({"lr": 0}, "lr must be a finite number > 0")],
    )
    def test_bad_fit_arguments(self, kwargs, match):
        """fit rejects a negative epoch count and a non-positive learning rate."""
        with pytest.raises(ValueError, match=match):
            tiny_learner([]).fit(**kwargs)


class TestLearningRates:
    """nan and infinite learning rates are refused everywhere a rate comes in, before any step."""

    @pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
    @pytest.mark.parametrize(
        "where",
        ["Learner lr", "fit lr", "fit_one_cycle lr_max", "lr_find end_lr"],
    )
    def test_non_finite_refused(self, where, bad):
        """Each entry point raises a ValueError naming the argument, and the weights stay finite."""
        make = {
            "Learner lr": lambda: Learner(nn.Linear(4, 3), make_dls(), lr=bad),
            "fit lr": lambda: tiny_learner([]).fit(1, lr=bad),
            "fit_one_cycle lr_max": lambda: tiny_learner([]).fit_one_cycle(
                1, lr_max=[bad]
            ),
            "lr_find end_lr": lambda: tiny_learner([]).lr_find(end_lr=bad),
        }[where]
        with pytest.raises(ValueError, match=f"{where} must be a finite number > 0"):
            make()

    def test_non_finite_refused_before_the_fit(self):
        """A nan lr passed to fit leaves the weights and the optimizer untouched."""
        learn = tiny_learner([])
        before = copy.deepcopy(learn.model.state_dict())
        with pytest.raises(ValueError, match="nan"):
            learn.fit(1, lr=math.nan)
        assert all(
            torch.equal(before[k], v) for k, v in learn.model.state_dict().items()
        )
        assert learn.opt is None

    def test_non_number_refused(self):
        """A string lr is a TypeError naming the type."""
        with pytest.raises(TypeError, match="Learner lr must be a number, got str"):
            Learner(nn.Linear(4, 3), make_dls(), lr="1e-3")


class TestInference:
    def test_get_preds_no_graph_cpu(self):
        """get_preds returns CPU tensors in dataset order, with no autograd graph and without training."""
        learn = tiny_learner([])
        before = copy.deepcopy(learn.model.state_dict())
        preds, targets = learn.get_preds()
        x, y = make_data(8, seed=1).tensors
        assert (
            not preds.requires_grad
            and preds.grad_fn is None
            and preds.device.type == "cpu"
        )
        torch.testing.assert_close(preds, learn.model(x).detach())
        assert torch.equal(targets, y)
        assert all(
            torch.equal(before[k], v) for k, v in learn.model.state_dict().items()
        )

    def test_get_preds_memory(self):
        """get_preds keeps no per-batch graphs: peak memory does not grow with the number of batches."""
        model = nn.Sequential(nn.Linear(4, 2048), nn.ReLU(), nn.Linear(2048, 3))
        learn = Learner(model, make_dls(), default_cbs=False)
        kept = []

        class Keep(Callback):
            order = 200

            def after_pred(self, learn, preds, **kwargs):
                kept.append(preds.grad_fn)

        dl = DataLoader(make_data(4000), batch_size=100)
        learn.get_preds(dl, cbs=[Keep()])
        assert len(kept) == 40 and all(g is None for g in kept)

    def test_hook_may_swap_loader(self):
        """A before_validate hook may replace learn.dl (as DistributedCB does); the loop reads the new one."""
        small = DataLoader(make_data(4, seed=1), batch_size=2)

        class Swap(Callback):
            def before_validate(self, learn, *args, **kwargs):
                learn.dl = small

        preds, _ = tiny_learner([]).get_preds(cbs=[Swap()])
        assert preds.shape[0] == 4

    def test_validate(self):
        """validate returns the loss and metrics on dls.valid and leaves the weights alone."""
        from learnloop import Accuracy, MetricsCB

        learn = Learner(nn.Linear(4, 3), make_dls(), cbs=[MetricsCB(Accuracy())])
        before = copy.deepcopy(learn.model.state_dict())
        result = learn.validate()
        x, y = make_data(48, seed=1).tensors
        out = learn.model(x)
        assert result["valid_loss"] == pytest.approx(
            F.cross_entropy(out, y).item(), rel=1e-5
        )
        assert result["accuracy"] == pytest.approx(
            (out.argmax(1) == y).float().mean().item()
        )
        assert all(
            torch.equal(before[k], v) for k, v in learn.model.state_dict().items()
        )

    @pytest.mark.parametrize("method", ["validate", "get_preds"])
    @pytest.mark.parametrize("exc", [RuntimeError("boom"), KeyboardInterrupt()])
    def test_error_leaves_no_autocast_or_bar(self, method, exc, tqdm_bars):
        """An error inside validate()/get_preds() still ends autocast and closes the bar."""
        bar = ProgressCB(file=io.StringIO(), bar=True)
        learn = Learner(nn.Linear(4, 3), make_dls(), cbs=[MixedPrecisionCB(), bar])
        with pytest.raises(type(exc)):
            getattr(learn, method)(cbs=[boom("after_loss", exc)])
        assert not torch.is_autocast_enabled("cpu")
        assert [(b.first_desc, b.closed) for b in tqdm_bars] == [("valid", True)]
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32

    def test_cancel_fit_ends_validate_cleanly(self, tqdm_bars):
        """A CancelFitException raised during validate() (say, a nan check) ends it without escaping."""
        bar = ProgressCB(file=io.StringIO(), bar=True)
        learn = Learner(nn.Linear(4, 3), make_dls(), cbs=[bar])
        stop = boom("after_loss", CancelFitException())
        # As TerminateOnNaNCB, after MetricsCB has the loss (before it, no batch would count).
        stop.order = 15
        result = learn.validate(cbs=[stop])
        assert "valid_loss" in result
        assert [(b.first_desc, b.closed) for b in tqdm_bars] == [("valid", True)]

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


def test_oracle_matches_hand_written_loop():
    """fit gives the same weights as a hand-written loop with the same seed and data order."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    hand = copy.deepcopy(model)
    dls = make_dls(shuffle=True)
    torch.manual_seed(1)
    Learner(model, dls, lr=0.1).fit(2)

    torch.manual_seed(1)
    opt = torch.optim.SGD(hand.parameters(), lr=0.1)
    for _ in range(2):
        hand.train()
        for x, y in dls.train:
            loss = F.cross_entropy(hand(x), y)
            loss.backward()
            opt.step()
            opt.zero_grad()
        hand.eval()
        with torch.no_grad():
            for x, y in dls.valid:
                hand(x)
    for a, b in zip(model.parameters(), hand.parameters()):
        assert torch.equal(a, b)


def test_show_training_loop(capsys):
    """show_training_loop lists, per event, the callbacks that run on it, in order."""
    lines = training_loop(Learner(nn.Linear(4, 3), make_dls()), capsys)
    assert lines["before_batch"] == "DeviceCB"
    assert lines["after_loss"] == "MetricsCB, Recorder"
    assert lines["after_epoch"] == "MetricsCB, Recorder, ProgressCB"
    assert lines["after_cancel_step"] == "-"


class TestSignatures:
    @pytest.mark.parametrize(
        ("method", "target", "shared"),
        [
            ("lr_find", "LRFinderCB", ("start_lr", "end_lr", "num_it", "stop_div")),
            ("fit_one_cycle", "OneCycle", ("pct_start", "div", "div_final", "moms")),
        ],
    )
    def test_wrappers_spell_out_the_same_defaults(self, method, target, shared):
        """Learner.lr_find and fit_one_cycle show their parameters, with the defaults of what they build."""
        import inspect

        import learnloop

        mine = inspect.signature(getattr(Learner, method)).parameters
        theirs = inspect.signature(getattr(learnloop, target)).parameters
        assert not any(p.kind is p.VAR_KEYWORD for p in mine.values())
        for name in shared:
            assert mine[name].default == theirs[name].default, name


class TestUnsizedLoader:
    def test_iterable_dataset_without_len_trains(self):
        """A DataLoader over an IterableDataset with no __len__ (a streaming dataset) trains: len(dl)
        raises TypeError there, so the loop counts its batches as unknown."""

        class Stream(IterableDataset):
            def __iter__(self):
                g = torch.Generator().manual_seed(0)
                for _ in range(64):
                    x = torch.randn(4, generator=g)
                    yield x, int(x.sum() > 0)

        dl = DataLoader(Stream(), batch_size=16)
        with pytest.raises(TypeError):
            len(dl)
        learn = Learner(nn.Linear(4, 2), DataLoaders(dl, dl), lr=0.5)
        learn.fit(2)
        rows = learn.recorder
        assert len(rows.losses) == 8  # 4 batches an epoch, counted as they came
        assert rows.losses[-1] < rows.losses[0]
