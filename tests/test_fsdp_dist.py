"""FSDP2 under torchrun (gloo on CPU): `DistributedCB(strategy="fsdp")` trains as the rest of the Learner.

Two real 2-process launches of tests/fsdp_script.py, one with FSDP (every check, each on a fresh
model) and one with DDP, are compared with single-process runs made here with batches twice as
large, so that each step sees the same global batch: weights, per-epoch losses, predictions,
lr_find's sweep, gradient norms. The validation set (49 rows, 8 per batch and process) gives
rank 0 four batches and rank 1 three, so the FSDP all-gathers must be evened out. Each launch
costs a few seconds, most of it importing torch in every process; a hang fails at the timeout.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from fsdp_script import MAX_NORM, N_VALID, PER_RANK_BS, history, make_learner
from helpers import TESTS, make_data, torchrun_env

from learnloop import GradAccumCB, GradClipCB, Learner

SCRIPT = TESTS / "fsdp_script.py"
GLOBAL_BS = 2 * PER_RANK_BS
ATOL = 1e-6


def launch(out: Path, mode: str) -> dict[str, Any]:
    """Run `torchrun --standalone --nproc-per-node=2 fsdp_script.py out --mode mode`; return what rank 0 saved."""
    env = torchrun_env()
    logs = out / "logs"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    cmd += ["--nproc-per-node=2", "--log-dir", str(logs), "--redirects", "3"]
    proc = subprocess.Popen(
        [*cmd, str(SCRIPT), str(out), "--mode", mode],
        cwd=out,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        text, _ = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        # The workers run in sessions of their own (torchrun's doing): killed by pid, not orphaned.
        for pid in out.glob("pid*"):
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid.read_text()), signal.SIGKILL)
        proc.kill()
        proc.communicate()
        pytest.fail(f"torchrun --mode {mode} did not finish in 60 s (a hang?)")
    errors = {p.parent.name: p.read_text()[-3000:] for p in logs.rglob("stderr.log")}
    assert proc.returncode == 0, f"{text[-3000:]}\n{errors}"
    return torch.load(out / f"{mode}.pt", weights_only=False)


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory) -> dict[str, Any]:
    return launch(tmp_path_factory.mktemp("fsdp"), "fsdp")


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory) -> dict[str, Any]:
    return launch(tmp_path_factory.mktemp("ddp"), "ddp")


@pytest.fixture(scope="module")
def single() -> Learner:
    """The plain fit in one process: AdamW, 2 epochs, batches of 16."""
    learn = make_learner(GLOBAL_BS)
    learn.fit(2)
    return learn


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k, v in a.items():
        torch.testing.assert_close(v, b[k], rtol=0, atol=ATOL, msg=k)


def assert_same_losses(a: list[dict], b: list[dict]) -> None:
    """The same epochs, each with train_loss and valid_loss equal to ATOL."""
    assert [r["epoch"] for r in a] == [r["epoch"] for r in b] == [0, 1]
    for ra, rb in zip(a, b):
        for key in ("train_loss", "valid_loss"):
            assert ra[key] == pytest.approx(rb[key], rel=0, abs=ATOL), (ra, rb)


class TestParity:
    def test_fsdp_matches_single_process(self, fsdp_run, single):
        """2-process FSDP (AdamW, 2 epochs) ends with a single process's weights and per-epoch losses."""
        assert_same_weights(fsdp_run["fit"]["weights"], single.model.state_dict())
        assert_same_losses(fsdp_run["fit"]["history"], history(single))

    def test_fsdp_matches_ddp(self, fsdp_run, ddp_run):
        """2-process FSDP and 2-process DDP end with the same weights and per-epoch losses."""
        assert_same_weights(fsdp_run["fit"]["weights"], ddp_run["fit"]["weights"])
        assert_same_losses(fsdp_run["fit"]["history"], ddp_run["fit"]["history"])


class TestUnevenValidation:
    def test_validate_matches_single_process(self, fsdp_run, single):
        """Shards of 4 and 3 batches validate to a single process's valid_loss (in the fit's rows too)."""
        assert fsdp_run["fit"]["valid_batches"] == [4, 3]
        got, expected = fsdp_run["fit"]["validate"], single.validate()
        assert got.keys() == expected.keys() == {"valid_loss"}
        assert got["valid_loss"] == pytest.approx(
            expected["valid_loss"], rel=0, abs=ATOL
        )

    def test_get_preds_in_dataset_order(self, fsdp_run, single):
        """get_preds returns all 49 rows in dataset order, as a single process predicts them."""
        preds, targets = fsdp_run["fit"]["preds"]
        expected, _ = single.get_preds()
        assert preds.shape == (N_VALID, 3)
        assert torch.equal(targets, make_data(N_VALID, seed=1).tensors[1])
        torch.testing.assert_close(preds, expected, rtol=0, atol=ATOL)

    def test_get_preds_first_shards_the_model(self, fsdp_run):
        """get_preds as a learner's first call shards the model and predicts as the unsharded one."""
        assert fsdp_run["first_sharded"] == ["DTensor", "DTensor"]
        expected, _ = make_learner(GLOBAL_BS).get_preds()
        torch.testing.assert_close(
            fsdp_run["first_preds"][0], expected, rtol=0, atol=ATOL
        )


class TestSchedules:
    def test_lr_find_restores_the_weights(self, fsdp_run):
        """lr_find shards the model, returns the same float on each rank and leaves the weights bitwise."""
        found = fsdp_run["lr_find"]
        assert found["sharded"] == ["DTensor", "DTensor"]
        (is_float, lr), other = found["lr"]
        assert is_float and (is_float, lr) == other
        assert found["no_optimizer"]
        before, after = found["before"], found["after"]
        assert before.keys() == after.keys()
        assert all(torch.equal(before[k], after[k]) for k in before)

    def test_profile_runs_on_every_process_and_keeps_the_model(self, fsdp_run):
        """learn.profile under FSDP with uneven validation shards: 1 batch counted a phase on each process, weights kept."""
        assert fsdp_run["profile"] == {"counted": [(1, 1), (1, 1)], "kept": True}

    def test_lr_find_sweeps_as_one_process(self, fsdp_run):
        """The sweep records the global batch's losses (the mean over processes): a single process's, same suggestion."""
        expected = make_learner(GLOBAL_BS, opt="sgd").lr_find()
        found = fsdp_run["lr_find"]
        got, losses = torch.tensor(found["losses"]), torch.tensor(expected.losses)
        # As long as in one process: past lr 0.1 (half of it, when the sweep was cut short).
        assert len(got) == len(losses) > 80
        # Once the loss diverges (lr > 0.1, losses up to thousands) it amplifies float error.
        calm = sum(lr <= 0.1 for lr in expected.lrs)
        torch.testing.assert_close(got[:calm], losses[:calm], rtol=0, atol=ATOL)
        torch.testing.assert_close(got, losses, rtol=1e-4, atol=0)
        assert found["lr"][0][1] == float(expected)

    def test_fit_one_cycle_matches_single_process(self, fsdp_run):
        """fit_one_cycle after lr_find trains as a single process's fit_one_cycle (without lr_find)."""
        learn = make_learner(GLOBAL_BS, opt="sgd")
        learn.fit_one_cycle(2, lr_max=0.05)
        assert_same_weights(fsdp_run["one_cycle"]["weights"], learn.model.state_dict())
        assert_same_losses(fsdp_run["one_cycle"]["history"], history(learn))


class TestStepCallbacks:
    def test_grad_clip(self, fsdp_run):
        """GradClipCB's norms (over every shard) and the clipped steps' weights are a single process's."""
        clip = GradClipCB(MAX_NORM)
        learn = make_learner(GLOBAL_BS, (clip,), opt="sgd")
        learn.fit(2)
        norms = fsdp_run["clip"]["norms"]
        assert len(norms) == len(clip.norms) == 12
        assert sum(n > MAX_NORM for n in clip.norms) >= 6  # clipping changed the steps
        assert norms == pytest.approx(clip.norms, rel=1e-5)
        assert_same_weights(fsdp_run["clip"]["weights"], learn.model.state_dict())

    def test_grad_accum(self, fsdp_run):
        """GradAccumCB(2) with batches of 4 per process steps as a single process's GradAccumCB(2) with batches of 8."""
        learn = make_learner(GLOBAL_BS // 2, (GradAccumCB(2),), opt="sgd")
        learn.fit(2)
        assert_same_weights(fsdp_run["accum"]["weights"], learn.model.state_dict())
        assert_same_losses(fsdp_run["accum"]["history"], history(learn))

    def test_mixed_precision(self, fsdp_run):
        """MixedPrecisionCB(bfloat16): forward in bfloat16 (gathered weights too), float32 shards, the loss falls."""
        mixed = fsdp_run["mixed"]
        bf16 = ("torch.bfloat16",) * 3  # the Linear's input, output and weight
        assert mixed["dtypes"] == [[bf16], [bf16]]
        for held in mixed["sharding"]:
            entries = [*held["params"].values(), *held["optimizer"].values()]
            assert len(held["optimizer"]) == len(held["params"]) == 8  # momentum
            assert {(e["type"], e["dtype"]) for e in entries} == {
                ("DTensor", "torch.float32")
            }
        rows = mixed["history"]
        assert rows[1]["train_loss"] < rows[0]["train_loss"]
        assert rows[-1]["valid_loss"] < 0.5 * mixed["start"]


class TestSharding:
    def test_parameters_and_optimizer_state_are_sharded(self, fsdp_run):
        """Each parameter and AdamW state tensor is a DTensor split between the ranks, each holding part of it."""
        ranks = fsdp_run["fit"]["sharding"]
        assert len(ranks) == 2
        for kind, expected in (("params", 8), ("optimizer", 16)):
            names = ranks[0][kind].keys()
            assert len(names) == expected and ranks[1][kind].keys() == names
            for name in names:
                held = [r[kind][name] for r in ranks]
                total = held[0]["total"]
                assert [h["type"] for h in held] == ["DTensor", "DTensor"], name
                assert sum(h["local"] for h in held) == total, name
                assert all(0 < h["local"] < total for h in held), name
        # Most elements are halved exactly; the 3-row output layer splits 2/1.
        assert [r["params"]["3.bias"]["local"] for r in ranks] == [2, 1]
