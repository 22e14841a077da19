"""Long runs under torchrun (gloo on CPU): mid-epoch resume, an elastic restart, two "nodes",
preemption, and a checkpoint resumed with another number of processes.

Every run is a real `torchrun` of tests/long_run_script.py on free ports; the 2-process runs seed
each rank's torch RNG its own way (`--rank-seeds`, so dropout differs between ranks and a resume
must give each rank its own generators back), and the final weights rank 0
saves are compared bitwise with an uninterrupted 2-process run (the two-node run with a
single-process run, closely: DDP's average is not the big batch's sum bit for bit). Each launch
costs a few seconds, most of it importing torch in every process.

The launcher's environment sets TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1: with the rendezvous store
shared (torch's default), a restarted group can read the dead group's gloo addresses from it and
hang or fail in init_process_group (pytorch/pytorch#135712).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import TESTS, torchrun_env
from long_run_script import make_learner

from learnloop import Callback

SCRIPT = TESTS / "long_run_script.py"
EPOCHS = 3
STEPS = 13  # training batches per epoch on each of 2 processes: 100 rows, batches of 8
TWO = ("--standalone", "--nproc-per-node=2")
SEEDS = "--rank-seeds"  # torch.manual_seed(100 + rank) in each process


def free_port() -> int:
    """A TCP port nobody listens on now."""
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def start(
    out: Path, args: list[str], launcher: tuple[str, ...] = TWO, log: str = "logs"
) -> subprocess.Popen[str]:
    """Start `torchrun <launcher> long_run_script.py out <args>`; workers' output goes to out/<log>."""
    env = torchrun_env()
    out.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", *launcher]
    cmd += ["--log-dir", str(out / log), "--redirects", "3", str(SCRIPT), str(out)]
    return subprocess.Popen(
        [*cmd, *args],
        cwd=out,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def finish(
    proc: subprocess.Popen[str], out: Path, log: str = "logs", rc: int | None = 0
) -> dict[str, str]:
    """Wait for `proc`; check its exit status (`rc`; None: any nonzero); return the workers' logs.

    The logs are keyed 'attempt_<n>/<local rank>/<stdout|stderr>.log'.
    """
    try:
        text, _ = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        text, _ = proc.communicate()
        pytest.fail(f"torchrun did not finish in 60 s:\n{text[-3000:]}")
    logs = {
        "/".join(p.parts[-3:]): p.read_text() for p in (out / log).rglob("std*.log")
    }
    failed = proc.returncode == 0 if rc is None else proc.returncode != rc
    assert not failed, (
        f"torchrun exit status {proc.returncode}:\n{text[-3000:]}\n{logs}"
    )
    return logs


def run(
    out: Path, args: list[str], launcher: tuple[str, ...] = TWO, rc: int | None = 0
) -> dict[str, str]:
    """Run torchrun to the end; see `start` and `finish`."""
    return finish(start(out, args, launcher), out, rc=rc)


def weights(out: Path) -> dict[str, torch.Tensor]:
    """The final weights rank 0 saved."""
    return torch.load(out / "weights.pt", weights_only=True)


def assert_bitwise(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"weights differ in {differ}"


def read_json(path: Path) -> dict:
    """What the script wrote at a fit's start or end."""
    return json.loads(path.read_text())


def position(ck: Path) -> dict:
    """The mid-epoch position a checkpoint holds (None between epochs)."""
    return torch.load(ck, weights_only=True)["position"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> dict[str, torch.Tensor]:
    """Final weights of 3 epochs on 2 processes, never stopped."""
    out = tmp_path_factory.mktemp("uninterrupted")
    run(out, ["--every-steps", "3", SEEDS])
    return weights(out)


@pytest.fixture(scope="module")
def crashed(tmp_path_factory) -> Path:
    """A 2-process run that raised on every rank at step 23 (epoch 1, batch 9); last.pt is from step 21.

    Rank 0 alone also wrote rank0.pt with `learn.save` after step 5, while rank 1 trained on.
    """
    out = tmp_path_factory.mktemp("crashed")
    run(out, ["--every-steps", "3", "--crash-at", "23", "--save-at", "5", SEEDS], rc=1)
    shutil.copy(out / "ck" / "last.pt", out / "step21.pt")
    return out


class TestMidEpochResume:
    def test_crash_then_auto_resume_is_bitwise(self, crashed, uninterrupted):
        """After a crash mid-epoch, `fit(3, resume="auto")` on 2 processes ends with the weights of a run never stopped."""
        ck = torch.load(crashed / "ck" / "last.pt", weights_only=True)
        at = ck["position"]
        assert (at["epoch"], at["phase"], at["batches"]) == (1, "train", 8)
        # Each rank's own generators, rank 0's also as `rng` (the ranks were seeded apart).
        mine = [r["rng"]["torch"] for r in ck["rng_ranks"]]
        assert len(mine) == 2 and not torch.equal(mine[0], mine[1])
        assert torch.equal(mine[0], ck["rng"]["torch"])
        run(crashed, ["--every-steps", "3", "--resume", "auto", SEEDS])
        for r in (0, 1):
            start = read_json(crashed / f"start{r}.json")
            assert start == {"epoch": 1, "iter": 8, "resumed": True}
        assert_bitwise(weights(crashed), uninterrupted)

    def test_rank0_alone_saves_inside_an_epoch(self, crashed, tmp_path):
        """`learn.save` on rank 0 alone mid-epoch does not wait for the others (the crashed run
        ended, within finish's timeout); the file holds rank 0's own state and loads."""
        ck = torch.load(crashed / "rank0.pt", weights_only=True)
        assert (ck["position"]["epoch"], ck["position"]["batches"]) == (0, 5)
        assert "rng_ranks" not in ck
        # Rank 0's own loss sums: its 5 batches of 8 rows, not both processes' 80.
        sums = ck["callbacks"]["MetricsCB"]["epoch"]
        assert sums["rows"] + sum(sums["counts"]) == 40
        learn = make_learner(tmp_path / "ck")
        with pytest.warns(UserWarning, match="number of processes changed"):
            learn.load(crashed / "rank0.pt")
        assert learn.epochs_done == 1


class TestElasticRestart:
    def test_restarted_group_resumes_bitwise(self, tmp_path, uninterrupted):
        """Rank 1 dies at step 17; torchrun --max-restarts=1 restarts both, which resume from step 16 to the same weights."""
        launcher = (*TWO, "--max-restarts=1")
        args = ["--every-steps", "2", "--resume", "auto", "--die-at", "17", SEEDS]
        logs = run(tmp_path, args, launcher)
        assert any(k.startswith("attempt_1/") for k in logs), sorted(logs)
        # The second attempt started inside epoch 1, after step 16 (3 batches into the epoch).
        for r in (0, 1):
            start = read_json(tmp_path / f"start{r}.json")
            assert start == {"epoch": 1, "iter": 16 - STEPS, "resumed": True}
        assert_bitwise(weights(tmp_path), uninterrupted)


class TestTwoNodes:
    def test_two_launchers_match_one_process(self, tmp_path):
        """Two single-process torchrun "nodes" (c10d rendezvous) train as one process with the doubled batch."""
        port, run_id = free_port(), f"two-nodes-{os.getpid()}"
        args = ["--epochs", "2", "--no-shuffle", "--dropout", "0"]
        procs = []
        for node in (0, 1):
            launcher = (
                "--nnodes=2",
                "--nproc-per-node=1",
                f"--node-rank={node}",
                "--rdzv-backend=c10d",
                f"--rdzv-endpoint=localhost:{port}",
                f"--rdzv-id={run_id}",
                f"--rdzv-conf=is_host={node == 0}",
            )
            procs.append(start(tmp_path, args, launcher, log=f"logs{node}"))
        for node, proc in enumerate(procs):
            finish(proc, tmp_path, log=f"logs{node}")
        learn = make_learner(None, bs=16, shuffle=False, dropout=0.0)
        learn.fit(2)
        single = learn.model.state_dict()
        two = weights(tmp_path)
        assert two.keys() == single.keys()
        for k, v in single.items():
            torch.testing.assert_close(two[k], v, rtol=0, atol=1e-6)


def preempt(out: Path, to_launcher: bool) -> dict:
    """Train slowly on 2 processes, send SIGTERM after step 3 to rank 1 (and to torchrun and rank 0:
    as SLURM sends it to every process of the job); check both stopped at one batch boundary with
    last.pt written there, quickly and without a timeout. Returns the checkpoint's position."""
    # 5 ms per row: about 45 ms per batch, so the signal lands early in epoch 0.
    args = ["--every-steps", "1000", "--delay", "0.005", "--marker-step", "3", SEEDS]
    proc = start(out, args)
    deadline = time.monotonic() + 30
    while not (out / "started").exists() and proc.poll() is None:
        assert time.monotonic() < deadline, "training did not start in 30 s"
        time.sleep(0.02)
    pids = [int((out / f"pid{r}").read_text()) for r in (0, 1)]
    sent = time.monotonic()
    for pid in [proc.pid, *pids] if to_launcher else [pids[1]]:
        os.kill(pid, signal.SIGTERM)
    logs = finish(proc, out, rc=None)
    assert time.monotonic() - sent < 15
    stderr = "\n".join(v for k, v in logs.items() if k.endswith("stderr.log"))
    for word in ("timeout", "timed out", "watchdog", "hang"):
        assert word not in stderr.lower(), stderr
    ends = [read_json(out / f"end{r}.json") for r in (0, 1)]
    assert ends[0] == ends[1] and ends[0]["training"]
    at = position(out / "ck" / "last.pt")
    assert (at["epoch"], at["phase"]) == (ends[0]["epoch"], "train")
    assert at["batches"] == ends[0]["iter"] + 1 < STEPS
    return at


class TestPreemption:
    def test_sigterm_to_one_worker(self, tmp_path, uninterrupted):
        """SIGTERM to rank 1 alone stops both ranks at one batch boundary with last.pt; resume='auto' then matches bitwise."""
        at = preempt(tmp_path, to_launcher=False)
        (tmp_path / "started").unlink()
        run(tmp_path, ["--every-steps", "1000", "--resume", "auto", SEEDS])
        assert read_json(tmp_path / "start1.json")["iter"] == at["batches"]
        assert_bitwise(weights(tmp_path), uninterrupted)

    def test_sigterm_to_every_process(self, tmp_path):
        """SIGTERM to torchrun and both workers at once (SLURM's way) stops both at one batch boundary with last.pt."""
        preempt(tmp_path, to_launcher=True)


class BatchesSeen(Callback):
    """Records, for each epoch a fit trains, its first training batch and how many it ran."""

    def __init__(self) -> None:
        self.seen: dict[int, list[int]] = {}

    def before_batch(self, learn, *args, **kwargs):
        if learn.training:
            self.seen.setdefault(learn.epoch, [learn.iter, 0])[1] += 1


class TestWorldSizeChange:
    def test_single_process_resumes_at_next_epoch(self, crashed, tmp_path):
        """A mid-epoch checkpoint of 2 processes, resumed by one plain process, warns and runs the next epoch whole."""
        seen = BatchesSeen()
        learn = make_learner(tmp_path / "ck", cbs=(seen,))
        with pytest.warns(UserWarning, match="number of processes changed") as caught:
            learn.fit(EPOCHS, resume=crashed / "step21.pt")
        assert len(caught) == 1
        assert "world_size 2 then, 1 now" in str(caught[0].message)
        # One process reads the 200 rows in 25 batches of 8.
        assert seen.seen == {2: [0, 25]}
        assert learn.epochs_done == EPOCHS
