"""Each rank's RNG states in a checkpoint (`rng_ranks`): checked before anything loads, and applied
to the process of that rank.

Checkpoints that hold `rng_ranks` are written under torchrun (tests/test_long_runs_dist.py runs
them); here, one process adds the entries by hand to checkpoints it wrote.
"""

from __future__ import annotations

import copy
import re

import pytest
import torch
from helpers import make_dls
from torch import nn

from learnloop import Callback, Learner
from learnloop.checkpoint import read_checkpoint
from learnloop.state import use_own_rng


class SaveAt(Callback):
    """Writes `learn.save(path)` after training batch `at` of epoch 0: a mid-epoch checkpoint."""

    def __init__(self, path, at: int) -> None:
        self.path, self.at = path, at

    def after_batch(self, learn, *args, **kwargs):
        if learn.training and learn.epoch == 0 and learn.iter == self.at:
            learn.save(self.path)


def make_learner(cbs=()) -> Learner:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.3), nn.Linear(8, 3))
    return Learner(model, make_dls(shuffle=True), lr=0.1, cbs=list(cbs))


def entry(ck: dict, seed: int | None = None) -> dict:
    """A rank's entry as torchrun writes it for `ck`; with `seed`, another torch state in each."""
    position = ck.get("position")

    def states(rng: dict | None) -> dict | None:
        if rng is None:
            return None
        rng = copy.deepcopy(rng)
        if seed is not None:
            rng["torch"] = torch.Generator().manual_seed(seed).get_state()
        return rng

    return {
        "rng": states(ck["rng"]),
        "epoch_rng": states(position["rng"]) if position else None,
        "valid_rng": None,
    }


@pytest.fixture
def between(tmp_path):
    """A learner after one epoch, and the path of its checkpoint (between epochs)."""
    learn = make_learner()
    learn.fit(1)
    path = tmp_path / "c.pt"
    learn.save(path)
    return learn, path


@pytest.fixture
def inside(tmp_path):
    """A learner after one epoch, and the path of a checkpoint written after its batch 2."""
    path = tmp_path / "mid.pt"
    learn = make_learner(cbs=[SaveAt(path, 2)])
    learn.fit(1)
    return learn, path


DAMAGES = {
    "not-a-list": (
        lambda ck: ck.update(rng_ranks={"rng": ck["rng"]}),
        r"'rng_ranks' is a dict, expected a list",
    ),
    "empty": (lambda ck: ck.update(rng_ranks=[]), r"'rng_ranks' is an empty list"),
    "entry-not-a-dict": (
        lambda ck: ck.update(rng_ranks=[entry(ck), 3]),
        r"'rng_ranks'\[1\] is a int, expected a dict with 'rng', 'epoch_rng' and 'valid_rng'",
    ),
    "entry-lacks-a-key": (
        lambda ck: ck.update(rng_ranks=[{"rng": ck["rng"]}]),
        r"'rng_ranks'\[0\] is a dict with keys \['rng'\]",
    ),
    "bad-torch-state": (
        lambda ck: ck.update(
            rng_ranks=[{**entry(ck), "rng": {**ck["rng"], "torch": torch.zeros(3)}}]
        ),
        r"'rng_ranks'\[0\]\['rng'\]: rng\['torch'\] does not apply",
    ),
    "epoch-rng-between-epochs": (
        lambda ck: ck.update(rng_ranks=[{**entry(ck), "epoch_rng": ck["rng"]}]),
        r"'rng_ranks'\[0\]\['epoch_rng'\] is RNG states, expected None .*between epochs",
    ),
}


class TestDamagedRankStates:
    @pytest.mark.parametrize("damage", list(DAMAGES))
    def test_named_and_nothing_changes(self, between, damage):
        """A damaged `rng_ranks`: ValueError naming the file and the entry; weights and RNGs untouched."""
        learn, path = between
        corrupt, message = DAMAGES[damage]
        ck = torch.load(path, weights_only=True)
        corrupt(ck)
        torch.save(ck, path)
        learn.fit(1)  # the learner now differs from the file
        weights = {k: v.clone() for k, v in learn.model.state_dict().items()}
        rng = torch.get_rng_state()
        with pytest.raises(ValueError, match=rf"{re.escape(str(path))}.*{message}"):
            learn.load(path)
        assert all(
            torch.equal(v, learn.model.state_dict()[k]) for k, v in weights.items()
        )
        assert torch.equal(torch.get_rng_state(), rng)

    def test_mid_epoch_entry_needs_the_epoch_start(self, inside):
        """Inside an epoch each entry must hold the epoch's starting states too."""
        learn, path = inside
        ck = torch.load(path, weights_only=True)
        ck["rng_ranks"] = [{**entry(ck), "epoch_rng": None}]
        torch.save(ck, path)
        with pytest.raises(
            ValueError,
            match=r"'rng_ranks'\[0\]\['epoch_rng'\] is None, expected RNG states for a "
            r"checkpoint written in training",
        ):
            learn.load(path)


class TestOwnStates:
    def test_process_gets_its_own_entry(self, between):
        """With as many entries as processes (here one), the process restores its entry, not `rng`."""
        learn, path = between
        ck = torch.load(path, weights_only=True)
        ck["rng_ranks"] = [entry(ck, seed=7)]
        torch.save(ck, path)
        learn.load(path)
        assert torch.equal(torch.get_rng_state(), ck["rng_ranks"][0]["rng"]["torch"])
        assert not torch.equal(torch.get_rng_state(), ck["rng"]["torch"])

    def test_mid_epoch_resume_uses_own_epoch_start(self, inside):
        """A mid-epoch entry's epoch start replaces the position's, for the resumed loader."""
        learn, path = inside
        ck = read_checkpoint(path)
        ck["rng_ranks"] = [entry(ck, seed=7)]
        torch.save(ck, path)
        learn.load(path)
        own = ck["rng_ranks"][0]
        assert torch.equal(learn._resume_at["rng"]["torch"], own["epoch_rng"]["torch"])
        assert torch.equal(learn._resume_at["now_rng"]["torch"], own["rng"]["torch"])

    @pytest.mark.parametrize("phase", ["train", "valid"])
    def test_use_own_rng_picks_by_rank(self, phase):
        """Rank 1 of 2 gets entry 1 (validation's start in validation); `rng_ranks` is removed."""
        ranks = [
            {
                "rng": f"r{r}",
                "epoch_rng": f"e{r}",
                "valid_rng": f"v{r}" if phase == "valid" else None,
            }
            for r in (0, 1)
        ]
        state = {
            "rng": "r0",
            "position": {"phase": phase, "rng": "e0"},
            "rng_ranks": ranks,
        }
        use_own_rng(state, rank=1, world=2)
        assert state == {
            "rng": "v1" if phase == "valid" else "r1",
            "position": {"phase": phase, "rng": "e1"},
        }

    def test_other_world_size_keeps_rank_zeros(self):
        """Written by 2 processes, loaded by 3: every rank keeps rank 0's states."""
        ranks = [{"rng": f"r{r}", "epoch_rng": None, "valid_rng": None} for r in (0, 1)]
        state = {"rng": "r0", "position": None, "rng_ranks": ranks}
        use_own_rng(state, rank=2, world=3)
        assert state == {"rng": "r0", "position": None}
