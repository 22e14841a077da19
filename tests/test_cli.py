"""The `learnloop train` command, which loads data through the batched path."""

from __future__ import annotations

from image_helpers import image_dataset

from learnloop.cli import main, train


def test_train_digits(tmp_path):
    """The default run on the embedded digits passes 95% validation accuracy and writes its files."""
    row = train(epochs=2, out=str(tmp_path))
    assert row["accuracy"] >= 0.95
    assert (tmp_path / "loss.png").exists() and (tmp_path / "model.pt").exists()


def test_train_png_parquet(tmp_path):
    """PNG images from local parquet files are decoded and trained on, as (N, 1, H, W) inputs."""
    image_dataset(12).to_parquet(tmp_path / "train.parquet")
    image_dataset(6).to_parquet(tmp_path / "test.parquet")
    row = train(data=str(tmp_path), epochs=1, bs=4, out=str(tmp_path / "run"))
    assert 0 <= row["accuracy"] <= 1


def test_missing_validation_split(tmp_path, capsys):
    """Data without a validation split fails with exit code 2 and the list of splits."""
    image_dataset(4).to_parquet(tmp_path / "train.parquet")
    assert main(["train", "--data", str(tmp_path), "--out", str(tmp_path / "run")]) == 2
    assert "splits ['train']" in capsys.readouterr().err
