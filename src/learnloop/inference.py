"""What `learn.predict(x)` needs besides the model: is `x` one item or a batch, and where the model is.

The notebook step "try it on this image" passes one item, as the dataset yields it, without the
batch dimension; a small batch works too. They are told apart by the number of dimensions of one
input item, read once from the loaders: from the dataset's first item when it is a tensor
(cheap), else from the first batch (which includes the loader's own transforms).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

from .tensors import map_tensors

__all__ = ["item_batch", "item_ndim", "model_device"]

Split = Callable[[Any], tuple[Any, Any, Any]]


def model_device(model: nn.Module) -> torch.device:
    """The device of `model`'s first parameter (or buffer); the CPU for a model with neither."""
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


def _first_input(xb: Any, n_inp: int) -> Tensor | None:
    first = (
        xb if n_inp == 1 else (xb[0] if isinstance(xb, (tuple, list)) and xb else None)
    )
    return first if isinstance(first, Tensor) else None


def item_ndim(loaders: Iterable[Any], split: Split, n_inp: int) -> int | None:
    """Dimensions of one input item (the first input when `n_inp > 1`), or None if unknown.

    `split` turns a batch (or a dataset item, which has the same layout) into `(xb, yb, _)`.
    """
    loaders = [dl for dl in loaders if dl is not None]
    for dl in loaders:  # a map-style dataset of tensors: one item, no batch fetched
        dataset = getattr(dl, "dataset", None)
        try:
            item = dataset[0]  # type: ignore[index]
        except (TypeError, IndexError, KeyError, NotImplementedError):
            item = None  # no dataset, an iterable one, or an empty one
        if isinstance(item, (tuple, list)):
            first = _first_input(split(item)[0], n_inp)
            if first is not None:
                return first.dim()
    for dl in loaders:
        batch = next(iter(dl), None)
        first = _first_input(split(batch)[0], n_inp)
        if first is not None and first.dim() > 0:
            return first.dim() - 1
    return None


def item_batch(x: Any) -> Any:
    """One item `x` (a tensor, or a tuple of them for several inputs) as a batch of one."""
    return map_tensors(lambda t: t.unsqueeze(0), x)
