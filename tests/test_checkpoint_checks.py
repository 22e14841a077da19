"""Saving checks the checkpoint first: numpy values are converted, unloadable values refused unwritten."""

from __future__ import annotations

import functools
from collections import defaultdict, deque
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import make_dls
from torch import nn

from learnloop import Callback, Learner
from learnloop.checkpoint import checkpoint_state


class Stash(Callback):
    """A callback whose state is `{"x": value}`; keeps what it is loaded with in `loaded`."""

    def __init__(self, value=None) -> None:
        self.value, self.loaded = value, None

    def state_dict(self):
        return {"x": self.value}

    def load_state_dict(self, state):
        self.loaded = state["x"]


class Opaque:
    """An object weights_only loading cannot rebuild."""


class Tagged(nn.Module):
    """A Linear whose get_extra_state() returns `extra`."""

    def __init__(self, extra) -> None:
        super().__init__()
        self.lin, self.extra = nn.Linear(4, 3), extra

    def forward(self, x):
        return self.lin(x)

    def get_extra_state(self):
        return self.extra

    def set_extra_state(self, state):
        self.extra = state


def learner(*cbs: Callback, model: nn.Module | None = None) -> Learner:
    return Learner(
        model or nn.Linear(4, 3), make_dls(), default_cbs=False, cbs=list(cbs)
    )


def same(a, b) -> bool:
    """Equal values of the same types, all the way down."""
    if type(a) is not type(b):
        return False
    if isinstance(a, torch.Tensor):
        return a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(map(same, a, b))
    return a == b


class TestNumpyIsConverted:
    @pytest.mark.parametrize(
        ("value", "expected"),
        [
            (np.float64(0.25), 0.25),
            (np.int64(3), 3),
            (np.bool_(True), True),
            (
                np.arange(6, dtype=np.float32).reshape(2, 3),
                torch.arange(6.0).reshape(2, 3),
            ),
            ({"deep": [np.float32(1.5), (np.int8(2),)]}, {"deep": [1.5, (2,)]}),
        ],
        ids=["float64", "int64", "bool_", "ndarray", "nested"],
    )
    def test_numpy_values_load_back_as_python_and_torch(
        self, tmp_path, value, expected
    ):
        """A callback state holding numpy values is saved as numbers and tensors and loads back equal."""
        learner(Stash(value)).save(tmp_path / "c.pt")
        stash = Stash()
        learner(stash).load(tmp_path / "c.pt")
        assert same(stash.loaded, expected)

    def test_extra_state_numpy_is_converted(self, tmp_path):
        """A module's get_extra_state() returning numpy values loads back as Python numbers."""
        learner(model=nn.Sequential(Tagged({"scale": np.float64(2.0)}))).save(
            tmp_path / "c.pt"
        )
        other = nn.Sequential(Tagged(None))
        learner(model=other).load(tmp_path / "c.pt")
        assert same(other[0].extra, {"scale": 2.0})

    def test_model_tensors_are_not_copied(self):
        """The checkpoint shares the model's storage: checking it copies no tensor."""
        learn = learner(Stash(np.float64(1.0)))
        ck = checkpoint_state(learn)
        assert ck["model"]["weight"].data_ptr() == learn.model.weight.data_ptr()
        assert ck["callbacks"]["Stash"]["x"] == 1.0


class TestUnloadableIsRefused:
    @pytest.mark.parametrize(
        ("value", "kind", "fix"),
        [
            (deque([1, 2]), r"collections\.deque", r"list\(\.\.\.\)"),
            (Path("runs/a"), r"pathlib\.\w*Path", r"str\(\.\.\.\)"),
            (Opaque(), r"\S*test_checkpoint_checks\.Opaque", ""),
            (functools.partial(print), r"functools\.partial", ""),
            (defaultdict(int), r"collections\.defaultdict", r"dict\(\.\.\.\)"),
            (np.array(["a", "b"]), r"numpy\.ndarray", "tensor of a torch dtype"),
        ],
        ids=["deque", "Path", "object", "partial", "defaultdict", "str-array"],
    )
    def test_refused_before_anything_is_written(self, tmp_path, value, kind, fix):
        """TypeError naming the callback, key path, type and fix; the folder stays empty."""
        with pytest.raises(
            TypeError,
            match=rf"callback Stash's state_dict\(\) holds a {kind} at \['x'\]\['deep'\]\[1\]"
            rf".*{fix}.*Return tensors, numbers, strings",
        ):
            learner(Stash({"deep": [1, value]})).save(tmp_path / "c.pt")
        assert list(tmp_path.iterdir()) == []

    def test_refusal_leaves_the_old_file_untouched(self, tmp_path):
        """A refused save leaves the previous checkpoint byte for byte, and no temporary file."""
        stash = Stash([1.0])
        learn = learner(stash)
        learn.save(tmp_path / "c.pt")
        before = (tmp_path / "c.pt").read_bytes()
        stash.value = deque([1.0])
        with pytest.raises(TypeError, match=r"holds a collections\.deque at \['x'\]"):
            learn.save(tmp_path / "c.pt")
        assert (tmp_path / "c.pt").read_bytes() == before
        assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]

    def test_whole_state_of_the_wrong_type_is_named(self, tmp_path):
        """A state_dict() that returns a deque itself is named as such."""

        class Bare(Stash):
            def state_dict(self):
                return deque([1])

        with pytest.raises(
            TypeError, match=r"callback Bare's state_dict\(\) is a collections\.deque"
        ):
            learner(Bare()).save(tmp_path / "c.pt")

    def test_extra_state_object_names_the_model_entry(self, tmp_path):
        """An object from get_extra_state() is refused naming the model's state-dict key."""
        model = nn.Sequential(nn.ReLU(), Tagged({"cfg": Opaque()}))
        with pytest.raises(
            TypeError,
            match=r"the model's state_dict\(\) entry '1\._extra_state' \(what a module's "
            r"get_extra_state\(\) returned\) holds a .*Opaque at \['cfg'\].*from get_extra_state",
        ):
            learner(model=model).save(tmp_path / "c.pt")
        assert list(tmp_path.iterdir()) == []

    def test_optimizer_setting_is_named(self, tmp_path):
        """A parameter-group setting that cannot load back is refused naming the optimizer."""
        learn = learner()
        learn.fit(1)
        learn.opt.param_groups[0]["log_dir"] = Path("runs")
        with pytest.raises(
            TypeError,
            match=r"the optimizer's state_dict\(\) holds a pathlib\.\w*Path at "
            r"\['param_groups'\]\[0\]\['log_dir'\]",
        ):
            learn.save(tmp_path / "c.pt")

    def test_tensor_subclass_is_refused(self, tmp_path):
        """A tensor subclass would need its class to load: refused with the as_subclass fix."""

        class Tagged_(torch.Tensor):
            pass

        value = torch.ones(2).as_subclass(Tagged_)
        with pytest.raises(
            TypeError, match=r"Tagged_ at \['x'\].*as_subclass\(torch\.Tensor\)"
        ):
            learner(Stash(value)).save(tmp_path / "c.pt")

    def test_non_finite_lr_is_refused(self, tmp_path):
        """A learning rate loading would refuse is refused on save already."""
        learn = learner()
        learn.lr = float("nan")
        with pytest.raises(
            ValueError, match=r"Cannot save the checkpoint: 'lr' is nan"
        ):
            learn.save(tmp_path / "c.pt")
        assert list(tmp_path.iterdir()) == []


class TestCheckpointCBChecksFirst:
    def test_unsaveable_state_fails_before_training(self, tmp_path):
        """With a CheckpointCB attached, a state that cannot be saved fails at before_fit, before any batch."""
        from learnloop import CheckpointCB

        batches = []

        class Count(Callback):
            def before_batch(self, learn, *args, **kwargs):
                batches.append(learn.iter)

        learn = learner(
            Stash(deque([1.0])), Count(), CheckpointCB(tmp_path, monitor=None)
        )
        with pytest.raises(TypeError, match=r"holds a collections\.deque") as info:
            learn.fit(1)
        assert batches == []
        assert "CheckpointCB.before_fit" in "\n".join(info.value.__notes__)
        assert list(tmp_path.iterdir()) == []


class TestOptimizerCheckCost:
    def test_optimizer_state_is_not_copied_to_check_it(self, tmp_path, monkeypatch):
        """Loading checks the optimizer state with a trial load that shares its tensors: a copy of
        Adam's moments would take as long as reading the file, and as much memory again."""
        learn = Learner(
            nn.Linear(4, 3), make_dls(), opt_func=torch.optim.AdamW, default_cbs=False
        )
        learn.fit(1)
        learn.save(tmp_path / "ck.pt")
        copied = []
        original = torch.Tensor.__deepcopy__

        def counting(self, memo):
            copied.append(tuple(self.shape))
            return original(self, memo)

        monkeypatch.setattr(torch.Tensor, "__deepcopy__", counting)
        fresh = Learner(
            nn.Linear(4, 3), make_dls(), opt_func=torch.optim.AdamW, default_cbs=False
        )
        fresh.load(tmp_path / "ck.pt")
        assert copied == []
        for (k, a), b in zip(
            learn.opt.state_dict()["state"].items(),
            fresh.opt.state_dict()["state"].values(),
        ):
            assert all(torch.equal(a[n], b[n]) for n in a), k
