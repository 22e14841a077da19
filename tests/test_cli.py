"""The `learnloop train` command: the main job, end to end, offline."""

from __future__ import annotations

import subprocess
import sys

import pytest
from image_helpers import image_dataset

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
