"""Habits from miniai and fastai: the ones learnloop supports work, the others fail loudly at once."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from helpers import make_data, make_dls
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from learnloop import (
    Accuracy,
    Callback,
    DataLoaders,
    Learner,
    MetricsCB,
    ProgressCB,
    Recorder,
    not_an_event,
)
from learnloop.learner import DEFAULT_LR


def hooked(name: str, **extra):
    """An instance of a Callback subclass with a method `name` (and `extra` attributes)."""
    return type("Ported", (Callback,), {name: lambda self, *a, **k: None, **extra})()


def learner(*cbs, **kwargs) -> Learner:
    torch.manual_seed(0)
    return Learner(nn.Linear(4, 3), make_dls(), cbs=list(cbs), **kwargs)


class TestRefusedAtRegistration:
    @pytest.mark.parametrize(
        "name", ["predict", "get_loss", "backward", "step", "zero_grad"]
    )
    def test_traincb_methods(self, name):
        """miniai's TrainCB methods on a callback say to subclass Learner, naming class and method."""
        with pytest.raises(ValueError, match=f"Ported.{name}: .*Subclass Learner") as e:
            learner(hooked(name))
        assert f"override {name}(self)" in str(e.value)

    @pytest.mark.parametrize("level", ["fit", "epoch", "batch"])
    def test_cleanup_hooks(self, level):
        """miniai's cleanup_* hooks are refused with the after_* event that replaces them."""
        with pytest.raises(
            ValueError, match=f"Ported.cleanup_{level}: .*use after_{level} instead"
        ) as e:
            learner(hooked(f"cleanup_{level}"))
        assert "runs after" in str(e.value) and "cancels" in str(e.value)

    @pytest.mark.parametrize(
        "name,nearest",
        [
            ("before_loss", "after_loss"),
            ("after_zero_grad", "after_step"),
            ("after_create", "before_fit"),
            ("on_epoch_finished", "epoch"),
        ],
    )
    def test_event_like_names(self, name, nearest):
        """A public before_/after_/on_ method that is no event is refused with the nearest events."""
        with pytest.raises(ValueError, match=f"Ported.{name} looks like an event") as e:
            learner(hooked(name))
        message = str(e.value)
        assert (
            "would never be called" in message and "@learnloop.not_an_event" in message
        )
        listed = message.split(": ")[
            1
        ]  # "did you mean X?" or "the nearest events are ..."
        assert nearest in listed

    def test_opt_out(self):
        """@not_an_event lets a helper keep an event-like name; the loop never calls it."""
        calls = []

        class Report(Callback):
            @not_an_event
            def after_fit_report(self):
                calls.append(1)

            def after_fit(self, learn, *args, **kwargs):
                calls.append("after_fit")

        learn = learner(Report())
        learn.fit(1)
        assert calls == ["after_fit"]
        # the opt-out marks this method only: another event-like name is still refused
        with pytest.raises(ValueError, match="after_fit_summary"):
            learner(type("Report2", (Report,), {"after_fit_summary": lambda s: None})())

    def test_opt_out_for_step_pieces_and_static_helpers(self):
        """A helper named like a step piece opts out too (the message says how), under @staticmethod too."""
        with pytest.raises(ValueError, match="@learnloop.not_an_event"):
            learner(hooked("step"))

        class Counter(Callback):
            @not_an_event
            def step(self):
                return 1

            @not_an_event
            @staticmethod
            def after_all(x):
                return x

        assert isinstance(learner(Counter()).cbs[0], Callback)

    def test_torch_base_class_names_allowed(self):
        """A callback that is also an nn.Module keeps nn.Module's zero_grad: that name is torch's."""

        class EMA(Callback, nn.Module):
            def __init__(self):
                nn.Module.__init__(self)
                self.avg = nn.Linear(4, 3)

            def after_step(self, learn, *args, **kwargs):
                pass

        cb = EMA()
        assert cb in learner(cb).cbs
        # its own methods are still checked
        bad = type("EMA2", (EMA,), {"cleanup_fit": lambda self, learn: None})
        with pytest.raises(ValueError, match="EMA2.cleanup_fit"):
            learner(bad())

    def test_private_helpers_allowed(self):
        """A private helper (leading underscore) may look like anything."""
        cb = hooked("_after_something")
        assert cb in learner(cb).cbs


class TestCourseLearners:
    def test_train_learner_and_momentum(self):
        """The course's TrainLearner/MomentumLearner (step pieces overridden) train and predict."""

        class TrainLearner(Learner):
            def predict(self):
                self.preds = self.model(self.batch[0])

            def get_loss(self):
                self.loss = self.loss_func(self.preds, self.batch[1])

        class MomentumLearner(TrainLearner):
            def __init__(self, *args, mom=0.85, **kwargs):
                self.mom = mom
                super().__init__(*args, **kwargs)

            def zero_grad(self):
                with torch.no_grad():
                    for p in self.model.parameters():
                        p.grad *= self.mom

        torch.manual_seed(0)
        learn = MomentumLearner(nn.Linear(4, 3), make_dls(), lr=0.1, cbs=MetricsCB())
        learn.fit(2)
        assert (
            learn.metrics.history[-1]["valid_loss"]
            < learn.metrics.history[0]["train_loss"]
        )
        x = make_data(5, seed=3).tensors[0]
        out = learn.predict(x)  # through the override, on a batch
        assert torch.allclose(out, learn.model(x).detach())

    def test_learn_metrics(self):
        """learn.metrics is the attached MetricsCB, as miniai's MetricsCB sets it."""
        metrics = MetricsCB(Accuracy())
        learn = learner(metrics)
        learn.fit(1)
        assert learn.metrics is metrics and "accuracy" in learn.metrics.history[0]
        with pytest.raises(AttributeError, match="No MetricsCB is attached"):
            _ = Learner(nn.Linear(4, 3), make_dls(), default_cbs=False).metrics


class Scale(Callback):
    """fastai's idiom: set learn.xb in before_batch."""

    def __init__(self, factor, order=0):
        self.factor, self.order, self.seen = factor, order, []

    def before_batch(self, learn, iter, **kwargs):
        self.seen.append((iter, learn.xb.clone()))
        learn.xb = learn.xb * self.factor


class Spy(Callback):
    order = 1

    def __init__(self):
        self.inputs = []

    def after_pred(self, learn, *args, **kwargs):
        self.inputs.append(learn.xb.clone())


class TestBatchInBeforeBatch:
    def test_xb_set_reaches_the_model(self):
        """learn.xb set in before_batch is what the model gets; during the hook it is this batch's."""
        scale, spy = Scale(0.0), Spy()
        learn = Learner(
            nn.Linear(4, 3), make_dls(n=32, bs=16), cbs=[scale, spy], default_cbs=False
        )
        learn.fit(1, valid=False)
        batches = [x for x, _ in learn.dls.train]
        assert [i for i, _ in scale.seen] == [0, 1]
        for (_, seen), x in zip(scale.seen, batches):
            assert torch.equal(seen, x)  # not the previous batch
        assert all(torch.equal(x, torch.zeros_like(x)) for x in spy.inputs)

    def test_xb_set_before_device_cb_survives_it(self):
        """A hook ordered before DeviceCB sets xb; DeviceCB moves the rebuilt batch, keeping it."""
        scale, spy = Scale(2.0, order=-25), Spy()
        learn = Learner(nn.Linear(4, 3), make_dls(n=16, bs=16), cbs=[scale, spy])
        learn.fit(1, valid=False)
        x = next(iter(learn.dls.train))[0]
        assert torch.equal(spy.inputs[0], 2 * x)

    def test_batch_replaced(self):
        """Replacing learn.batch (miniai's idiom) splits the new batch into xb and yb."""

        class Swap(Callback):
            def before_batch(self, learn, *args, **kwargs):
                x, y = learn.batch
                learn.batch = (x + 1, torch.zeros_like(y))

        spy = Spy()
        learn = Learner(
            nn.Linear(4, 3), make_dls(n=16, bs=16), cbs=[Swap(), spy], default_cbs=False
        )
        learn.fit(1, valid=False)
        x = next(iter(learn.dls.train))[0]
        assert torch.equal(spy.inputs[0], x + 1)

    def test_yb_set_reaches_the_loss(self):
        """learn.yb set in before_batch is what the loss sees (the row's loss changes with it)."""

        class Relabel(Callback):
            def before_batch(self, learn, *args, **kwargs):
                learn.yb = torch.zeros_like(learn.yb)

        torch.manual_seed(0)
        model = nn.Linear(4, 3)
        learn = Learner(model, make_dls(n=16, bs=16), cbs=[Relabel()])
        log = learn.validate()
        x, _ = next(iter(learn.dls.valid))
        expected = F.cross_entropy(model(x), torch.zeros(len(x), dtype=torch.long))
        assert log["valid_loss"] == pytest.approx(expected.item(), rel=1e-6)

    def test_batch_changed_in_place(self):
        """A hook that changes the (list) batch in place still reaches the model, as before 0.2."""

        class Zero(Callback):
            def before_batch(self, learn, *args, **kwargs):
                learn.batch[0] = learn.batch[0] * 0

        spy = Spy()
        learn = Learner(
            nn.Linear(4, 3), make_dls(n=16, bs=16), cbs=[Zero(), spy], default_cbs=False
        )
        learn.fit(1, valid=False)
        assert torch.equal(spy.inputs[0], torch.zeros(16, 4))

    @pytest.mark.parametrize(
        "value,n_inp,match",
        [
            (None, 1, "learn.xb was set to None"),
            ("one", 2, r"tuple of the model's 2 inputs \(n_inp=2\)"),
            ("three", 2, r"tuple of the model's 2 inputs"),
        ],
    )
    def test_xb_set_wrong(self, value, n_inp, match):
        """xb set (before DeviceCB) to what cannot be n_inp inputs is an error naming n_inp and the hook."""
        x, y = make_data(16).tensors
        items = (x, torch.randn(16, 2), y)[:n_inp] + (y,)

        class SetXb(Callback):
            order = -25  # before DeviceCB, which rebuilds the batch

            def before_batch(self, learn, *args, **kwargs):
                learn.xb = {"one": x, "three": (x, x, x)}.get(value)

        dl = DataLoader(TensorDataset(*items), batch_size=8)
        learn = Learner(nn.Linear(4, 3), DataLoaders(dl, dl), n_inp=n_inp, cbs=SetXb())
        with pytest.raises(TypeError, match=match) as e:
            learn.fit(1)
        assert any("DeviceCB.before_batch" in n for n in e.value.__notes__)

    def test_dict_batch_converted_in_before_batch(self):
        """An unsplittable batch may still be turned into a tuple by a before_batch hook."""
        ds = make_data(16)
        dl = DataLoader(
            [{"x": x, "y": y} for x, y in ds], batch_size=8
        )  # batches are dicts

        class FromDict(Callback):
            def before_batch(self, learn, *args, **kwargs):
                learn.batch = (learn.batch["x"], learn.batch["y"])

        learn = Learner(nn.Linear(4, 3), DataLoaders(dl, dl), cbs=[FromDict()])
        learn.fit(1)
        with pytest.raises(TypeError, match="got a dict with keys \\['x', 'y'\\]"):
            Learner(nn.Linear(4, 3), DataLoaders(dl, dl)).fit(1)


class TestArguments:
    def test_single_callback_everywhere(self):
        """cbs= takes one callback as well as a list: Learner, fit, validate, get_preds, lr_find."""
        seen = []

        class Count(Callback):
            def after_batch(self, learn, *args, **kwargs):
                seen.append(learn.training)

        learn = Learner(nn.Linear(4, 3), make_dls(), cbs=Count())
        assert any(isinstance(cb, Count) for cb in learn.cbs)
        n = len(seen)
        learn.fit(1, cbs=Count())
        assert len(seen) - n == 2 * 8  # two callbacks counting 6 + 2 batches
        for call in (learn.validate, learn.get_preds):
            n = len(seen)
            call(cbs=Count())
            assert len(seen) - n == 2 * 2
        learn.fit_one_cycle(1, cbs=Count())
        learn.lr_find(num_it=5, cbs=Count())
        with pytest.raises(TypeError, match="pass Count\\(\\) instead"):
            learn.fit(1, cbs=Count)

    def test_lr_none_is_default(self):
        """Learner(lr=None) takes the default learning rate."""
        learn = Learner(nn.Linear(4, 3), make_dls(), lr=None)
        learn.fit(1)
        assert learn.lr == DEFAULT_LR
        assert learn.opt.param_groups[0]["lr"] == DEFAULT_LR


def unlabelled(n=20, bs=8):
    return DataLoader(TensorDataset(make_data(n, seed=5).tensors[0]), batch_size=bs)


class TestInference:
    def test_get_preds_without_targets(self):
        """get_preds on batches of inputs only returns the predictions and None for targets."""
        learn = learner()
        learn.fit(1)
        preds, targets = learn.get_preds(unlabelled())
        x = make_data(20, seed=5).tensors[0]
        assert targets is None
        assert torch.allclose(preds, learn.model(x).detach())
        # a loader over a bare tensor, too
        preds2, targets2 = learn.get_preds(DataLoader(x, batch_size=8))
        assert targets2 is None and torch.equal(preds, preds2)

    def test_validate_without_targets_says_so(self):
        """validate() on batches without targets warns that loss and metrics are absent."""
        learn = learner(MetricsCB(Accuracy()))
        with pytest.warns(UserWarning, match="3 validation batches had no targets"):
            log = learn.validate(unlabelled())
        assert "valid_loss" not in log and "accuracy" not in log

    def test_training_without_targets_fails_clearly(self):
        """A training batch without targets is an error naming n_inp and the fix."""
        dls = DataLoaders(unlabelled(), unlabelled())
        learn = Learner(nn.Linear(4, 3), dls)
        with pytest.raises(ValueError, match="no targets .*n_inp=1.*override get_loss"):
            learn.fit(1)

    def test_several_inputs(self):
        """n_inp=2: the first two batch items go to the model, the rest to the loss."""

        class Two(nn.Module):
            def __init__(self):
                super().__init__()
                self.a, self.b = nn.Linear(4, 3), nn.Linear(2, 3)

            def forward(self, x, z):
                return self.a(x) + self.b(z)

        x, y = make_data(32).tensors
        z = torch.randn(32, 2)
        dl = DataLoader(TensorDataset(x, z, y), batch_size=8)
        torch.manual_seed(0)
        learn = Learner(Two(), DataLoaders(dl, dl), n_inp=2, cbs=MetricsCB(Accuracy()))
        learn.fit(1)
        preds, targets = learn.get_preds()
        assert torch.equal(targets, y)
        assert torch.allclose(preds, learn.model(x, z).detach())
        one = learn.predict((x[0], z[0]))  # one item of two inputs
        assert one.shape == (3,) and torch.allclose(one, preds[0], atol=1e-6)
        with pytest.raises(ValueError, match="n_inp"):
            Learner(Two(), DataLoaders(dl, dl), n_inp=0)

    def test_predict(self):
        """predict(x): one item or a batch, output on the CPU without a graph, mode restored."""
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.5), nn.Linear(8, 3))
        learn = Learner(model, make_dls(), cbs=ProgressCB(file=None, bar=False))
        learn.fit(1)
        x = make_data(5, seed=7).tensors[0]
        model.train()
        batch = learn.predict(x)
        assert model.training  # restored
        assert batch.shape == (5, 3) and batch.device.type == "cpu"
        assert not batch.requires_grad and batch.grad_fn is None
        model.eval()
        expected = model(x).detach()
        assert torch.allclose(batch, expected)  # eval mode: dropout off
        one = learn.predict(x[0])
        assert one.shape == (3,) and torch.allclose(one, expected[0])
        assert torch.allclose(learn.predict(x[0].numpy()), expected[0])

    def test_predict_inside_a_fit_leaves_loop_state(self):
        """predict(x) from a hook (mid-batch) puts back batch, xb, yb and preds."""
        probe = make_data(2, seed=9).tensors[0]
        seen = []

        class Probe(Callback):
            def after_pred(self, learn, *args, **kwargs):
                before = (learn.batch, learn.xb, learn.yb, learn.preds)
                learn.predict(probe)
                after = (learn.batch, learn.xb, learn.yb, learn.preds)
                seen.append(all(a is b for a, b in zip(before, after)))

        learner(Probe()).fit(1)
        assert seen and all(seen)

    def test_predict_with_batch_transforms(self):
        """One item as the model takes it (after the loader's batch transforms) is recognised as one."""
        from learnloop.data import inplace, load_digits
        from learnloop.models import simple_cnn

        @inplace
        def add_channel(b):
            b["image"] = b["image"].float().unsqueeze(1)  # (N, 8, 8) -> (N, 1, 8, 8)

        dls = DataLoaders.from_dd(
            load_digits(), 64, batched=True, batch_tfms=[add_channel]
        )
        learn = Learner(simple_cnn(n_in=1), dls, cbs=ProgressCB(bar=False))
        xb, _ = next(iter(dls.valid))
        assert learn.predict(xb[0]).shape == (10,)
        assert learn.predict(xb[:3]).shape == (3, 10)

    def test_predict_inputs(self):
        """predict takes lists of numbers; anything else is a TypeError naming what it takes."""
        learn = learner()
        x = make_data(1, seed=2).tensors[0][0]
        assert torch.allclose(learn.predict(x.tolist()), learn.predict(x))
        with pytest.raises(TypeError, match="predict\\(x\\) takes a tensor"):
            learn.predict(object())
        with pytest.raises(
            TypeError, match="n_inp=2 takes a tuple of the model's 2 inputs"
        ):
            Learner(nn.Linear(4, 3), make_dls(), n_inp=2).predict(x)
        assert isinstance(learn.recorder, Recorder)


def test_no_warning_in_ordinary_runs():
    """An ordinary fit/validate/get_preds with targets warns about nothing."""
    learn = learner()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        learn.fit(1)
        learn.validate()
        learn.get_preds()


def test_add_and_remove_lists():
    """fastai's learn.add_cbs([...]) / remove_cbs([...]) take lists, as learnloop's take varargs."""
    a, b = hooked("after_batch"), hooked("before_fit")
    learn = learner()
    learn.add_cbs([a, b])
    assert a in learn.cbs and b in learn.cbs
    learn.remove_cbs([a, b])
    assert a not in learn.cbs and b not in learn.cbs
