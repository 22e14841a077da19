"""collate_dict, inplace and the check on transforms that return None."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader

from learnloop.data import DataLoaders, collate_dict, inplace
from learnloop.data.hf import class_names


class TestInplace:
    def test_returns_batch(self):
        """An in-place function decorated with @inplace returns the batch it edited, keeping its name."""

        @inplace
        def tfm(b):
            b["x"] = 1

        assert tfm({"x": 0}) == {"x": 1} and tfm.__name__ == "tfm"


class TestCollateDict:
    def test_tuples_in_feature_order(self, hf_dataset):
        """Dict rows become a tuple of batched tensors in the dataset's feature order."""
        ds = hf_dataset.with_format("torch")
        x, y = next(iter(DataLoader(ds, batch_size=4, collate_fn=collate_dict(ds))))
        assert x.shape == (4, 8, 8) and y.tolist() == [0, 1, 2, 0]

    def test_columns_pick_and_order(self, hf_dataset):
        """`columns` picks and orders the columns."""
        ds = hf_dataset.with_format("torch")
        (y,) = collate_dict(columns=["label"])([ds[0], ds[1]])
        assert y.tolist() == [0, 1]

    def test_missing_column(self, hf_dataset):
        """A row lacking an expected column fails naming it and listing the row's columns."""

        def rename(b):
            return {"pixels": b["image"], "label": b["label"]}

        ds = hf_dataset.with_format("torch").with_transform(rename)
        with pytest.raises(
            KeyError,
            match=r"expects column 'image'.*have columns \['pixels', 'label'\]",
        ):
            collate_dict(hf_dataset)([ds[0], ds[1]])

    def test_different_sizes(self):
        """Items of different shapes fail naming the item's position and both shapes."""
        rows = [
            {"x": torch.zeros(1, 4, 4)},
            {"x": torch.zeros(1, 4, 4)},
            {"x": torch.zeros(1, 5, 4)},
        ]
        with pytest.raises(
            ValueError,
            match=r"item 2 of the batch has shape \(1, 5, 4\), but item 0 has \(1, 4, 4\)",
        ):
            collate_dict(columns=["x"])(rows)

    def test_pil_images(self):
        """PIL images fail with a message pointing at a transform or the batched path."""
        from PIL import Image

        with pytest.raises(TypeError, match="PIL images.*with_transform.*batched=True"):
            collate_dict(columns=["x"])([{"x": Image.new("L", (2, 2))}])

    def test_needs_features_or_columns(self):
        """Without a dataset or columns there is nothing to order by."""
        with pytest.raises(TypeError, match="columns="):
            collate_dict()


def test_transform_returning_none(hf_dataset):
    """A with_transform function that returns None fails saying so, suggesting `return b` or @inplace."""

    def to_float(b):
        b["image"] = [torch.tensor(x).float() for x in b["image"]]

    dd = {"train": hf_dataset.with_transform(to_float), "test": hf_dataset}
    dls = DataLoaders.from_dd(_DD(dd), 4)
    with pytest.raises(
        TypeError, match=r"to_float .*returned None.*`return b`.*@inplace"
    ):
        next(iter(dls.train))
    fixed = _DD(
        {"train": hf_dataset.with_transform(inplace(to_float)), "test": hf_dataset}
    )
    x, _ = next(iter(DataLoaders.from_dd(fixed, 4).train))
    assert x.dtype == torch.float32


class _DD(dict):
    """A dict of splits stands in for a DatasetDict."""


def test_class_names(hf_dataset):
    """The names of the ClassLabel feature, or None without one."""
    assert class_names(hf_dataset.features) == ["a", "b", "c"]
    assert class_names({}) is None
