"""atomic_save: the target stays whole through Ctrl-C, a full disk and killed writers; nothing is left behind."""

from __future__ import annotations

import errno
import io
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch

import learnloop
from learnloop import atomic
from learnloop.atomic import STALE_AFTER_S, atomic_save
from learnloop.checkpoint import read_checkpoint

posix_only = pytest.mark.skipif(
    os.name != "posix", reason="needs POSIX signals and pids"
)
SRC = str(Path(learnloop.__file__).parents[1])


def child_env() -> dict[str, str]:
    """The environment for a child python that imports this learnloop."""
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([SRC, os.environ.get("PYTHONPATH", "")]),
    }


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


# ---------------------------------------------------------------- Ctrl-C while writing
class SignallingFile(io.BufferedWriter):
    """A real temporary file that sends this process `sigs` on its `at`-th write (inside torch.save)."""

    def __init__(self, path: Path, at: int, sigs: tuple[int, ...]) -> None:
        super().__init__(io.FileIO(path, "xb"))
        self.at, self.sigs, self.writes = at, sigs, 0

    def write(self, data) -> int:
        self.writes += 1
        if self.writes == self.at:
            for sig in self.sigs:
                os.kill(os.getpid(), sig)
        return super().write(data)


@posix_only
class TestCtrlC:
    def _signal_during_save(self, monkeypatch, tmp_path, sigs):
        path = tmp_path / "last.pt"
        atomic_save({"w": torch.zeros(1000)}, path)
        before = path.read_bytes()
        opened = []

        def open_temp(tmp):
            # Signals during the first attempt only: a retry is written undisturbed.
            opened.append(SignallingFile(tmp, 3, () if opened else sigs))
            return opened[-1]

        monkeypatch.setattr(atomic, "_open_temp", open_temp)
        return path, before

    @pytest.mark.parametrize("n", [1, 2], ids=["one", "two"])
    def test_ctrl_c_mid_write_is_a_keyboard_interrupt(self, monkeypatch, tmp_path, n):
        """SIGINT inside torch.save's write (once or twice): KeyboardInterrupt, old file whole, no temp file."""
        path, before = self._signal_during_save(
            monkeypatch, tmp_path, (signal.SIGINT,) * n
        )
        with pytest.raises(KeyboardInterrupt):
            atomic_save({"w": torch.ones(100_000)}, path)
        assert path.read_bytes() == before and leftovers(tmp_path) == []
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler

    def test_handler_that_returns_still_gets_the_file_written(
        self, monkeypatch, tmp_path
    ):
        """A custom SIGINT handler that returns is called once, and the save still happens."""
        path, _ = self._signal_during_save(monkeypatch, tmp_path, (signal.SIGINT,))
        calls = []
        old = signal.signal(signal.SIGINT, lambda n, f: calls.append(n))
        try:
            atomic_save({"w": torch.ones(100_000)}, path)
        finally:
            signal.signal(signal.SIGINT, old)
        assert calls == [signal.SIGINT]
        assert torch.equal(
            torch.load(path, weights_only=True)["w"], torch.ones(100_000)
        )
        assert leftovers(tmp_path) == []


CTRL_C_SCRIPT = textwrap.dedent(
    """
    import sys
    import torch
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset
    from learnloop import DataLoaders, Learner

    data = DataLoader(TensorDataset(torch.randn(8, 1000), torch.randn(8, 6000)))
    # A 24 MB checkpoint: writes long enough for a signal to land anywhere in them.
    learn = Learner(nn.Linear(1000, 6000), DataLoaders(data, data), default_cbs=False)
    learn.save(sys.argv[1])
    for line in sys.stdin:
        if line.strip() == "last":
            break
        print("saving", flush=True)
        try:
            while True:
                learn.save(sys.argv[1])
        except KeyboardInterrupt:
            print("KeyboardInterrupt", flush=True)
        except BaseException as e:
            print("ERROR", type(e).__name__, str(e).splitlines()[0][:150], flush=True)
    print("saving", flush=True)
    while True:
        learn.save(sys.argv[1])
    """
)


@posix_only
def test_ctrl_c_of_a_saving_process(tmp_path):
    """SIGINT at varied points of a loop of saves: always KeyboardInterrupt, the file always loads, no temp left."""
    script, path = tmp_path / "saver.py", tmp_path / "ck" / "last.pt"
    script.write_text(CTRL_C_SCRIPT)
    proc = subprocess.Popen(
        [sys.executable, str(script), str(path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=child_env(),
    )
    watchdog = threading.Timer(60, proc.kill)
    watchdog.start()
    try:
        outcomes = []
        for delay in (0.0, 0.005, 0.012, 0.02, 0.03, 0.045, 0.06, 0.08, 0.11, 0.15):
            proc.stdin.write("go\n")
            proc.stdin.flush()
            assert proc.stdout.readline() == "saving\n"
            time.sleep(delay)
            proc.send_signal(signal.SIGINT)
            outcomes.append(proc.stdout.readline().strip())
            assert read_checkpoint(path)["format"] == "learnloop.checkpoint"
            assert leftovers(path.parent) == []
        proc.stdin.write("last\n")
        proc.stdin.flush()
        assert proc.stdout.readline() == "saving\n"
        time.sleep(0.03)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    finally:
        watchdog.cancel()
        proc.kill()
    assert outcomes == ["KeyboardInterrupt"] * len(outcomes), outcomes
    assert (
        proc.returncode == -signal.SIGINT
    )  # Python re-raises an uncaught Ctrl-C as the signal
    assert "KeyboardInterrupt" in err and "RuntimeError" not in err
    assert read_checkpoint(path)["format"] == "learnloop.checkpoint"
    assert leftovers(path.parent) == []


# ---------------------------------------------------------------- a full disk
def open_dev_full(tmp: Path):
    """Create the real temporary file, but write to /dev/full: every write fails with ENOSPC."""
    open(tmp, "xb").close()
    return open("/dev/full", "wb")


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs Linux's /dev/full")
@pytest.mark.parametrize(
    "n", [100, 1_000_000], ids=["fails-at-flush", "fails-in-torch.save"]
)
def test_full_disk_says_so_and_keeps_the_old_file(monkeypatch, tmp_path, n):
    """ENOSPC: an OSError with errno ENOSPC naming the file, bytes needed and free; old file intact."""
    path = tmp_path / "last.pt"
    atomic_save({"w": torch.zeros(3)}, path)
    before = path.read_bytes()
    monkeypatch.setattr(atomic, "_open_temp", open_dev_full)
    with pytest.raises(OSError, match="No space left on device") as info:
        atomic_save({"w": torch.zeros(n)}, path)
    assert info.value.errno == errno.ENOSPC
    message = str(info.value)
    needed = "400 bytes" if n == 100 else "4.0 MB"
    assert f"Cannot write {path}" in message and f"needs about {needed}" in message
    assert f"{tmp_path} has " in message and " free" in message
    assert "the previous last.pt is intact" in message
    assert path.read_bytes() == before and leftovers(tmp_path) == []


# ---------------------------------------------------------------- temporary files of killed writers
KILLED_WRITER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from learnloop.atomic import _temp_path

    tmp = _temp_path(Path(sys.argv[1]))
    with open(tmp, "xb") as f:
        f.write(b"half a checkpoint" * 1000)
        f.flush()
        print(tmp.name, flush=True)
        time.sleep(60)
    """
)


def age(path: Path, seconds: float = 2 * STALE_AFTER_S) -> Path:
    """Set `path`'s modification time `seconds` into the past."""
    then = time.time() - seconds
    os.utime(path, (then, then))
    return path


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@posix_only
def test_temp_file_of_a_killed_writer_is_removed(tmp_path):
    """A writer killed mid-write leaves its temp file; the next write in the folder removes it."""
    proc = subprocess.Popen(
        [sys.executable, "-c", KILLED_WRITER, str(tmp_path / "last.pt")],
        stdout=subprocess.PIPE,
        text=True,
        env=child_env(),
    )
    name = proc.stdout.readline().strip()
    proc.kill()
    proc.communicate()
    assert name.startswith(f".last.pt.{proc.pid}-") and (tmp_path / name).exists()
    age(tmp_path / name)
    atomic_save({"x": torch.ones(1)}, tmp_path / "best.pt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pt"]


@posix_only
def test_only_stale_learnloop_temp_files_are_removed(tmp_path):
    """Dead-pid and legacy temp files idle for a while go; live, recent and foreign files stay."""
    dead = dead_pid()

    def make(name: str, idle: bool = True) -> Path:
        (tmp_path / name).touch()
        return age(tmp_path / name) if idle else tmp_path / name

    gone = [
        make(f".last.pt.{dead}-0123abcd.tmp"),
        make(".last.pt.89abcdef.tmp"),  # named by learnloop before pids
    ]
    kept = [
        make(f".last.pt.{os.getpid()}-0123abcd.tmp"),  # a live writer
        make(f".best.pt.{dead}-0123abcd.tmp", idle=False),
        make(".best.pt.89abcdef.tmp", idle=False),
        make(".notes.tmp"),
        make("x.tmp"),
        make(".last.pt.zzzzzzzz.tmp"),
        make(f"last.pt.{dead}-0123abcd.tmp"),
        make(f".last.pt.{dead}-0123abcd.tmp.bak"),
    ]
    (tmp_path / f".d.{dead}-0123abcd.tmp").mkdir()
    kept.append(age(tmp_path / f".d.{dead}-0123abcd.tmp"))  # a folder named like one
    atomic_save({"x": torch.ones(1)}, tmp_path / "last.pt")
    assert not any(p.exists() for p in gone)
    assert all(p.exists() for p in kept)
