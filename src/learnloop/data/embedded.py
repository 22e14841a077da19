"""The embedded dataset: 1,797 real 8x8 handwritten digits that install with the package.

It lets the main job, the examples and the tests run with no network. See
`_embedded/README.md` for its source and licence (UCI, CC BY 4.0).
"""

from __future__ import annotations

from importlib import resources
from typing import TYPE_CHECKING

from .quiet import import_datasets

if TYPE_CHECKING:
    from datasets import DatasetDict

__all__ = ["load_digits"]


def load_digits(test_size: float = 0.2, seed: int = 42) -> DatasetDict:
    """The digits as a Hugging Face `DatasetDict` with 'train' and 'test' splits.

    Columns: `image` (8x8 uint8, values 0..16) and `label` (ClassLabel '0'..'9'); the split
    is stratified by label and the same for the same `seed`.
    """
    import numpy as np

    import_datasets()  # quietly, the first time (see data/quiet.py)
    from datasets import Array2D, ClassLabel, Dataset, DatasetDict, Features

    if not 0 < test_size < 1:
        raise ValueError(f"test_size must be between 0 and 1, got {test_size}.")
    with resources.files(__package__).joinpath("_embedded/digits.npz").open("rb") as f:
        arrays = np.load(f)
        images, labels = arrays["images"], arrays["labels"]
    features = Features(
        {
            "image": Array2D(shape=(8, 8), dtype="uint8"),
            "label": ClassLabel(names=[str(i) for i in range(10)]),
        }
    )
    ds = Dataset.from_dict(
        {"image": images, "label": labels.astype("int64")}, features=features
    )
    split = ds.train_test_split(
        test_size=test_size, seed=seed, stratify_by_column="label"
    )
    return DatasetDict(train=split["train"], test=split["test"])
