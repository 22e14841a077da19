"""DataLoaders.from_dd, from_datasets and show_batch."""

from __future__ import annotations

import pytest
import torch
from image_helpers import image_dataset
from torch import nn
from torch.utils.data import TensorDataset

from learnloop import Accuracy, Learner, MetricsCB
from learnloop.data import DataLoaders, Normalize, RandomFlip, load_digits, load_local

datasets = pytest.importorskip("datasets")


@pytest.fixture
def dd(hf_dataset):
    """A DatasetDict of 30 train and 12 test rows (8x8 uint8 images, 3 classes)."""
    return datasets.DatasetDict(
        train=hf_dataset.with_format("torch"),
        test=hf_dataset.select(range(12)).with_format("torch"),
    )


@pytest.mark.parametrize("batched", [False, True])
class TestFromDD:
    def test_batches(self, dd, batched):
        """Batches are (image, label) tuples; valid batches are twice as large and in order."""
        dls = DataLoaders.from_dd(dd, 4, batched=batched)
        x, y = next(iter(dls.valid))
        assert x.shape == (8, 8, 8) and y.tolist() == [i % 3 for i in range(8)]
        assert len(dls.train) == 8 and len(dls.valid) == 2

    def test_train_shuffled(self, dd, batched):
        """The training loader draws a new order each epoch."""
        dls = DataLoaders.from_dd(dd, 30, batched=batched)
        orders = [next(iter(dls.train))[0].flatten(1)[:, 0].tolist() for _ in range(2)]
        assert orders[0] != orders[1]

    def test_missing_split(self, dd, batched):
        """A split name that does not exist fails listing the splits."""
        with pytest.raises(
            KeyError, match=r"No split named 'valid'.*splits \['train', 'test'\]"
        ):
            DataLoaders.from_dd(dd, 4, batched=batched, valid="valid")
        with pytest.raises(
            ValueError, match=r"No validation split.*splits \['train'\]"
        ):
            DataLoaders.from_dd(
                datasets.DatasetDict(train=dd["train"]), 4, batched=batched
            )

    def test_options_pass_through(self, dd, batched):
        """DataLoader options reach the loaders; drop_last applies to training only."""
        dls = DataLoaders.from_dd(
            dd,
            8,
            batched=batched,
            drop_last=True,
            num_workers=1,
            persistent_workers=True,
        )
        assert (
            dls.train.num_workers == dls.valid.num_workers == 1
            and dls.train.persistent_workers
        )
        assert len(dls.train) == 3 and len(dls.valid) == 1
        assert sum(len(b[1]) for b in dls.valid) == 12


def test_batched_tfms_and_train_only(dd):
    """batch_tfms run on each batch; those marked train_only are left off the validation loader."""
    flip = RandomFlip(p=1.0)
    dls = DataLoaders.from_dd(
        dd, 12, batched=True, batch_tfms=[Normalize(0.0, 2.0), flip]
    )
    x, _ = next(iter(dls.valid))
    assert x.dtype == torch.float32
    assert torch.equal(x[0], dd["test"][0]["image"].float() / 2)
    assert dls.train.dataset.tfms[-1] is flip and flip not in dls.valid.dataset.tfms


def test_argument_conflicts(dd):
    """collate_fn with batched=True, and batch_tfms without it, are refused with the fix."""
    with pytest.raises(ValueError, match="mutually exclusive"):
        DataLoaders.from_dd(dd, 4, collate_fn=list, batched=True)
    with pytest.raises(ValueError, match="batch_tfms needs batched=True"):
        DataLoaders.from_dd(dd, 4, batch_tfms=[Normalize(0, 1)])
    with pytest.raises(TypeError, match="needs a DatasetDict"):
        DataLoaders.from_dd(dd["train"], 4)


def test_batched_images_from_files(png_dir, tmp_path):
    """PNG images from parquet files arrive decoded as uint8 (N, 1, H, W) batches."""
    dls = DataLoaders.from_dd(
        load_local(png_dir, cache_dir=str(tmp_path / "cache")), 4, batched=True
    )
    x, y = next(iter(dls.valid))
    assert (
        x.shape == (4, 1, 5, 6)
        and x.dtype == torch.uint8
        and y.tolist() == [0, 1, 0, 1]
    )


def test_different_sizes_per_item():
    """On the per-item path, images of different sizes in one batch fail naming the item and both shapes."""
    ds = image_dataset(4, odd=1).with_format("torch")
    dls = DataLoaders.from_dd(datasets.DatasetDict(train=ds, test=ds), 4)
    with pytest.raises(
        ValueError,
        match=r"item 1 of the batch has shape \(1, 5, 7\), but item 0 has \(1, 5, 6\)",
    ):
        next(iter(dls.valid))


def test_from_datasets():
    """Plain torch datasets get a shuffled train loader and a valid loader with twice the batch size."""
    ds = TensorDataset(torch.arange(20.0), torch.arange(20))
    dls = DataLoaders.from_datasets(ds, ds, 5)
    assert len(dls.train) == 4 and len(dls.valid) == 2
    assert next(iter(dls.valid))[1].tolist() == list(range(10))


def test_learner_trains_on_batched_digits():
    """A Learner reaches high accuracy on the embedded digits through the batched path."""

    def add_channel(b):
        b["image"] = b["image"].unsqueeze(1)
        return b

    dls = DataLoaders.from_dd(
        load_digits(), 64, batched=True, batch_tfms=[Normalize(5.0, 6.0), add_channel]
    )
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    learn = Learner(model, dls, lr=0.1, cbs=[MetricsCB(Accuracy())], default_cbs=False)
    learn.fit(3)
    assert learn.epoch_log["accuracy"] > 0.9


def test_show_batch_titles(dd):
    """show_batch draws n images titled with their class names, on the figure it returns."""
    pytest.importorskip("matplotlib")
    dls = DataLoaders.from_dd(dd, 30, batched=True)
    fig = dls.show_batch(n=4)
    titles = [ax.get_title() for ax in fig.axes if ax.images]
    assert len(titles) == 4 and set(titles) <= {"a", "b", "c"}
