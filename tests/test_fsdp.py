"""FSDP in one process: the options DistributedCB refuses, `shard=` that names nothing, the
single-process note, and sharded checkpoints in a one-process group (`learnloop export` too).

The 2-process runs (parity with one process and with DDP, sharded resume, world-size changes)
are in test_fsdp_dist.py and test_sharded_checkpoints.py. Here a gloo process group of one
process is started in-process where a test needs one: FSDP then shards over one process, which
runs the whole sharded path (DTensor parameters, DCP folders) in milliseconds.
"""

from __future__ import annotations

import logging
import socket

import pytest
import torch
import torch.distributed as dist
from helpers import make_dls
from torch import nn

from learnloop import DeviceCB, DistributedCB, Learner
from learnloop.cli import main
from learnloop.fsdp import is_sharded, matching_modules
from learnloop.sharded import export_model, is_sharded_checkpoint


class Block(nn.Module):
    def __init__(self, n: int = 8) -> None:
        super().__init__()
        self.lin = nn.Linear(n, n)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.lin(x))


def make_model(width: int = 8) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, width), Block(width), nn.Linear(width, 3))


@pytest.fixture
def group(monkeypatch):
    """A gloo process group of one process (rank 0 of 1), destroyed after the test."""
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1
    )
    yield
    dist.destroy_process_group()


def fsdp_learner(model: nn.Module, **kwargs) -> Learner:
    cb = DistributedCB(strategy="fsdp", shard=Block)
    return Learner(
        model,
        make_dls(),
        lr=0.05,
        opt_func=torch.optim.AdamW,
        cbs=[DeviceCB("cpu"), cb],
        default_cbs=False,
        **kwargs,
    )


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({"strategy": "zero"}, "choose 'ddp'"),
        ({"shard": Block}, "pass strategy='fsdp'"),
        ({"strategy": "fsdp", "find_unused_parameters": True}, "strategy='ddp' only"),
    ],
)
def test_distributed_cb_refuses_options_that_do_not_go_together(kwargs, expected):
    with pytest.raises(ValueError, match=expected):
        DistributedCB(**kwargs)


def test_shard_of_the_wrong_type_is_refused_at_construction():
    with pytest.raises(TypeError, match="module classes or predicates"):
        DistributedCB(strategy="fsdp", shard="Block")


def test_shard_that_matches_nothing_names_the_model_classes():
    with pytest.raises(ValueError, match="matches no module") as e:
        matching_modules(make_model(), nn.Conv2d)
    assert "Block" in str(e.value) and "Linear" in str(e.value)
    # A predicate and a list of classes name what they match.
    model = make_model()
    assert matching_modules(model, [Block]) == [model[1]]
    assert matching_modules(model, lambda m: isinstance(m, nn.Linear)) == [
        model[0],
        model[1].lin,
        model[2],
    ]


def test_single_process_fsdp_trains_unsharded_with_one_note(caplog):
    model = make_model()
    learn = fsdp_learner(model)
    before = [p.detach().clone() for p in model.parameters()]
    with caplog.at_level(logging.WARNING, logger="learnloop"):
        learn.fit(2)
        learn.validate()
    notes = [r for r in caplog.records if "single process" in r.getMessage()]
    assert len(notes) == 1 and "unsharded" in notes[0].getMessage()
    assert not is_sharded(learn.model)
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_shard_that_matches_nothing_fails_the_fit_before_training(group):
    learn = Learner(
        make_model(),
        make_dls(),
        cbs=[DistributedCB(strategy="fsdp", shard=nn.Conv2d)],
        default_cbs=False,
    )
    with pytest.raises(ValueError, match=r"matches no module of Sequential.*Block"):
        learn.fit(1)
    assert learn.opt is None and not is_sharded(learn.model)


def test_one_process_group_shards_and_round_trips_a_sharded_folder(group, tmp_path):
    """Sharded in a group of one: DTensor parameters, a DCP folder that loads back bitwise."""
    learn = fsdp_learner(make_model())
    learn.fit(1)
    assert is_sharded(learn.model) and is_sharded(learn.model[1])
    weight = learn.model[0].weight
    assert type(weight).__name__ == "DTensor"
    assert all(
        type(p).__name__ == "DTensor"
        for p in learn.opt.state[weight].values()
        if p.dim()
    )
    folder = tmp_path / "ck"
    learn.save(folder)
    assert is_sharded_checkpoint(folder)
    saved = {k: v.full_tensor().clone() for k, v in learn.model.state_dict().items()}
    learn.fit(2, resume=folder)  # one more epoch changes the weights
    changed = {k: v.full_tensor() for k, v in learn.model.state_dict().items()}
    assert any(not torch.equal(saved[k], changed[k]) for k in saved)
    learn.load(folder)
    for k, v in learn.model.state_dict().items():
        assert torch.equal(v.full_tensor(), saved[k])


def test_a_folder_from_another_model_is_refused_and_changes_nothing(group, tmp_path):
    learn = fsdp_learner(make_model(8))
    learn.fit(1)
    learn.save(tmp_path / "ck")
    other = fsdp_learner(make_model(16))
    other.fit(1)
    before = {k: v.full_tensor().clone() for k, v in other.model.state_dict().items()}
    moments = {
        name: t.full_tensor().clone()
        for p in other.model.parameters()
        for name, t in other.opt.state[p].items()
        if t.dim()
    }
    with pytest.raises(ValueError, match=r"another model.*shapes differ"):
        other.load(tmp_path / "ck")
    for k, v in other.model.state_dict().items():
        assert torch.equal(v.full_tensor(), before[k])
    after = {
        name: t.full_tensor()
        for p in other.model.parameters()
        for name, t in other.opt.state[p].items()
        if t.dim()
    }
    assert all(torch.equal(after[k], moments[k]) for k in moments)


def test_learnloop_export_writes_plain_weights_of_a_sharded_folder(
    group, tmp_path, capsys
):
    learn = fsdp_learner(make_model())
    learn.fit(1)
    learn.save(tmp_path / "ck")
    full = {k: v.full_tensor() for k, v in learn.model.state_dict().items()}
    assert main(["export", str(tmp_path / "ck"), str(tmp_path / "model.pt")]) == 0
    assert "wrote" in capsys.readouterr().out
    plain = make_model()
    plain.load_state_dict(torch.load(tmp_path / "model.pt", weights_only=True))
    for k, v in plain.state_dict().items():
        assert torch.equal(v, full[k])


def test_learnloop_export_of_a_plain_file_and_of_nothing(tmp_path, capsys):
    learn = Learner(make_model(), make_dls(), default_cbs=False)
    learn.fit(1)
    learn.save(tmp_path / "plain.pt")
    assert main(["export", str(tmp_path / "plain.pt"), str(tmp_path / "model.pt")]) == 0
    weights = torch.load(tmp_path / "model.pt", weights_only=True)
    assert weights.keys() == learn.model.state_dict().keys()
    assert all(torch.equal(weights[k], v) for k, v in learn.model.state_dict().items())
    assert main(["export", str(tmp_path / "nowhere"), str(tmp_path / "x.pt")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "nowhere" in err


def test_export_of_a_damaged_shard_is_a_value_error_naming_the_folder(group, tmp_path):
    learn = fsdp_learner(make_model())
    learn.fit(1)
    learn.save(tmp_path / "ck")
    with open(tmp_path / "ck" / "__0_0.distcp", "r+b") as f:
        f.truncate(100)
    with pytest.raises(ValueError, match=r"ck could not be read \(EOFError\)"):
        export_model(tmp_path / "ck", tmp_path / "model.pt")
    assert not (tmp_path / "model.pt").exists()
