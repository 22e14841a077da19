"""The `learnloop train` command: the main job, end to end, offline."""

from __future__ import annotations

import signal
import subprocess
import sys

import pytest
from image_helpers import image_dataset

from learnloop import Callback, cli
from learnloop.checkpoint import read_checkpoint
from learnloop.cli import main, train


def test_default_run_trains_digits(tmp_path, capsys):
    """The default run reaches at least 95% validation accuracy and writes the plot and the weights."""
    assert main(["train", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    accuracy = float(out.split("final validation accuracy:")[1].split()[0])
    assert accuracy >= 0.95
    assert (tmp_path / "loss.png").stat().st_size > 5000
    import torch

    state = torch.load(tmp_path / "model.pt", weights_only=True)
    assert any(k.endswith("weight") for k in state)


@pytest.mark.parametrize("model", ["mlp", "linear"])
def test_other_models(tmp_path, model):
    """--model picks another architecture, which trains too."""
    assert (
        main(["train", "--model", model, "--epochs", "2", "--out", str(tmp_path)]) == 0
    )
    assert (tmp_path / "model.pt").exists()


def test_bad_data_is_a_clear_error(tmp_path, capsys):
    """A path that does not exist and is no hub dataset gives a one-line error and exit code 2."""
    missing = tmp_path / "nope" / "data.parquet"
    assert (
        main(["train", "--data", str(missing), "--out", str(tmp_path), "--epochs", "1"])
        == 2
    )
    assert "Could not load" in capsys.readouterr().err


def test_console_script_runs(tmp_path):
    """`python -m learnloop.cli train` runs as a process and prints one plain line per epoch to a pipe."""
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "learnloop.cli",
            "train",
            "--epochs",
            "2",
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "\r" not in result.stdout
    assert result.stdout.splitlines()[0].split() == [
        "epoch",
        "train_loss",
        "valid_loss",
        "accuracy",
        "time",
    ]


def test_train_png_parquet(tmp_path):
    """PNG images from local parquet files go through the batched path and train as (N, 1, H, W) inputs."""
    image_dataset(12).to_parquet(tmp_path / "train.parquet")
    image_dataset(6).to_parquet(tmp_path / "test.parquet")
    row = train(data=str(tmp_path), epochs=1, bs=4, out=str(tmp_path / "run"))
    assert 0 <= row["accuracy"] <= 1


def test_missing_validation_split(tmp_path, capsys):
    """Data without a validation split fails with exit code 2 and the list of splits."""
    image_dataset(4).to_parquet(tmp_path / "train.parquet")
    assert main(["train", "--data", str(tmp_path), "--out", str(tmp_path / "run")]) == 2
    assert "splits ['train']" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (["--lr", "nan"], "--lr must be a finite number > 0, got nan"),
        (["--lr", "inf"], "--lr must be a finite number > 0, got inf"),
        (["--threads", "-3"], "--threads must be 0"),
        (["--epochs", "0"], "--epochs must be at least 1"),
        (["--bs", "abc"], "argument --bs: invalid int value"),
    ],
)
def test_usage_errors_are_one_line(tmp_path, capsys, args, match):
    """A bad option value exits with status 2 and one line on stderr, before any training."""
    with pytest.raises(SystemExit) as info:
        main(["train", *args, "--out", str(tmp_path)])
    assert info.value.code == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("learnloop: error: ")
    assert match in lines[0]
    assert captured.out == ""


def test_out_is_checked_before_training(tmp_path, capsys):
    """--out naming a file fails at once with exit 2, before the data is loaded or an epoch runs."""
    blocker = tmp_path / "taken"
    blocker.write_text("not a folder")
    assert main(["train", "--epochs", "1", "--out", str(blocker)]) == 2
    captured = capsys.readouterr()
    assert "is a file, not a folder" in captured.err
    assert "epoch" not in captured.out  # no table: nothing was trained
    assert blocker.read_text() == "not a folder"


def test_train_checks_out_first(tmp_path):
    """The Python entry point refuses an --out it cannot write into before training."""
    blocker = tmp_path / "taken"
    blocker.write_text("")
    with pytest.raises(
        NotADirectoryError, match="cannot write to --out .*Not a directory"
    ):
        train(epochs=1, out=str(blocker / "sub"))


class SignalAt(Callback):
    """Sends this process SIGTERM (a real signal) in after_batch of training batch `batch` of `epoch`."""

    def __init__(self, epoch: int, batch: int) -> None:
        self.epoch, self.batch = epoch, batch

    def after_batch(self, learn, *args, **kwargs):
        if learn.training and (learn.epoch, learn.iter) == (self.epoch, self.batch):
            signal.raise_signal(signal.SIGTERM)


def train_cmd(options: str, out) -> list[str]:
    """`learnloop train` arguments: `options` split at spaces, then `--out out`."""
    return ["train", *options.split(), "--out", str(out)]


def epochs_shown(stdout: str) -> list[str]:
    """The epochs of the table's rows in `stdout`."""
    return [
        line.split()[0] for line in stdout.splitlines() if line[:9].strip().isdigit()
    ]


def assert_same_state(a, b) -> None:
    import torch

    sa, sb = torch.load(a, weights_only=True), torch.load(b, weights_only=True)
    assert sa.keys() == sb.keys()
    for key, value in sa.items():
        assert torch.equal(value, sb[key]), key


@pytest.mark.skipif(not hasattr(signal, "SIGUSR1"), reason="needs POSIX signals")
class TestResume:
    @pytest.fixture(autouse=True)
    def sigterm_recorded(self):
        """SIGTERM goes to a recorder during the test (a bug fails it instead of killing pytest)."""
        seen: list[int] = []
        old = signal.signal(signal.SIGTERM, lambda n, f: seen.append(n))
        yield seen
        signal.signal(signal.SIGTERM, old)

    def test_auto_starts_then_continues_after_a_preemption(
        self, tmp_path, monkeypatch, capsys, sigterm_recorded
    ):
        """--resume auto: a fresh first start; SIGTERM exits 143 with one line; the same command continues exactly."""
        assert main(train_cmd("--epochs 2 --model mlp", tmp_path / "ref")) == 0
        capsys.readouterr()
        out = tmp_path / "run"
        argv = train_cmd("--epochs 2 --model mlp --resume auto", out)
        real_build = cli.build

        def build_with_signal(*args, **kwargs):
            learn, net = real_build(*args, **kwargs)
            learn.add_cbs(SignalAt(1, 2))
            return learn, net

        monkeypatch.setattr(cli, "build", build_with_signal)
        assert main(argv) == 143
        captured = capsys.readouterr()
        assert epochs_shown(captured.out) == ["0"]
        assert captured.err.splitlines() == [
            (
                "learnloop: stopped by SIGTERM at epoch 1, training batch 2; saved "
                f"{out / 'checkpoints' / 'last.pt'}: run the same command to continue"
            )
        ]
        assert not (out / "model.pt").exists() and sigterm_recorded == []

        monkeypatch.setattr(cli, "build", real_build)
        assert main(argv) == 0
        assert epochs_shown(capsys.readouterr().out) == ["1"]
        assert_same_state(out / "model.pt", tmp_path / "ref" / "model.pt")

        (out / "model.pt").unlink()
        assert main(argv) == 0  # a restart after the end: the files are written again
        assert capsys.readouterr().out.startswith(
            "nothing left to train: the checkpoint holds 2 epochs (--epochs 2)\n"
        )
        assert_same_state(out / "model.pt", tmp_path / "ref" / "model.pt")

    def test_resume_path_and_save_every_steps(self, tmp_path, monkeypatch, capsys):
        """--save-every-steps writes last.pt every N batches; --resume PATH continues from a checkpoint."""
        from learnloop import CheckpointCB

        saved_at, save_last = [], CheckpointCB.save_last

        def spy(self, learn):
            saved_at.append(learn.iter)
            return save_last(self, learn)

        monkeypatch.setattr(CheckpointCB, "save_last", spy)
        first = tmp_path / "first"
        assert (
            main(train_cmd("--epochs 1 --model linear --save-every-steps 3", first))
            == 0
        )
        assert saved_at and all((i + 1) % 3 == 0 for i in saved_at)
        assert read_checkpoint(first / "checkpoints" / "last.pt")["epochs_done"] == 1
        capsys.readouterr()

        second = tmp_path / "second"
        argv = train_cmd("--epochs 2 --model linear", second)
        assert main([*argv, "--resume", str(first / "checkpoints")]) == 0
        assert epochs_shown(capsys.readouterr().out) == ["1"]
        assert read_checkpoint(second / "checkpoints" / "last.pt")["epochs_done"] == 2
        # A fresh start over that run's checkpoints is refused, before any training.
        assert main([*argv, "--save-every-steps", "3"]) == 2
        captured = capsys.readouterr()
        assert captured.out == "" and len(captured.err.splitlines()) == 1
        assert (
            "holds an earlier run" in captured.err and "--resume auto" in captured.err
        )

    @pytest.mark.parametrize(
        ("path", "match"),
        [
            ("nope.pt", "--resume nope.pt: No checkpoint at nope.pt"),
            (".", "--resume .: . is a folder without last.pt"),
        ],
        ids=["missing", "folder-without-last.pt"],
    )
    def test_bad_resume_path(self, tmp_path, monkeypatch, capsys, path, match):
        """A --resume path with no checkpoint: exit 2 and one line, before the data is loaded."""
        monkeypatch.chdir(tmp_path)
        monkeypatch.setattr(cli, "build", None)  # calling it would fail: not reached
        assert main(train_cmd(f"--resume {path}", "run")) == 2
        captured = capsys.readouterr()
        lines = captured.err.splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"learnloop: error: {match}")
        assert captured.out == ""

    def test_resume_from_another_model(self, tmp_path, capsys):
        """A checkpoint of another --model: exit 2 and one line naming the mismatch, nothing trained."""
        assert main(train_cmd("--epochs 1 --model linear --resume auto", tmp_path)) == 0
        capsys.readouterr()
        assert main(train_cmd("--epochs 2 --model mlp --resume auto", tmp_path)) == 2
        captured = capsys.readouterr()
        lines = captured.err.splitlines()
        assert len(lines) == 1 and "does not fit" in lines[0] and captured.out == ""

    @pytest.mark.parametrize("n", ["0", "-2"])
    def test_save_every_steps_must_be_positive(self, tmp_path, capsys, n):
        """--save-every-steps below 1 is a usage error: exit 2, one line, nothing run."""
        with pytest.raises(SystemExit) as info:
            main(train_cmd(f"--save-every-steps {n}", tmp_path))
        assert info.value.code == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert lines == [
            (
                f"learnloop: error: --save-every-steps must be at least 1, got {n} "
                "(see learnloop train --help)"
            )
        ]
