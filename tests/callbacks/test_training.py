"""Tests for learnloop.callbacks.training: MixedPrecisionCB, GradAccumCB, GradClipCB, and how they compose."""

from __future__ import annotations

import copy
import logging
import math

import pytest
import torch
from helpers import count_host_reads, make_data, make_dls
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from learnloop import (
    Callback,
    CancelBatchException,
    DataLoaders,
    GradAccumCB,
    GradClipCB,
    Learner,
    MixedPrecisionCB,
)


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 3))


def fit_weights(
    model: nn.Module, bs: int, n: int = 64, cbs=(), lr: float = 0.1, epochs: int = 1
) -> list:
    """Train a copy of `model` with plain SGD and return its parameters."""
    model = copy.deepcopy(model)
    learn = Learner(
        model, make_dls(n=n, bs=bs), lr=lr, cbs=list(cbs), default_cbs=False
    )
    learn.fit(epochs, valid=False)
    return [p.detach().clone() for p in model.parameters()]


class IterableOnly:
    """Wraps a loader so that it has no len()."""

    def __init__(self, dl) -> None:
        self.dl = dl

    def __iter__(self):
        return iter(self.dl)


class CountSteps(Callback):
    """Counts optimizer steps through a post-step hook."""

    def __init__(self) -> None:
        self.steps = 0

    def before_fit(self, learn, *args, **kwargs):
        learn.opt.register_step_post_hook(
            lambda *a: setattr(self, "steps", self.steps + 1)
        )


class TestMixedPrecisionCB:
    def test_bf16_autocast_is_used_on_cpu(self):
        """A Linear inside the model computes in bfloat16; preds and loss come back as float32."""
        seen, pred_dtypes = [], []
        model = mlp()
        model[0].register_forward_hook(lambda m, i, o: seen.append(o.dtype))

        class Spy(Callback):
            order = 40

            def after_loss(self, learn, loss, **kwargs):
                pred_dtypes.append((learn.preds.dtype, loss.dtype))

        learn = Learner(model, make_dls(), cbs=[MixedPrecisionCB(), Spy()])
        learn.fit(1)
        assert seen and set(seen) == {torch.bfloat16}
        assert set(pred_dtypes) == {(torch.float32, torch.float32)}
        assert not torch.is_autocast_enabled("cpu")

    def test_autocast_ends_when_the_batch_is_cancelled(self):
        """A batch cancelled between forward and loss still leaves autocast off."""
        states = []

        class CancelAfterPred(Callback):
            order = 0

            def after_pred(self, learn, *args, **kwargs):
                raise CancelBatchException()

        class Check(Callback):
            order = 50

            def after_batch(self, learn, *args, **kwargs):
                states.append(torch.is_autocast_enabled("cpu"))

        Learner(
            mlp(), make_dls(), cbs=[MixedPrecisionCB(), CancelAfterPred(), Check()]
        ).fit(1)
        assert states and not any(states)

    def test_autocast_ends_on_error(self):
        """An error inside the forward pass leaves autocast off after the fit."""

        class Bad(nn.Module):
            def forward(self, x):
                raise ValueError("bad forward")

        learn = Learner(
            nn.Sequential(nn.Linear(4, 3), Bad()), make_dls(), cbs=[MixedPrecisionCB()]
        )
        with pytest.raises(ValueError, match="bad forward"):
            learn.fit(1)
        assert not torch.is_autocast_enabled("cpu")

    def test_validate_and_get_preds_use_autocast(self):
        """validate()/get_preds() outside a fit run under autocast and return float32 predictions."""
        seen = []
        model = mlp()
        model[0].register_forward_hook(lambda m, i, o: seen.append(o.dtype))
        learn = Learner(model, make_dls(), cbs=[MixedPrecisionCB()], default_cbs=False)
        preds, _ = learn.get_preds()
        assert set(seen) == {torch.bfloat16} and preds.dtype == torch.float32

    def test_fp16_scaler_skips_and_counts_an_inf_step(self, caplog):
        """An inf gradient makes the GradScaler skip the step: weights kept, counted, logged, scale halved."""
        snapshots = {}

        class InjectInf(Callback):
            order = 28  # after backward, before MixedPrecisionCB unscales (30)

            def after_backward(self, learn, *args, **kwargs):
                if (learn.epoch, learn.iter) == (0, 2):
                    snapshots["before"] = [
                        p.detach().clone() for p in learn.model.parameters()
                    ]
                    next(learn.model.parameters()).grad[0, 0] = float("inf")

            def after_batch(self, learn, *args, **kwargs):
                if (learn.epoch, learn.iter) == (0, 2):
                    snapshots["after"] = [
                        p.detach().clone() for p in learn.model.parameters()
                    ]

        mp = MixedPrecisionCB(torch.float16, init_scale=1024.0)
        learn = Learner(mlp(), make_dls(), cbs=[mp, InjectInf()])
        with caplog.at_level(logging.INFO, logger="learnloop.callbacks.training"):
            learn.fit(2)
        assert mp.skipped_steps == 1 and mp.skipped_per_epoch == [1, 0]
        assert all(
            torch.equal(a, b) for a, b in zip(snapshots["before"], snapshots["after"])
        )
        assert mp.scaler.get_scale() == 512.0
        assert "1 optimizer steps skipped in epoch 0" in caplog.text

    def test_fp16_trains_like_fp32(self):
        """fp16 with a GradScaler reaches nearly the same weights as float32 training."""
        model = mlp()
        ref = fit_weights(model, bs=16)
        mixed = fit_weights(model, bs=16, cbs=[MixedPrecisionCB(torch.float16)])
        for a, b in zip(ref, mixed):
            torch.testing.assert_close(a, b, atol=1e-2, rtol=1e-2)

    def test_state_dict_roundtrip(self):
        """The scaler state comes back through state_dict/load_state_dict."""
        a = MixedPrecisionCB("fp16", init_scale=8.0)
        Learner(mlp(), make_dls(), cbs=[a]).fit(1)
        b = MixedPrecisionCB("fp16")
        Learner(mlp(), make_dls(), cbs=[b]).fit(1)
        b.load_state_dict(a.state_dict())
        assert b.scaler.get_scale() == a.scaler.get_scale() == 8.0

    def test_resume_restores_the_loss_scale(self, tmp_path):
        """A checkpoint carries the GradScaler's scale into a resumed fit."""
        first = Learner(
            mlp(), make_dls(), cbs=[MixedPrecisionCB("fp16", init_scale=64.0)]
        )
        first.fit(1)
        first.save(tmp_path / "ck.pt")
        mp = MixedPrecisionCB("fp16")  # default init_scale 2**16
        scales = []

        class Spy(Callback):
            def before_train(self, learn, *args, **kwargs):
                scales.append(mp.scaler.get_scale())

        Learner(mlp(), make_dls(), cbs=[mp, Spy()]).fit(2, resume=tmp_path / "ck.pt")
        assert scales == [64.0]

    @pytest.mark.parametrize("dtype", ["fp8", torch.float32])
    def test_bad_dtype(self, dtype):
        """Only float16 and bfloat16 are accepted, and the message lists them."""
        with pytest.raises(ValueError, match="bfloat16"):
            MixedPrecisionCB(dtype)


class TestGradAccumCB:
    def test_matches_one_big_batch(self):
        """4 batches of 4 with n_acc=4 give the weights of batches of 16 (SGD)."""
        model = mlp()
        big = fit_weights(model, bs=16)
        acc = fit_weights(model, bs=4, cbs=[GradAccumCB(4)])
        for a, b in zip(big, acc):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)

    def test_short_last_group_matches_short_last_batch(self):
        """The epoch's last, short group steps as one batch of its own size (40 rows: 16 + 16 + 8)."""
        model = mlp()
        big = fit_weights(model, bs=16, n=40, epochs=2)
        acc = fit_weights(model, bs=4, n=40, cbs=[GradAccumCB(4)], epochs=2)
        for a, b in zip(big, acc):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)

    def test_steps_every_n_acc_batches(self):
        """6 batches with n_acc=4 take 2 steps per epoch (one after batch 4, one at the epoch's end)."""
        counter = CountSteps()
        Learner(mlp(), make_dls(), cbs=[GradAccumCB(4), counter]).fit(2)
        assert counter.steps == 4

    def test_batch_loss_is_not_divided_outside_backward(self):
        """after_loss and after_batch see the batch's own loss, not loss / n_acc."""
        pairs = []

        class Spy(Callback):
            order = 50

            def after_loss(self, learn, loss, **kwargs):
                self.loss = loss

            def after_batch(self, learn, loss, **kwargs):
                if learn.training:
                    pairs.append((self.loss, loss))

        Learner(mlp(), make_dls(), cbs=[GradAccumCB(3), Spy()]).fit(1)
        assert len(pairs) == 6 and all(a is b for a, b in pairs)

    def test_unsized_loader_drops_leftover_gradients(self):
        """With a loader of unknown length, an unfinished group's gradients are dropped at the epoch's end."""
        counter = CountSteps()
        learn = Learner(
            mlp(), make_dls(), cbs=[GradAccumCB(4), counter], default_cbs=False
        )
        learn.dls.train = IterableOnly(learn.dls.train)
        learn.fit(1, valid=False)
        assert counter.steps == 1  # 6 batches: one full group, 2 batches left over
        assert all(p.grad is None for p in learn.model.parameters())

    @pytest.mark.parametrize("n_acc", [0, 2.5])
    def test_bad_n_acc(self, n_acc):
        """n_acc must be a positive int."""
        with pytest.raises(ValueError, match="n_acc must be an int >= 1"):
            GradAccumCB(n_acc)


class TestGradClipCB:
    def test_clipping_bound_and_recorded_norms(self):
        """Gradients reaching the step have norm <= max_norm; .norms holds the norms before clipping."""
        before, after = [], []

        def total_norm(model):
            return torch.linalg.vector_norm(
                torch.stack([p.grad.norm() for p in model.parameters()])
            ).item()

        class Measure(Callback):
            def __init__(self, order, out):
                self.order, self.out = order, out

            def after_backward(self, learn, *args, **kwargs):
                self.out.append(total_norm(learn.model))

        clip = GradClipCB(0.05)
        Learner(
            mlp(),
            make_dls(),
            lr=0.5,
            cbs=[clip, Measure(34, before), Measure(36, after)],
        ).fit(1)
        assert clip.norms == pytest.approx(before, rel=1e-5)
        assert max(before) > 0.05
        assert all(n <= 0.05 * (1 + 1e-4) for n in after)

    def test_long_run_norms_as_per_step(self):
        """Over several chunks and epochs, .norms equals the per-step norms, as a list of floats."""
        before = []

        class Measure(Callback):
            order = GradClipCB.order - 1

            def after_backward(self, learn, *args, **kwargs):
                norm = torch.linalg.vector_norm(
                    torch.stack([p.grad.norm() for p in learn.model.parameters()])
                )
                before.append(norm.float().item())

        x, y = make_data(8).tensors
        clip = GradClipCB(0.5)
        dls = DataLoaders([(x, y)] * 700, None)
        Learner(nn.Linear(4, 3), dls, cbs=[clip, Measure()]).fit(2)
        norms = clip.norms
        assert type(norms) is list and all(type(n) is float for n in norms)
        assert norms == pytest.approx(before, rel=1e-6)

    def test_norms_are_kept_as_tensors(self, monkeypatch):
        """No float conversion per batch: the norms stay tensors until read."""
        reads = count_host_reads(monkeypatch)
        Learner(mlp(), make_dls(), default_cbs=False).fit(1)
        without_clip = len(reads)
        reads.clear()
        clip = GradClipCB(1.0)
        Learner(mlp(), make_dls(), cbs=[clip], default_cbs=False).fit(1)
        # 6 batches: a per-batch float(norm) or norm.item() would add 6 reads.
        assert len(reads) == without_clip
        norms = clip.norms
        assert len(norms) == 6 and all(isinstance(n, float) for n in norms)

    @pytest.mark.parametrize("norm_type", [1.0, 2.0, math.inf])
    def test_norm_type_honoured(self, norm_type):
        """.norms reports the norm_type norm of the gradients, and clipping scales them to max_norm in it."""
        gen = torch.Generator().manual_seed(0)
        x, y = torch.randn(8, 3, generator=gen), torch.tensor([0, 1] * 4)
        model = nn.Linear(3, 2)
        # The gradients by hand, on a copy, for the one step of the fit.
        hand = copy.deepcopy(model)
        nn.functional.cross_entropy(hand(x), y).backward()
        grads = [p.grad for p in hand.parameters()]
        norm = torch.linalg.vector_norm(
            torch.cat([g.flatten() for g in grads]), norm_type
        )
        max_norm, lr = 0.01, 0.1
        assert norm > max_norm  # clipping bites
        clip = GradClipCB(max_norm, norm_type=norm_type)
        dls = DataLoaders(DataLoader(TensorDataset(x, y), batch_size=8), None)
        Learner(model, dls, lr=lr, cbs=[clip], default_cbs=False).fit(1)
        assert clip.norms == pytest.approx([norm.item()], rel=1e-5)
        for p, before, grad in zip(model.parameters(), hand.parameters(), grads):
            expected = before - lr * grad * (max_norm / norm)
            torch.testing.assert_close(p, expected, rtol=1e-4, atol=1e-7)

    def test_bad_max_norm(self):
        """max_norm must be positive."""
        with pytest.raises(ValueError, match="max_norm must be positive"):
            GradClipCB(0)


class TestComposition:
    def test_fp16_unscales_before_clip(self):
        """With a GradScaler (scale 2**16), the clipped norms are the true ones, as in float32."""
        ref_clip, mp_clip = GradClipCB(1e3), GradClipCB(1e3)
        model = mlp()
        fit_weights(model, bs=16, cbs=[ref_clip])
        fit_weights(model, bs=16, cbs=[mp_clip, MixedPrecisionCB(torch.float16)])
        assert mp_clip.norms == pytest.approx(ref_clip.norms, rel=2e-2)

    def test_fp16_accumulation_and_clipping(self):
        """fp16 + accumulation + clipping: one unscale and one clip per step, weights close to float32."""
        model = mlp()
        ref_clip, mp_clip = GradClipCB(0.5), GradClipCB(0.5)
        ref = fit_weights(model, bs=4, cbs=[GradAccumCB(4), ref_clip])
        mixed = fit_weights(
            model, bs=4, cbs=[GradAccumCB(4), MixedPrecisionCB(torch.float16), mp_clip]
        )
        assert len(mp_clip.norms) == len(ref_clip.norms) == 4
        assert mp_clip.norms == pytest.approx(ref_clip.norms, rel=2e-2)
        for a, b in zip(ref, mixed):
            torch.testing.assert_close(a, b, atol=1e-2, rtol=1e-2)
