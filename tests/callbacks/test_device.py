"""DeviceCB and to_device: the model once, every batch (nested) with non_blocking moves."""

from __future__ import annotations

from collections import namedtuple

import torch
from helpers import make_dls
from torch import nn

from learnloop import Callback, DeviceCB, Learner, default_device, to_device

Pair = namedtuple("Pair", "a b")


def test_to_device_nested():
    """Tensors inside tuples, lists, dicts and namedtuples move; other values pass through."""
    batch = {
        "x": (torch.ones(2), [torch.zeros(3), "label"]),
        "n": 3,
        "p": Pair(torch.ones(1), None),
    }
    moved = to_device(batch, "meta")
    assert (
        moved["x"][0].device.type == "meta" and moved["x"][1][0].device.type == "meta"
    )
    assert moved["x"][1][1] == "label" and moved["n"] == 3
    assert (
        isinstance(moved["p"], Pair)
        and moved["p"].a.device.type == "meta"
        and moved["p"].b is None
    )
    assert isinstance(moved["x"], tuple) and isinstance(moved["x"][1], list)


def test_to_device_non_blocking(monkeypatch):
    """Tensors are moved with non_blocking=True; tensors already on the device are not copied."""
    seen = []
    original = torch.Tensor.to

    def spy(self, *args, **kwargs):
        seen.append(kwargs.get("non_blocking"))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "to", spy)
    to_device([torch.ones(1), (torch.ones(1),)], "meta")
    assert seen == [True, True]
    seen.clear()
    on_cpu = torch.ones(1)
    assert to_device([on_cpu], "cpu")[0] is on_cpu and seen == []


def test_default_device_cpu_here():
    """Without cuda or mps the default is the CPU."""
    if not torch.cuda.is_available():
        assert default_device().type in ("cpu", "mps")


def test_device_cb_moves_model_and_batches():
    """The model moves once at fit start, and each batch reaches the model on the device."""
    seen = []

    class Spy(Callback):
        def after_pred(self, learn, *args, **kwargs):
            seen.append(
                (learn.xb.device.type, next(learn.model.parameters()).device.type)
            )

    learn = Learner(
        nn.Linear(4, 3), make_dls(), cbs=[DeviceCB("cpu"), Spy()], default_cbs=False
    )
    learn.fit(1)
    assert seen and all(s == ("cpu", "cpu") for s in seen)
    # No kernels to train on 'meta': call the hooks directly to see the moves.
    cb = DeviceCB("meta")
    learn = Learner(nn.Linear(4, 3), make_dls(), cbs=[cb], default_cbs=False)
    cb.before_fit(learn)
    assert next(learn.model.parameters()).device.type == "meta"
    learn.batch = (torch.ones(2, 4), [torch.ones(2)])
    cb.before_batch(learn)
    assert (
        learn.batch[0].device.type == "meta" and learn.batch[1][0].device.type == "meta"
    )


def test_optimizer_state_follows_params():
    """move_optimizer_state puts momenta on their parameter's device and leaves Adam's step count."""
    from learnloop.callbacks.device import move_optimizer_state

    # 'meta' stands in for a GPU: tensors move, nothing computes.
    model = nn.Linear(4, 3).to("meta")
    opt = torch.optim.Adam(model.parameters())
    for p in model.parameters():  # state as a checkpoint loaded on the CPU leaves it
        opt.state[p] = {"step": torch.tensor(3.0), "exp_avg": torch.zeros(p.shape)}
    move_optimizer_state(opt)
    for p, state in opt.state.items():
        assert (
            state["exp_avg"].device.type == "meta"
            and state["step"].device.type == "cpu"
        )


def test_device_cb_moves_optimizer_state(monkeypatch):
    """When DeviceCB moves the model, it moves the optimizer's state too (a resumed fit's, say)."""
    from learnloop.callbacks import device

    moved = []
    monkeypatch.setattr(device, "move_optimizer_state", moved.append)
    learn = Learner(nn.Linear(4, 3), make_dls(), default_cbs=False)
    learn.fit(1)
    DeviceCB("meta").before_fit(learn)
    assert moved == [learn.opt]


def test_device_cb_keeps_batch_already_there():
    """A batch already on the device is left as it is; one with a tensor elsewhere is moved whole."""
    cb = DeviceCB("cpu")
    learn = Learner(nn.Linear(4, 3), make_dls(), cbs=[cb], default_cbs=False)
    for batch in [(torch.ones(2, 4), torch.ones(2)), [torch.ones(2, 4), torch.ones(2)]]:
        learn.batch = batch
        cb.before_batch(learn)
        assert learn.batch is batch
    cb = DeviceCB("meta")
    learn.batch = batch = [torch.ones(2, 4, device="meta"), torch.ones(2)]
    cb.before_batch(learn)
    assert learn.batch is not batch and learn.yb.device.type == "meta"


def test_devices_are_compared_as_their_tensors_report_them():
    """A bare 'cuda' or 'mps' gets its index (tensors there report 'cuda:0'); cpu stays as it is."""
    from learnloop.callbacks.device import _with_index

    assert _with_index(torch.device("cpu")) == torch.zeros(1).device
    assert _with_index(torch.device("mps")) == torch.device("mps", 0)
    assert _with_index(torch.device("cuda", 1)) == torch.device("cuda", 1)
