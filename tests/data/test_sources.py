"""Loading local data as a DatasetDict: parquet, arrow, save_to_disk folders and image folders."""

from __future__ import annotations

import pytest

datasets = pytest.importorskip("datasets")

from learnloop.data import load_data, load_local


@pytest.fixture
def small(hf_dataset):
    """Twelve rows of the in-memory image dataset."""
    return hf_dataset.select(range(12))


def test_parquet_file(small, tmp_path):
    """A single parquet file loads as the 'train' split with its features."""
    small.to_parquet(tmp_path / "data.parquet")
    dd = load_local(tmp_path / "data.parquet")
    assert list(dd) == ["train"] and dd["train"].num_rows == 12
    assert dd["train"].features["label"].names == ["a", "b", "c"]


@pytest.mark.parametrize(
    ("names", "splits"),
    [
        (["train.parquet", "test.parquet"], {"train": 12, "test": 12}),
        (
            [
                "train-00000-of-00002.parquet",
                "train-00001-of-00002.parquet",
                "valid.parquet",
            ],
            {"train": 24, "validation": 12},
        ),
        (
            ["data/train/part.parquet", "data/val/part.parquet"],
            {"train": 12, "validation": 12},
        ),
    ],
)
def test_parquet_folder_splits(small, tmp_path, names, splits):
    """In a folder, a file's split comes from its name's prefix or a parent folder's name."""
    for name in names:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        small.to_parquet(tmp_path / name)
    dd = load_local(tmp_path)
    assert {k: v.num_rows for k, v in dd.items()} == splits


def test_arrow_files(small, tmp_path):
    """Arrow files (as `save_to_disk` writes them) load by split from a folder and one by one."""
    small.save_to_disk(tmp_path / "saved")
    arrow = next((tmp_path / "saved").glob("*.arrow"))
    (tmp_path / "arrows").mkdir()
    for name in ("train.arrow", "test.arrow"):
        (tmp_path / "arrows" / name).write_bytes(arrow.read_bytes())
    dd = load_local(tmp_path / "arrows")
    assert {k: v.num_rows for k, v in dd.items()} == {"train": 12, "test": 12}
    assert load_local(tmp_path / "arrows" / "test.arrow")["train"].num_rows == 12


@pytest.mark.parametrize("as_dict", [True, False])
def test_save_to_disk(small, tmp_path, as_dict):
    """A `save_to_disk` folder loads back as a DatasetDict (a lone Dataset becomes 'train')."""
    obj = (
        datasets.DatasetDict(train=small, test=small.select(range(4)))
        if as_dict
        else small
    )
    obj.save_to_disk(tmp_path / "saved")
    dd = load_data(str(tmp_path / "saved"))
    assert isinstance(dd, datasets.DatasetDict)
    assert dd["train"].num_rows == 12 and (not as_dict or dd["test"].num_rows == 4)


def test_image_folder(tmp_path):
    """An image folder (split/class/file.png) loads with an Image column and class labels."""
    from PIL import Image

    for split in ("train", "test"):
        for cls in ("cat", "dog"):
            (tmp_path / split / cls).mkdir(parents=True)
            for i in range(2):
                Image.new("L", (6, 6), color=i * 50).save(
                    tmp_path / split / cls / f"{i}.png"
                )
    dd = load_local(tmp_path)
    assert set(dd) == {"train", "test"} and dd["train"].num_rows == 4
    assert dd["train"].features["label"].names == ["cat", "dog"]
    assert dd["train"][0]["image"].size == (6, 6)


def test_missing_and_empty(tmp_path):
    """A missing path and a folder with no data fail with messages saying so."""
    with pytest.raises(FileNotFoundError, match="No such file or folder"):
        load_local(tmp_path / "nope")
    with pytest.raises(ValueError, match="Found no parquet, arrow or image files"):
        load_local(tmp_path)
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(ValueError, match="expected one of .parquet"):
        load_local(tmp_path / "x.txt")


def test_load_data_digits():
    """'digits' is the embedded dataset, with train and test splits."""
    assert set(load_data("digits")) == {"train", "test"}
