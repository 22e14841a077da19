"""Preemption: a signal in `Learner.preempt_signals` stops the fit at a batch boundary, saves, cleans up."""

from __future__ import annotations

import csv
import io
import logging
import os
import signal
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import pytest
import torch
from helpers import TESTS, make_data
from preempt_script import train
from torch import nn
from torch.utils.data import DataLoader

import learnloop
from learnloop import (
    Callback,
    CheckpointCB,
    DataLoaders,
    DeviceCB,
    Learner,
    MetricsCB,
    Preempted,
    atomic,
)
from learnloop.checkpoint import read_checkpoint

pytestmark = pytest.mark.skipif(
    not hasattr(signal, "SIGUSR1"), reason="needs POSIX signals"
)

SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)
N_EPOCHS = 3
# make_learner's loaders: 96 training rows in batches of 16, 48 validation rows in batches of 32.
TRAIN_BATCHES, VALID_BATCHES = 6, 2


@pytest.fixture(autouse=True)
def delivered():
    """SIGTERM, SIGUSR1 and SIGUSR2 go to a recorder during the test, never to pytest's handlers.

    A signal the learner does not catch lands here (so a bug fails the test instead of killing
    the run); the list holds what reached the recorder. The old handlers come back after.
    """
    seen: list[int] = []

    def record(signum, frame):
        seen.append(signum)

    old = {s: signal.signal(s, record) for s in SIGNALS}
    yield seen
    for s, handler in old.items():
        signal.signal(s, handler)


def make_learner(seed: int = 0, cbs=()) -> Learner:
    """A dropout MLP on shuffled data, SGD with momentum; `seed` sets the init."""
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Linear(4, 16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 3)
    )
    train = DataLoader(make_data(96), batch_size=16, shuffle=True)
    dls = DataLoaders(train, DataLoader(make_data(48, seed=1), batch_size=32))
    return Learner(
        model,
        dls,
        lr=0.1,
        opt_func=partial(torch.optim.SGD, momentum=0.9),
        default_cbs=False,
        cbs=[DeviceCB("cpu"), MetricsCB(), *cbs],
    )


def weights(learn: Learner) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in learn.model.state_dict().items()}


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key, value in a.items():
        assert torch.equal(value, b[key]), key


class SignalAt(Callback):
    """Sends this process `sig` (a real signal) in after_batch of epoch `epoch`, batch `batch` of `phase`."""

    def __init__(self, epoch: int, batch: int, sig=signal.SIGTERM, phase="train"):
        self.epoch, self.batch, self.sig, self.phase = epoch, batch, sig, phase
        self.sent = False

    def after_batch(self, learn, *args, **kwargs):
        phase = "train" if learn.training else "valid"
        if (learn.epoch, learn.iter, phase) == (self.epoch, self.batch, self.phase):
            self.sent = True
            signal.raise_signal(self.sig)


class Witness(Callback):
    """Records the fit-level events and each finished epoch's row (without its time)."""

    def __init__(self) -> None:
        self.events: list[str] = []
        self.rows: dict[int, dict] = {}

    def after_cancel_fit(self, learn, *args, **kwargs):
        self.events.append("after_cancel_fit")

    def after_fit(self, learn, *args, **kwargs):
        self.events.append("after_fit")

    def after_epoch(self, learn, epoch, **kwargs):
        self.rows[epoch] = {k: v for k, v in learn.epoch_log.items() if k != "time"}


# Witness runs after MetricsCB has built the row.
Witness.order = MetricsCB.order + 1


@pytest.fixture(scope="module")
def uninterrupted() -> tuple[dict, dict]:
    """The final weights and the epoch rows of an uninterrupted N_EPOCHS fit."""
    witness = Witness()
    learn = make_learner(0, cbs=[witness])
    learn.fit(N_EPOCHS)
    return weights(learn), witness.rows


def resume_auto(folder: Path) -> tuple[Learner, Witness]:
    """A new learner (other init) that continues the run in `folder` with fit(N_EPOCHS, resume='auto')."""
    witness = Witness()
    learn = make_learner(123, cbs=[CheckpointCB(folder), witness])
    learn.fit(N_EPOCHS, resume="auto")
    return learn, witness


class TestPreempted:
    @pytest.mark.parametrize(
        ("epoch", "batch"),
        [(1, 2), (0, 0), (1, TRAIN_BATCHES - 1), (N_EPOCHS - 1, TRAIN_BATCHES - 1)],
        ids=["middle", "first-batch", "epoch-end", "fit-end"],
    )
    def test_sigterm_saves_mid_epoch_and_resumes_exactly(
        self, tmp_path, delivered, uninterrupted, epoch, batch
    ):
        """SIGTERM at a training batch: code 143, last.pt at the next batch, cleanup ran, handlers back, exact resume."""
        before = {s: signal.getsignal(s) for s in SIGNALS}
        witness, ckpt = Witness(), tmp_path / "ckpt"
        learn = make_learner(
            0, cbs=[CheckpointCB(ckpt), witness, SignalAt(epoch, batch)]
        )
        with pytest.raises(Preempted) as info:
            learn.fit(N_EPOCHS)
        e = info.value
        assert isinstance(e, SystemExit) and e.code == 143
        assert e.signum == signal.SIGTERM and e.checkpoint == ckpt / "last.pt"
        assert e.where == f"epoch {epoch}, training batch {batch}"
        assert "resume='auto'" in str(e) and str(ckpt / "last.pt") in str(e)
        position = read_checkpoint(ckpt / "last.pt")["position"]
        assert (position["epoch"], position["phase"], position["batches"]) == (
            epoch,
            "train",
            batch + 1,
        )
        assert witness.events == ["after_cancel_fit", "after_fit"]
        assert {s: signal.getsignal(s) for s in SIGNALS} == before
        assert delivered == []  # acted on: not passed on to the old handler

        resumed, rows = resume_auto(ckpt)
        assert resumed.resumed_from == ckpt / "last.pt"
        final, full_rows = uninterrupted
        assert_same_weights(weights(resumed), final)
        # The interrupted epoch's row carries on from the saved sums.
        assert rows.rows == {e: full_rows[e] for e in range(epoch, N_EPOCHS)}

    def test_preempted_twice_in_one_epoch(self, tmp_path, uninterrupted):
        """A resumed fit preempted again inside the same epoch resumes exactly again."""
        ckpt = tmp_path / "ckpt"
        for seed, cbs in ((0, [SignalAt(1, 1)]), (7, [SignalAt(1, 4)])):
            learn = make_learner(seed, cbs=[CheckpointCB(ckpt), *cbs])
            with pytest.raises(Preempted):
                learn.fit(N_EPOCHS, resume="auto")
        assert read_checkpoint(ckpt / "last.pt")["position"]["batches"] == 5
        resumed, rows = resume_auto(ckpt)
        final, full_rows = uninterrupted
        assert_same_weights(weights(resumed), final)
        assert rows.rows == {e: full_rows[e] for e in (1, 2)}

    @pytest.mark.parametrize(
        ("sig", "code"),
        [(signal.SIGTERM, 143), (signal.SIGUSR1, 138)],
        ids=["TERM", "USR1"],
    )
    def test_exit_code_is_128_plus_the_signal(self, tmp_path, sig, code):
        """Each default preemption signal stops the fit with exit status 128 + its number."""
        learn = make_learner(cbs=[CheckpointCB(tmp_path), SignalAt(0, 1, sig)])
        with pytest.raises(Preempted) as info:
            learn.fit(2)
        assert info.value.code == code and info.value.signum == sig

    def test_empty_preempt_signals_catches_nothing(self, tmp_path, delivered):
        """preempt_signals = (): SIGTERM reaches the handler that was there, and the fit runs to its end."""
        learn = make_learner(cbs=[CheckpointCB(tmp_path), SignalAt(0, 1)])
        learn.preempt_signals = ()
        learn.fit(2)
        assert delivered == [signal.SIGTERM]
        assert learn.epochs_done == 2
        assert read_checkpoint(tmp_path / "last.pt").get("position") is None

    def test_custom_signal_tuple(self, tmp_path, delivered):
        """preempt_signals = (SIGUSR2,): SIGUSR2 preempts (code 140), SIGTERM is left to its handler."""
        term = SignalAt(0, 0)
        learn = make_learner(cbs=[CheckpointCB(tmp_path), term])
        learn.preempt_signals = (signal.SIGUSR2,)
        learn.fit(1)
        assert term.sent and delivered == [signal.SIGTERM]
        learn = make_learner(
            cbs=[CheckpointCB(tmp_path / "b"), SignalAt(0, 1, signal.SIGUSR2)]
        )
        learn.preempt_signals = (signal.SIGUSR2,)
        with pytest.raises(Preempted) as info:
            learn.fit(2)
        assert info.value.code == 128 + signal.SIGUSR2
        assert delivered == [signal.SIGTERM]

    @pytest.mark.parametrize("batch", [0, VALID_BATCHES - 1], ids=["first", "last"])
    def test_signal_in_validation(self, tmp_path, uninterrupted, batch):
        """A signal at a validation batch saves a 'valid' position; the resumed fit reruns validation, exactly."""
        ckpt = tmp_path / "ckpt"
        learn = make_learner(
            0, cbs=[CheckpointCB(ckpt), SignalAt(1, batch, phase="valid")]
        )
        with pytest.raises(Preempted) as info:
            learn.fit(N_EPOCHS)
        assert info.value.where == f"epoch 1, validation batch {batch}"
        position = read_checkpoint(ckpt / "last.pt")["position"]
        assert (position["epoch"], position["phase"], position["batches"]) == (
            1,
            "valid",
            TRAIN_BATCHES,
        )
        resumed, rows = resume_auto(ckpt)
        final, full_rows = uninterrupted
        assert_same_weights(weights(resumed), final)
        assert rows.rows == {e: full_rows[e] for e in (1, 2)}

    def test_without_checkpoint_cb(self, caplog):
        """No CheckpointCB: Preempted all the same, with checkpoint None, a warning, and after_fit run."""
        witness = Witness()
        learn = make_learner(cbs=[witness, SignalAt(0, 3)])
        with (
            caplog.at_level(logging.WARNING, logger="learnloop"),
            pytest.raises(Preempted) as info,
        ):
            learn.fit(2)
        assert info.value.checkpoint is None and info.value.code == 143
        assert "nothing was saved" in str(info.value)
        assert witness.events == ["after_cancel_fit", "after_fit"]
        warned = [
            r.getMessage() for r in caplog.records if r.levelno == logging.WARNING
        ]
        assert any(
            "SIGTERM arrived at epoch 0, training batch 3" in m
            and "no CheckpointCB is attached" in m
            for m in warned
        ), warned

    @pytest.mark.parametrize("event", ["after_epoch", "after_fit"])
    def test_signal_too_late_goes_to_the_old_handler(self, tmp_path, delivered, event):
        """A signal after the last batch is not acted on: the fit ends normally, then the old handler gets it."""
        seen_during_fit = []

        class Late(Callback):
            order = CheckpointCB.order + 1

            def after_epoch(self, learn, epoch, **kwargs):
                if event == "after_epoch" and epoch == 1:
                    signal.raise_signal(signal.SIGTERM)
                    seen_during_fit.append(list(delivered))

            def after_fit(self, learn, *args, **kwargs):
                if event == "after_fit":
                    signal.raise_signal(signal.SIGTERM)
                    seen_during_fit.append(list(delivered))

        learn = make_learner(cbs=[CheckpointCB(tmp_path), Late()])
        learn.fit(2)  # no Preempted
        assert seen_during_fit == [[]]  # held by the learner while the fit ran
        assert delivered == [signal.SIGTERM]
        assert learn.epochs_done == 2
        assert read_checkpoint(tmp_path / "last.pt")["epochs_done"] == 2


class SignallingFile(io.BufferedWriter):
    """A real temporary file that sends this process SIGTERM on its 3rd write (inside torch.save)."""

    def __init__(self, path: Path) -> None:
        super().__init__(io.FileIO(path, "xb"))
        self.writes = 0

    def write(self, data) -> int:
        self.writes += 1
        if self.writes == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return super().write(data)


def test_second_sigterm_during_the_save(tmp_path, monkeypatch, delivered):
    """A second SIGTERM while last.pt is written: the new last.pt is written whole, nothing is left over."""
    opened, plain = [], atomic._open_temp

    def open_temp(tmp):
        # The signal lands in the first attempt only; the retry is undisturbed.
        opened.append(SignallingFile(tmp) if not opened else plain(tmp))
        return opened[-1]

    class SignalAndPatch(SignalAt):
        def after_batch(self, learn, *args, **kwargs):
            if (learn.epoch, learn.iter, learn.training) == (1, 2, True):
                monkeypatch.setattr(atomic, "_open_temp", open_temp)
            super().after_batch(learn)

    learn = make_learner(cbs=[CheckpointCB(tmp_path), SignalAndPatch(1, 2)])
    with pytest.raises(Preempted) as info:
        learn.fit(N_EPOCHS)
    assert len(opened) == 2 and opened[0].writes >= 3  # the first write was stopped
    assert info.value.code == 143 and delivered == []
    ck = read_checkpoint(tmp_path / "last.pt")
    assert ck["position"]["epoch"] == 1 and ck["position"]["batches"] == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pt", "last.pt"]


class TestResumeAuto:
    def test_first_start_is_fresh_then_a_restart_resumes(self, tmp_path):
        """resume='auto' with no last.pt starts fresh; the same call later resumes from last.pt."""
        first = make_learner(0, cbs=[CheckpointCB(tmp_path)])
        first.fit(2, resume="auto")
        assert first.resumed_from is None and first.epochs_done == 2
        epochs = []

        class Epochs(Callback):
            def before_epoch(self, learn, epoch, **kwargs):
                epochs.append(epoch)

        again = make_learner(5)
        again.fit(N_EPOCHS, cbs=[CheckpointCB(tmp_path), Epochs()], resume="auto")
        assert again.resumed_from == tmp_path / "last.pt"
        assert epochs == [2] and again.epochs_done == N_EPOCHS

    def test_without_checkpoint_cb_is_an_error(self):
        """resume='auto' needs a CheckpointCB to know where last.pt is: ValueError naming it."""
        learn = make_learner()
        with pytest.raises(ValueError, match="resume='auto'.*CheckpointCB"):
            learn.fit(1, resume="auto")
        assert learn.epochs_done == 0


# ---------------------------------------------------------------- a real process
SCRIPT = Path(__file__).with_name("preempt_script.py")
SRC = str(Path(learnloop.__file__).parents[1])


def start_script(folder: Path, *args: str, session: bool = False) -> subprocess.Popen:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([SRC, os.environ.get("PYTHONPATH", "")]),
    }
    return subprocess.Popen(
        [sys.executable, str(SCRIPT), str(folder), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=session,  # its own process group, to signal as SLURM does
    )


def finish(proc: subprocess.Popen, timeout: float = 60) -> tuple[str, str]:
    try:
        return proc.communicate(timeout=timeout)
    finally:
        proc.kill()


def wait_for_training(proc: subprocess.Popen, marker: Path) -> None:
    """Wait until the script has written `marker` (training under way); fail if it died or stalled."""
    deadline = time.monotonic() + 60
    while not marker.exists():
        assert proc.poll() is None, finish(proc)
        assert time.monotonic() < deadline, "the script never started training"
        time.sleep(0.01)


def csv_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_sigterm_to_a_training_process(tmp_path):
    """A real process sent SIGTERM exits 143 quietly, saved mid-epoch; rerun with resume='auto' it ends as if never stopped."""
    run, full = tmp_path / "run", tmp_path / "full"
    proc = start_script(run)
    # The uninterrupted run, here while the process starts (no delay: the numbers do not depend on it).
    train(full, delay=0.0)
    wait_for_training(proc, run / "started")
    proc.send_signal(signal.SIGTERM)
    _, err = finish(proc)
    assert proc.returncode == 143, err
    assert "Traceback" not in err, err
    ck = read_checkpoint(run / "ckpt" / "last.pt")
    position = ck["position"]
    assert position is not None and position["phase"] in ("train", "valid")
    rows = csv_rows(run / "history.csv")
    # One row per finished epoch, each once, none for the interrupted one.
    assert [int(r["epoch"]) for r in rows] == list(range(position["epoch"]))
    assert all(r["train_loss"] and r["valid_loss"] for r in rows)

    resumed = start_script(run, "--resume", "auto")
    _, err = finish(resumed)
    assert resumed.returncode == 0 and "Traceback" not in err, err
    assert_same_weights(
        torch.load(run / "final.pt", weights_only=True),
        torch.load(full / "final.pt", weights_only=True),
    )
    # The interrupted epoch's row carries on from the saved sums; time is the only difference.
    assert drop_time(csv_rows(run / "history.csv")) == drop_time(
        csv_rows(full / "history.csv")
    )


def drop_time(rows: list[dict[str, str]]) -> list[dict[str, str]]:
    return [{k: v for k, v in r.items() if k != "time"} for r in rows]


def test_sigterm_to_the_whole_process_group_with_loader_workers(tmp_path):
    """SLURM signals every process of a job: with DataLoader workers in the group too, the fit
    still stops at a batch boundary, saves, and exits 143 (torch's workers die on a SIGTERM their
    parent did not send, which failed the main process anywhere, a checkpoint write included)."""
    run = tmp_path / "run"
    proc = start_script(run, "--workers", "2", session=True)
    wait_for_training(proc, run / "started")
    os.killpg(proc.pid, signal.SIGTERM)
    _, err = finish(proc)
    assert proc.returncode == 143, err
    assert "Traceback" not in err and "killed by signal" not in err, err
    position = read_checkpoint(run / "ckpt" / "last.pt")["position"]
    assert position is not None and position["epoch"] == 1
    # And it resumes exactly, workers and all.
    resumed = start_script(run, "--workers", "2", "--resume", "auto")
    _, err = finish(resumed)
    assert resumed.returncode == 0 and "Traceback" not in err, err
    full = train(tmp_path / "full", delay=0.0, workers=2)
    assert_same_weights(
        torch.load(run / "final.pt", weights_only=True), full.model.state_dict()
    )


WORKERS_FIT = """
import torch
from torch import nn
from torch.utils.data import DataLoader
from helpers import make_data
from learnloop import Callback, DataLoaders, Learner

class Boom(Callback):
    def after_batch(self, learn, iter, **kwargs):
        if {fail} and learn.training and iter == 3:
            raise RuntimeError("boom")

torch.manual_seed(0)
train = DataLoader(make_data(256), batch_size=16, num_workers=2, persistent_workers={persistent})
Learner(nn.Linear(4, 3), DataLoaders(train, DataLoader(make_data(64), batch_size=32)), cbs=Boom()).fit(2)
print("fit done", flush=True)
"""


@pytest.mark.parametrize(
    ("persistent", "fail", "code"),
    [(True, False, 0), (False, True, 1), (True, True, 1)],
)
def test_a_fit_with_loader_workers_lets_the_interpreter_exit(persistent, fail, code):
    """The workers ignore SIGTERM (preemption), which is how multiprocessing ends daemon workers at
    exit. Persistent ones are shut down at exit, and those of a phase that failed (the kept
    traceback holds them) when it fails: the script exits instead of waiting for them forever."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([SRC, str(TESTS)])}
    script = WORKERS_FIT.format(persistent=persistent, fail=fail)
    done = subprocess.run(
        [sys.executable, "-c", script],
        check=False,
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert done.returncode == code, done.stderr[-2000:]
    assert ("boom" in done.stderr) == fail and ("fit done" in done.stdout) != fail
