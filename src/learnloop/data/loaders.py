"""`DataLoaders`: the pair of training and validation loaders a `Learner` iterates over."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

__all__ = ["DataLoaders"]


class DataLoaders:
    """Holds a training and a validation loader: any iterables of batches (torch DataLoaders).

    Example:
        >>> import torch
        >>> from torch.utils.data import DataLoader, TensorDataset
        >>> ds = TensorDataset(torch.randn(8, 3), torch.arange(8) % 2)
        >>> dls = DataLoaders(DataLoader(ds, batch_size=4, shuffle=True), DataLoader(ds, batch_size=8))
        >>> len(dls.train), len(dls.valid)
        (2, 1)
    """

    def __init__(self, train: Iterable[Any], valid: Iterable[Any] | None = None) -> None:
        for name, dl in (("train", train), ("valid", valid)):
            if dl is not None and not isinstance(dl, Iterable):
                raise TypeError(
                    f"DataLoaders {name} must be an iterable of batches (a torch DataLoader), "
                    f"got {type(dl).__name__}."
                )
        self.train = train
        self.valid = valid

    def __repr__(self) -> str:
        def size(dl: Any) -> str:
            return "None" if dl is None else f"{type(dl).__name__}({_len(dl)} batches)"

        return f"DataLoaders(train={size(self.train)}, valid={size(self.valid)})"


def _len(dl: Any) -> str:
    try:
        return str(len(dl))
    except TypeError:
        return "?"
