"""Checkpoints: exact resume, atomic writes, safe and all-or-nothing loading."""

from __future__ import annotations

import copy
import os
import random
import re
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import make_data, make_dls
from torch import nn
from torch.utils.data import DataLoader

from learnloop import Callback, CheckpointCB, DataLoaders, DeviceCB, Learner, MetricsCB
from learnloop.checkpoint import atomic_save, read_checkpoint


class StepSchedCB(Callback):
    """A torch StepLR driven per batch, following the checkpoint protocol for objects built in before_fit."""

    def __init__(self) -> None:
        self.sched = None
        self._pending = None

    def before_fit(self, learn, *args, **kwargs):
        self.sched = torch.optim.lr_scheduler.StepLR(learn.opt, step_size=4, gamma=0.7)
        if self._pending is not None and learn.epoch > 0:
            self.sched.load_state_dict(self._pending)
            for group, lr in zip(learn.opt.param_groups, self.sched.get_last_lr()):
                group["lr"] = lr
        self._pending = None

    def after_step(self, learn, *args, **kwargs):
        self.sched.step()

    def state_dict(self):
        return self.sched.state_dict() if self.sched is not None else {}

    def load_state_dict(self, state):
        self._pending = state


class Touch:
    """Unpickling it would create the file `touched` (if pickled code ran)."""

    def __reduce__(self):
        return (Path.touch, (Path("touched"),))


def make_learner(seed: int, generator: bool, cbs=()) -> Learner:
    """A dropout MLP on shuffled data; `seed` sets the init (and the loader generator's seed)."""
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Linear(4, 16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 3)
    )
    gen = torch.Generator().manual_seed(seed + 1) if generator else None
    train = DataLoader(make_data(96), batch_size=16, shuffle=True, generator=gen)
    dls = DataLoaders(train, DataLoader(make_data(48, seed=1), batch_size=32))
    opt = partial(torch.optim.SGD, momentum=0.9)
    return Learner(
        model,
        dls,
        lr=0.1,
        opt_func=opt,
        default_cbs=False,
        cbs=[DeviceCB("cpu"), MetricsCB(), StepSchedCB(), *cbs],
    )


def weights(learn: Learner) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in learn.model.state_dict().items()}


def draws(learn: Learner) -> tuple:
    """The weights, then one draw from each random stream a checkpoint restores."""
    gen = learn.dls.train.generator
    return (
        weights(learn),
        torch.rand(3),
        random.random(),
        np.random.rand(),
        torch.rand(2, generator=gen),
    )


class TestExactResume:
    @pytest.mark.parametrize(
        "generator", [False, True], ids=["global-rng", "loader-generator"]
    )
    def test_resumed_fit_is_bitwise_identical(self, tmp_path, generator):
        """4 epochs equal 2 epochs + checkpoint + a fresh learner resuming to 4, bit for bit."""
        full = make_learner(0, generator)
        full.fit(4)
        first = make_learner(0, generator, cbs=[CheckpointCB(tmp_path)])
        first.fit(2)
        random.seed(99), np.random.seed(99)
        # Other init, other RNG state.
        fresh = make_learner(123, generator, cbs=[CheckpointCB(tmp_path)])
        fresh.fit(4, resume=tmp_path)
        assert fresh.epochs_done == 4
        for key, value in weights(full).items():
            assert torch.equal(value, fresh.model.state_dict()[key]), key
        assert fresh.opt.param_groups[0]["lr"] == full.opt.param_groups[0]["lr"]

    def test_resume_runs_only_the_remaining_epochs(self, tmp_path):
        """After 2 saved epochs, fit(4, resume=...) runs epochs 2 and 3."""
        make_learner(0, False, cbs=[CheckpointCB(tmp_path)]).fit(2)
        seen = []

        class Epochs(Callback):
            def before_epoch(self, learn, epoch, **kwargs):
                seen.append(epoch)

        make_learner(1, False).fit(4, cbs=[Epochs()], resume=tmp_path / "last.pt")
        assert seen == [2, 3]

    def test_resume_of_a_finished_fit_runs_nothing(self, tmp_path):
        """Resuming with n_epochs <= the saved epochs runs no epoch and warns why, where users see it."""
        make_learner(0, False, cbs=[CheckpointCB(tmp_path)]).fit(2)
        learn = make_learner(1, False)
        fired = []

        class Any_(Callback):
            def before_fit(self, learn, *args, **kwargs):
                fired.append("before_fit")

        with pytest.warns(UserWarning, match="Nothing to resume.*holds 2 epochs"):
            learn.fit(2, cbs=[Any_()], resume=tmp_path)
        assert fired == []
        assert learn.epochs_done == 2  # the checkpoint was still loaded

    def test_save_and_load_round_trip(self, tmp_path):
        """learn.load restores weights, optimizer state, counters and the RNG streams that learn.save saw."""
        learn = make_learner(0, True)
        learn.fit(1)
        learn.save(tmp_path / "a.pt")
        expected = draws(learn)
        other = make_learner(5, True)
        other.load(tmp_path / "a.pt")
        got = draws(other)
        assert all(torch.equal(expected[0][k], got[0][k]) for k in expected[0])
        assert torch.equal(expected[1], got[1]) and expected[2:4] == got[2:4]
        assert torch.equal(expected[4], got[4])
        assert other.epochs_done == 1
        assert torch.equal(
            other.opt.state_dict()["state"][0]["momentum_buffer"],
            learn.opt.state_dict()["state"][0]["momentum_buffer"],
        )


class TestAtomicWrite:
    @pytest.mark.parametrize("crash_in", ["torch.save", "os.replace"])
    def test_crash_mid_write_keeps_the_old_file(self, tmp_path, monkeypatch, crash_in):
        """A crash while writing leaves the previous checkpoint loadable and no temporary file behind."""
        learn = make_learner(0, False)
        learn.fit(1)
        path = tmp_path / "last.pt"
        learn.save(path)
        before = read_checkpoint(path)["model"]
        learn.fit(1)

        def crash(*args, **kwargs):
            if crash_in == "torch.save":
                args[1].write(b"partial bytes")
            raise OSError("disk vanished")

        target = torch if crash_in == "torch.save" else os
        monkeypatch.setattr(target, crash_in.split(".")[1], crash)
        with pytest.raises(OSError, match="disk vanished"):
            learn.save(path)
        monkeypatch.undo()
        after = read_checkpoint(path)["model"]
        assert all(torch.equal(before[k], after[k]) for k in before)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]

    def test_atomic_save_creates_folders(self, tmp_path):
        """atomic_save makes missing parent folders and leaves only the target file."""
        path = atomic_save({"x": torch.ones(2)}, tmp_path / "a" / "b.pt")
        assert torch.equal(torch.load(path, weights_only=True)["x"], torch.ones(2))
        assert os.listdir(tmp_path / "a") == ["b.pt"]


class TestSafeLoading:
    def _learner_and_state(self):
        learn = make_learner(0, False)
        learn.fit(1)
        return (
            learn,
            weights(learn),
            learn.opt.state_dict()["state"][0]["momentum_buffer"].clone(),
        )

    def _unchanged(self, learn, w, buf):
        assert all(torch.equal(v, learn.model.state_dict()[k]) for k, v in w.items())
        assert torch.equal(learn.opt.state_dict()["state"][0]["momentum_buffer"], buf)
        assert learn.epochs_done == 1

    @pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
    def test_corrupt_file_raises_and_changes_nothing(self, tmp_path, damage):
        """A truncated or garbage file gets a clear error and leaves the learner as it was."""
        learn, w, buf = self._learner_and_state()
        path = tmp_path / "c.pt"
        make_learner(1, False).save(path)
        data = path.read_bytes()
        path.write_bytes(
            {
                "truncated": data[: len(data) // 2],
                "garbage": b"\x00not a checkpoint" * 50,
                "empty": b"",
            }[damage]
        )
        with pytest.raises(ValueError, match=r"c\.pt is corrupt"):
            learn.load(path)
        self._unchanged(learn, w, buf)

    def test_foreign_torch_file_is_refused(self, tmp_path):
        """A plain state_dict saved with torch.save is named as not a learnloop checkpoint."""
        learn, w, buf = self._learner_and_state()
        torch.save(learn.model.state_dict(), tmp_path / "w.pt")
        with pytest.raises(
            ValueError, match="not a learnloop checkpoint.*model.load_state_dict"
        ):
            learn.load(tmp_path / "w.pt")
        self._unchanged(learn, w, buf)

    @pytest.mark.parametrize(
        ("obj", "named"),
        [
            (Path("x"), r"pathlib\.\w*Path"),
            (partial(print, "hi"), r"functools\.partial"),
            (Touch(), r"getattr"),  # how Path.touch is pickled
        ],
        ids=["Path", "partial", "reduce-to-code"],
    )
    def test_pickled_objects_are_refused_unrun(self, tmp_path, monkeypatch, obj, named):
        """A file with pickled objects: 'could run code', nothing run, no advice to use weights_only=False."""
        monkeypatch.chdir(tmp_path)
        learn, w, buf = self._learner_and_state()
        torch.save({"format": "learnloop.checkpoint", "evil": obj}, tmp_path / "p.pt")
        with pytest.raises(
            ValueError,
            match=rf"p\.pt holds pickled objects that could run code \({named}.*\); "
            "learnloop will not load it",
        ) as info:
            learn.load(tmp_path / "p.pt")
        shown = []
        e: BaseException | None = info.value
        while e is not None:  # the chain a traceback shows
            shown.append(str(e))
            e = e.__cause__ or (None if e.__suppress_context__ else e.__context__)
        assert not any("weights_only=False" in m or "corrupt" in m for m in shown)
        assert not (tmp_path / "touched").exists()
        self._unchanged(learn, w, buf)

    def test_other_model_is_refused(self, tmp_path):
        """A checkpoint of a differently shaped model names the mismatch and changes nothing."""
        learn, w, buf = self._learner_and_state()
        other = Learner(
            nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Dropout(), nn.Linear(8, 3)),
            learn.dls,
            default_cbs=False,
        )
        other.save(tmp_path / "o.pt")
        with pytest.raises(
            ValueError, match=r"does not fit Sequential: shape mismatch.*0\.weight"
        ):
            learn.load(tmp_path / "o.pt")
        self._unchanged(learn, w, buf)

    def test_failing_callback_state_rolls_back(self, tmp_path):
        """If a callback rejects its state, callbacks loaded before it get their own state back; weights kept."""
        learn = make_learner(0, False)
        learn.fit(1)
        learn.save(tmp_path / "s.pt")  # the scheduler has taken 6 steps here
        learn.fit(2)  # and 12 here
        w, buf = (
            weights(learn),
            learn.opt.state_dict()["state"][0]["momentum_buffer"].clone(),
        )

        class Picky(Callback):
            order = 99

            def state_dict(self):
                return {}

            def load_state_dict(self, state):
                raise RuntimeError("wrong version")

        ck = read_checkpoint(tmp_path / "s.pt")
        ck["callbacks"]["Picky"] = {}
        torch.save(ck, tmp_path / "s.pt")
        sched = next(cb for cb in learn.cbs if isinstance(cb, StepSchedCB))
        learn.add_cbs(Picky())
        with pytest.raises(
            ValueError, match="Picky.load_state_dict failed.*wrong version"
        ):
            learn.load(tmp_path / "s.pt")
        assert sched._pending["last_epoch"] == 12  # its own state, not the file's 6
        assert all(torch.equal(v, learn.model.state_dict()[k]) for k, v in w.items())
        assert torch.equal(learn.opt.state_dict()["state"][0]["momentum_buffer"], buf)
        assert learn.epochs_done == 2

    def test_missing_paths_are_named(self, tmp_path):
        """A missing file, or a folder without last.pt, raises FileNotFoundError naming the path."""
        learn = make_learner(0, False)
        with pytest.raises(FileNotFoundError, match="No checkpoint at .*nope.pt"):
            learn.load(tmp_path / "nope.pt")
        with pytest.raises(FileNotFoundError, match="without last.pt"):
            learn.fit(1, resume=tmp_path)


def test_other_optimizer_is_refused_and_nothing_changes(tmp_path):
    """A checkpoint saved with SGD, loaded into an AdamW learner: a ValueError, weights and optimizer kept."""
    sgd = Learner(nn.Linear(4, 3), make_dls(), lr=0.1, default_cbs=False)
    sgd.fit(1)
    sgd.save(tmp_path / "sgd.pt")
    adam = Learner(
        nn.Linear(4, 3), make_dls(), opt_func=torch.optim.AdamW, default_cbs=False
    )
    adam.fit(1)
    before = weights(adam)
    opt_before = copy.deepcopy(adam.opt.state_dict())
    with pytest.raises(ValueError, match="another kind of optimizer.*betas"):
        adam.load(tmp_path / "sgd.pt")
    assert all(torch.equal(v, adam.model.state_dict()[k]) for k, v in before.items())
    assert adam.opt.state_dict()["param_groups"] == opt_before["param_groups"]


class Tally(Callback):
    """A stateful callback that counts batches."""

    def __init__(self) -> None:
        self.n = 0

    def after_batch(self, learn, *args, **kwargs):
        self.n += 1

    def state_dict(self):
        return {"n": self.n}

    def load_state_dict(self, state):
        self.n = state["n"]


def put(*keys_and_value):
    """A corruption that sets ck[k1][k2]... to the value (or to value(old) if it is callable)."""
    *keys, value = keys_and_value

    def corrupt(ck):
        for key in keys[:-1]:
            ck = ck[key]
        ck[keys[-1]] = value(ck[keys[-1]]) if callable(value) else value

    return corrupt


def drop(*keys):
    """A corruption that deletes ck[k1][k2]..."""

    def corrupt(ck):
        for key in keys[:-1]:
            ck = ck[key]
        del ck[keys[-1]]

    return corrupt


def uint8(n: int) -> torch.Tensor:
    return torch.zeros(n, dtype=torch.uint8)


BAD_OPTIMIZER = r"'optimizer' section is not an optimizer state_dict"
CORRUPTIONS = {
    "rng-torch-size": (
        put("rng", "torch", uint8(10)),
        r"rng\['torch'\] does not apply",
    ),
    "rng-torch-dtype": (put("rng", "torch", lambda t: t.long()), r"rng\['torch'\]"),
    "rng-python-length": (
        put("rng", "python", "state", lambda t: t[:10]),
        r"rng\['python'\] does not apply",
    ),
    "rng-python-version": (put("rng", "python", "version", 99), r"rng\['python'\]"),
    "rng-numpy-keys": (put("rng", "numpy", "keys", lambda t: t[:5]), r"rng\['numpy'\]"),
    "rng-numpy-pos": (put("rng", "numpy", "pos", 10_000), r"rng\['numpy'\]"),
    "rng-numpy-no-kind": (drop("rng", "numpy", "kind"), r"rng\['numpy'\].*KeyError"),
    "rng-no-torch": (drop("rng", "torch"), r"'rng' does not apply"),
    "rng-loader": (put("rng", "loaders", [uint8(3)]), r"rng\['loaders'\]"),
    "epochs_done-str": (
        put("epochs_done", "two"),
        r"'epochs_done' is 'two' \(str\), expected an int >= 0",
    ),
    "epoch-negative": (put("epoch", -1), r"'epoch' is -1 \(int\)"),
    "iter-float": (put("iter", 2.5), r"'iter' is 2\.5"),
    "lr-nan": (put("lr", float("nan")), r"'lr' is nan .*expected a finite number > 0"),
    "lr-zero": (put("lr", 0.0), r"'lr' is 0\.0"),
    "callbacks-list": (put("callbacks", [1]), r"'callbacks' is a list"),
    "callbacks-int-keys": (
        put("callbacks", {1: {}}),
        r"'callbacks' is a dict with keys \[1\]",
    ),
    "model-list": (put("model", [1]), r"'model' section is not a state dict"),
    "model-entry-str": (
        put("model", "0.weight", "abc"),
        r"not a tensor: \['0\.weight: file str'\]",
    ),
    "optimizer-list": (put("optimizer", [1]), BAD_OPTIMIZER),
    "optimizer-no-params": (
        drop("optimizer", "param_groups", 0, "params"),
        BAD_OPTIMIZER,
    ),
    "optimizer-no-state": (drop("optimizer", "state"), BAD_OPTIMIZER),
}


class TestAllOrNothing:
    def snapshot(self, learn: Learner) -> dict:
        """Everything a load could change: weights, optimizer, counters, callbacks, every RNG."""
        opt = learn.opt.state_dict()
        return {
            "weights": weights(learn),
            "opt_state": copy.deepcopy(opt["state"]),
            "opt_groups": copy.deepcopy(opt["param_groups"]),
            "counters": [
                learn.epochs_done,
                learn.epoch,
                learn.iter,
                learn.n_epochs,
                learn.lr,
            ],
            "callbacks": [
                (type(cb).__name__, cb.n if isinstance(cb, Tally) else cb._pending)
                for cb in learn.cbs
                if isinstance(cb, (Tally, StepSchedCB))
            ],
            "torch_rng": torch.get_rng_state(),
            "python_rng": random.getstate(),
            "numpy_rng": np.random.get_state()[1].copy(),
            "loader_rng": learn.dls.train.generator.get_state(),
        }

    def same(self, a, b) -> bool:
        if isinstance(a, torch.Tensor):
            return torch.equal(a, b)
        if isinstance(a, np.ndarray):
            return np.array_equal(a, b)
        if isinstance(a, dict):
            return a.keys() == b.keys() and all(self.same(a[k], b[k]) for k in a)
        if isinstance(a, (list, tuple)):
            return len(a) == len(b) and all(map(self.same, a, b))
        return a == b

    @pytest.mark.parametrize("corruption", list(CORRUPTIONS))
    def test_damaged_section_is_named_and_nothing_changes(self, tmp_path, corruption):
        """A checkpoint with one damaged section: ValueError naming file and section; the learner is untouched."""
        corrupt, message = CORRUPTIONS[corruption]
        learn = make_learner(0, True, cbs=[Tally()])
        learn.fit(1)
        path = tmp_path / "c.pt"
        learn.save(path)
        ck = torch.load(path, weights_only=True)
        corrupt(ck)
        torch.save(ck, path)
        learn.fit(1)  # so that the file's state differs from the learner's
        before = self.snapshot(learn)
        with pytest.raises(ValueError, match=rf"{re.escape(str(path))}.*{message}"):
            learn.load(path)
        after = self.snapshot(learn)
        assert [k for k in before if not self.same(before[k], after[k])] == []


class TestFormatVersion:
    def test_mid_epoch_checkpoints_are_version_2_epoch_ones_stay_1(self, tmp_path):
        """An older learnloop would read a mid-epoch file as the epoch's start and train its first
        batches twice: such files say version 2, which releases reading only 1 refuse."""
        learn = Learner(nn.Linear(4, 3), make_dls(), default_cbs=False)
        learn.fit(2, cbs=[CheckpointCB(tmp_path, every_steps=4, monitor=None)])
        # every_steps=4 over 6 batches an epoch: the last write was at batch 2 of epoch 1 (8 steps),
        # then the fit's end wrote an epoch-level last.pt.
        assert read_checkpoint(tmp_path / "last.pt")["version"] == 1

        class Stop(Callback):
            order = CheckpointCB.order + 1

            def after_batch(self, learn, *args, **kwargs):
                if learn.training and learn.iter == 3:
                    raise RuntimeError("stop")

        other = Learner(nn.Linear(4, 3), make_dls(), default_cbs=False)
        with pytest.raises(RuntimeError):
            other.fit(
                2,
                cbs=[CheckpointCB(tmp_path / "b", every_steps=4, monitor=None), Stop()],
            )
        ck = read_checkpoint(tmp_path / "b" / "last.pt")
        assert ck["version"] == 2 and ck["position"]["batches"] == 4
        ck["version"] = 3
        torch.save(ck, tmp_path / "future.pt")
        with pytest.raises(ValueError, match="version 3.*upgrade learnloop"):
            read_checkpoint(tmp_path / "future.pt")
