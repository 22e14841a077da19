"""FSDP sharded checkpoints are exact and safe: 2-process torchrun runs (gloo, CPU), checked here
and in this one plain process.

Two torchrun launches of tests/sharded_script.py (see its docstring) make the 2-process runs, a
few seconds each, most of it starting torch twice: `--mode first` trains a reference run never
stopped, saves twice with `learn.save`, crashes a run mid-epoch and SIGKILLs another inside a
checkpoint write; `--mode resume` resumes those two and runs the refusal, plain-to-sharded and
other-model checks. Everything else runs in this process on the folders they wrote: loading
into one process, export, half-written and damaged folders.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import TESTS, torchrun_env
from sharded_script import CRASH_AT, EPOCHS, make_learner
from torch import nn

from learnloop import MetricsCB
from learnloop.checkpoint import checkpoint_path, latest_checkpoint
from learnloop.fsdp import optimizer_to_fqn
from learnloop.sharded import export_model

SCRIPT = TESTS / "sharded_script.py"
SHARDED_FILES = {".metadata", "learner.pt", "__0_0.distcp", "__1_0.distcp"}


def torchrun(out: Path, mode: str) -> subprocess.CompletedProcess[str]:
    """`torchrun --standalone --nproc-per-node=2 sharded_script.py out --mode <mode>`, to its end."""
    env = torchrun_env()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    cmd += ["--nproc-per-node=2", str(SCRIPT), str(out), "--mode", mode]
    return subprocess.run(
        cmd, check=False, cwd=out, env=env, capture_output=True, text=True, timeout=90
    )


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """The folder both launches wrote into; the crash and kill folders as they were left are
    copied to crash-left and kill-left before the resume launch changes them."""
    out = tmp_path_factory.mktemp("sharded")
    # The single-process file the resume launch loads into 2 processes.
    plain = make_learner(
        None, bs=16, accum=False, dropout=0.0, shuffle=False, fsdp=False
    )
    plain.fit(1)
    plain.save(out / "plain.pt")
    first = torchrun(out, "first")
    # It ends SIGKILLed (exit code -9) inside the kill run's second checkpoint write.
    died = first.returncode != 0 and "exitcode: -9" in first.stderr
    assert died and (out / "first.json").is_file(), first.stderr[-3000:]
    for name in ("crash", "kill"):
        shutil.copytree(out / name, out / f"{name}-left")
    second = torchrun(out, "resume")
    assert second.returncode == 0, second.stderr[-3000:]
    return out


def results(out: Path) -> dict[str, Any]:
    """What rank 0 wrote in both launches."""
    found = {}
    for mode in ("first", "resume"):
        found.update(json.loads((out / f"{mode}.json").read_text()))
    return found


def states(out: Path, name: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The full weights and optimizer state (keyed by parameter name) rank 0 saved as `name`."""
    weights = torch.load(out / f"{name}.pt", weights_only=True)
    return weights, torch.load(out / f"{name}-opt.pt", weights_only=True)


def tensors(tree: Any, prefix: str = "") -> dict[str, torch.Tensor]:
    """Every tensor in `tree` by its path of keys."""
    if isinstance(tree, torch.Tensor):
        return {prefix: tree}
    if isinstance(tree, (list, tuple)):
        tree = dict(enumerate(tree))
    found: dict[str, torch.Tensor] = {}
    for k, v in tree.items() if isinstance(tree, dict) else ():
        found.update(tensors(v, f"{prefix}/{k}"))
    return found


def assert_bitwise(a: Any, b: Any) -> None:
    a, b = tensors(a), tensors(b)
    assert a.keys() == b.keys() and a
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"differ in {differ}"


def plain_states(learn) -> tuple[dict[str, Any], dict[str, Any]]:
    """An unsharded learner's weights and optimizer state keyed by parameter name, copied."""
    opt = optimizer_to_fqn(learn.model, learn.opt, learn.opt.state_dict())
    weights = {k: v.clone() for k, v in learn.model.state_dict().items()}
    state = {k: {n: t.clone() for n, t in v.items()} for k, v in opt["state"].items()}
    return weights, {"state": state}


def learner_file(folder: Path) -> dict[str, Any]:
    """The learnloop state a sharded folder holds beside the shards."""
    return torch.load(folder / "learner.pt", weights_only=True)


def layout(folder: Path) -> dict[str, set[str]]:
    """The entries of a CheckpointCB folder, each with the files it holds."""
    return {p.name: {f.name for f in p.iterdir()} for p in folder.iterdir()}


def assert_one_last_one_best(folder: Path) -> None:
    """Exactly one last-NNNNNN and one best-NNNNNN folder, each complete; nothing else (no .tmp)."""
    found = layout(folder)
    assert sorted(re.sub(r"\d{6}$", "N", n) for n in found) == ["best-N", "last-N"]
    assert all(files == SHARDED_FILES for files in found.values()), found


class TestExactResume:
    def test_crash_mid_epoch_then_auto_resume_is_bitwise(self, runs):
        """A run that raised on every rank mid-epoch, rerun with `fit(3, resume="auto")`, ends
        with the weights, optimizer state and metrics history of a run never stopped."""
        res = results(runs)
        assert res["crash"] == [f"crash at step {CRASH_AT}, as asked"] * 2
        # every_steps=3 made step 9 (epoch 1, batch 3) due, inside a GradAccumCB(2) group whose
        # gradients FSDP holds: the write waited for the group's end, after 4 batches.
        left = runs / "crash-left"
        last = latest_checkpoint(left)
        at = learner_file(last)["position"]
        assert (at["epoch"], at["phase"], at["batches"]) == (1, "train", 4)
        assert_one_last_one_best(left)
        # Each rank's own generators are in it (the ranks draw different dropout masks).
        mine = [r["rng"]["torch"] for r in learner_file(last)["rng_ranks"]]
        assert len(mine) == 2 and not torch.equal(mine[0], mine[1])
        assert res["crash-resumed-start"] == [[1, 4, True]] * 2
        assert_bitwise(states(runs, "crash-resumed"), states(runs, "full"))
        assert res["crash-resumed-history"] == res["full-history"]
        assert len(res["full-history"]) == EPOCHS


class TestLayoutAndAtomicity:
    def test_folder_after_fit(self, runs):
        """After a fit, CheckpointCB's folder holds one complete last and one best folder, with a
        shard file per process, and nothing else; the newest last is the one taken."""
        full = runs / "full"
        assert_one_last_one_best(full)
        (last,) = full.glob("last-*")
        assert latest_checkpoint(full) == checkpoint_path(full) == last
        assert learner_file(last)["epochs_done"] == EPOCHS

    def test_half_written_folders_are_never_taken(self, runs, tmp_path):
        """A hidden .tmp folder and numbered folders lacking .metadata or learner.pt (newer than
        the complete one) are passed over; of complete ones, the highest number is taken."""
        (done,) = (runs / "full").glob("last-*")
        ck = tmp_path / "ck"
        shutil.copytree(done, ck / "last-000003")
        shutil.copytree(done, ck / ".last-000099.tmp")
        for name, missing in (
            ("last-000099", ".metadata"),
            ("last-000098", "learner.pt"),
        ):
            shutil.copytree(done, ck / name)
            (ck / name / missing).unlink()
        assert latest_checkpoint(ck) == checkpoint_path(ck) == ck / "last-000003"
        learn = make_learner(None, fsdp=False, seed=1)
        learn.load(ck)
        assert_bitwise(learn.model.state_dict(), states(runs, "full")[0])
        shutil.copytree(done, ck / "last-000010")
        assert latest_checkpoint(ck) == ck / "last-000010"

    def test_killed_writer_then_auto_resume(self, runs):
        """Both processes SIGKILLed inside a write leave a hidden, half-written .tmp folder;
        `resume="auto"` takes the last complete folder and ends bitwise as the run never stopped,
        and the next write clears the leftover."""
        left = runs / "kill-left"
        # every_steps=1 with GradAccumCB(2): writes after steps 2 and 4; killed in the second,
        # once the shards and the index were written, before learner.pt.
        assert layout(left) == {
            "last-000001": SHARDED_FILES,
            ".last-000002.tmp": SHARDED_FILES - {"learner.pt"},
        }
        assert latest_checkpoint(left) == left / "last-000001"
        assert learner_file(left / "last-000001")["position"]["batches"] == 2
        res = results(runs)
        assert res["kill-resumed-start"] == [[0, 2, True]] * 2
        assert_bitwise(states(runs, "kill-resumed"), states(runs, "full"))
        assert res["kill-resumed-history"] == res["full-history"]
        assert_one_last_one_best(runs / "kill")


class TestWorldSizeChange:
    @pytest.mark.parametrize("fsdp", [False, True], ids=["plain", "fsdp-unsharded"])
    def test_two_process_folder_loads_in_one_process(self, runs, fsdp, caplog):
        """A folder 2 processes wrote loads into one plain process (no torchrun; with
        DistributedCB(strategy="fsdp") it runs unsharded): the full weights and optimizer
        state, and training continues from there."""
        learn = make_learner(None, fsdp=fsdp, seed=1)
        learn.load(runs / "full")
        weights, opt = states(runs, "full")
        assert_bitwise(plain_states(learn), (weights, {"state": opt["state"]}))
        assert learn.epochs_done == EPOCHS
        assert ("single process" in caplog.text) == fsdp
        learn.fit(EPOCHS + 1, resume=runs / "full")
        history = [
            {k: v for k, v in r.items() if k != "time"}
            for r in next(cb for cb in learn.cbs if isinstance(cb, MetricsCB)).history
        ]
        assert history[:EPOCHS] == results(runs)["full-history"]
        assert len(history) == EPOCHS + 1
        assert not torch.equal(learn.model[0].weight, weights["0.weight"])

    def test_export_model(self, runs, tmp_path):
        """export_model turns the sharded folder into one plain state dict a bare model loads."""
        out = export_model(runs / "full", tmp_path / "model.pt")
        model = nn.Sequential(
            nn.Linear(4, 16), nn.ReLU(), nn.Dropout(), nn.Linear(16, 3)
        )
        model.load_state_dict(torch.load(out, weights_only=True))
        assert_bitwise(model.state_dict(), states(runs, "full")[0])

    def test_plain_file_loads_into_two_processes(self, runs):
        """A single-process learn.save file (model and AdamW state) resumed by 2 FSDP processes
        trains as one process resumed from it (the same global batch)."""
        assert results(runs)["from-plain-start"] == [[1, 0, True]] * 2
        single = make_learner(
            None, bs=16, accum=False, dropout=0.0, shuffle=False, fsdp=False
        )
        single.fit(EPOCHS, resume=runs / "plain.pt")
        weights, opt = states(runs, "from-plain")
        mine, my_opt = plain_states(single)
        for k, v in mine.items():
            torch.testing.assert_close(weights[k], v, rtol=0, atol=1e-6)
        for k, v in tensors(my_opt).items():
            torch.testing.assert_close(tensors(opt)[k], v, rtol=1e-5, atol=1e-6)


class TestBadInput:
    def test_other_model_is_refused_and_nothing_changes(self, runs):
        """A folder of another model raises ValueError naming the keys and shapes that differ,
        in 2 FSDP processes and in one; the learner's weights and optimizer state stay as they were."""
        shapes = "0.weight: file (16, 4) vs model (32, 4)"
        res = results(runs)
        assert all(m is not None and shapes in m for m in res["wrong"]), res["wrong"]
        assert_bitwise(states(runs, "wrong-before"), states(runs, "wrong-after"))
        learn = make_learner(None, width=32, fsdp=False)
        learn.fit(1)
        before = plain_states(learn)
        with pytest.raises(ValueError, match=re.escape(shapes)):
            learn.load(runs / "full")
        assert_bitwise(plain_states(learn), before)

    @pytest.mark.parametrize(
        "damage, error",
        [
            ("truncate learner.pt", ValueError),
            ("truncate .metadata", ValueError),
            ("truncate __1_0.distcp", ValueError),
            ("delete .metadata", FileNotFoundError),
        ],
    )
    def test_damaged_folder_is_refused_and_nothing_changes(
        self, runs, tmp_path, damage, error
    ):
        """A damaged folder raises an error naming it; the learner is left as it was."""
        (last,) = (runs / "full").glob("last-*")
        folder = shutil.copytree(last, tmp_path / "damaged")
        how, name = damage.split()
        if how == "delete":
            (folder / name).unlink()
        else:
            data = (folder / name).read_bytes()
            (folder / name).write_bytes(data[: len(data) // 2])
        learn = make_learner(None, fsdp=False, seed=1)
        learn.fit(1)
        before = plain_states(learn)
        with pytest.raises(error, match=re.escape(str(folder))):
            learn.load(folder)
        assert_bitwise(plain_states(learn), before)

    def test_fresh_fit_into_a_sharded_run_is_refused(self, runs):
        """A fresh FSDP fit into a folder holding a sharded run raises FileExistsError on every
        rank (the script expects that type), rank 0's naming what is there; with overwrite=True
        it runs (and leaves one last and one best folder, see test_killed_writer)."""
        res = results(runs)
        assert "already holds an earlier run: last-" in res["refused"][0]
        assert "another process found an earlier run" in res["refused"][1]
        assert res["refused-start"] == [[0, 0, False]] * 2
        assert res["refused-epochs"] == 1


class TestSave:
    def test_save_twice_then_load_in_fresh_learner(self, runs):
        """learn.save under FSDP writes a sharded folder; a second save replaces it, leaving no
        .old or .tmp; a fresh 2-process learner loads it bitwise."""
        assert {p.name for p in (runs / "saved").iterdir()} == SHARDED_FILES
        assert [p.name for p in runs.iterdir() if p.name.startswith(".")] == []
        saved = states(runs, "saved")
        assert_bitwise(states(runs, "loaded"), saved)
        first = states(runs, "saved-first")[0]
        assert not torch.equal(first["0.weight"], saved[0]["0.weight"])
        assert results(runs)["loaded-epochs"] == [1, 1]
