"""`learn.predict(x)`: the model's output for one item or a small batch, the notebook's "try it on this".

`Inference` is a part of `Learner` (a base class of it). It runs the Learner's own step piece
`predict()` on `x`, so a subclass's forward (several inputs, a custom call) is honoured, in eval
mode and without autograd, and puts back the model's mode and the loop's state after.

One item (as a dataset yields it, without the batch dimension) and a batch are told apart by the
number of dimensions of one input item, read once from the first batch of the loaders: a batch
has been through the loader's collate function and batch transforms, as the model's inputs have.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from .callbacks.device import to_device
from .tensors import map_tensors

__all__ = ["Inference", "model_device"]

_UNKNOWN = -1  # the item's dimensions could not be read (no batch, or no tensor inputs)


def model_device(model: nn.Module) -> torch.device:
    """The device of `model`'s first parameter (or buffer); the CPU for a model with neither."""
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


def _as_input(x: Any) -> Any:
    """`x` as a model input: tensors and mappings as they are, numpy arrays and lists of numbers as tensors."""
    if isinstance(x, (Tensor, Mapping)):
        return x
    try:
        return torch.as_tensor(x)
    except (TypeError, ValueError, RuntimeError):
        raise TypeError(
            f"predict(x) takes a tensor, a numpy array, a list of numbers or a mapping of "
            f"tensors as each input, got {type(x).__name__}."
        ) from None


class Inference:
    """The Learner's part that runs the model on new inputs: `predict(x)`."""

    _item_dims: int | None = None  # what _item_ndim read (once)
    # Set by Learner.
    model: nn.Module
    dls: Any
    n_inp: int
    xb: Any
    yb: Any
    preds: Any

    def _infer(self, x: Any) -> Any:
        """`predict(x)`: the model's output for one item or a small batch `x`, detached, on the CPU."""
        x = self._inputs(x)
        first = x if self.n_inp == 1 else x[0]
        one = isinstance(first, Tensor) and first.dim() == self._item_ndim()
        if one:
            x = map_tensors(lambda t: t.unsqueeze(0), x)
        xb = to_device(x, model_device(self.model))
        saved = self._batch, self.xb, self.yb, self._unsplit, self.preds  # type: ignore[attr-defined]
        was_training = self.model.training
        try:
            self.model.eval()
            with torch.no_grad():
                self.batch = (xb,) if self.n_inp == 1 else tuple(xb)
                self.predict()  # type: ignore[attr-defined]  # the step piece, a subclass's own
                out = map_tensors(lambda t: t.detach().cpu(), self.preds)
        finally:
            self.model.train(was_training)
            self._batch, self.xb, self.yb, self._unsplit, self.preds = saved
            self._split_xb, self._split_yb = self.xb, self.yb
        return map_tensors(lambda t: t[0], out) if one else out

    def _inputs(self, x: Any) -> Any:
        """`x` checked against `n_inp` and converted (numpy, lists) to the model's inputs."""
        n = self.n_inp
        if n == 1:
            return _as_input(x)
        if not isinstance(x, (tuple, list)) or len(x) != n:
            raise TypeError(
                f"predict(x) with n_inp={n} takes a tuple of the model's {n} inputs, got "
                f"{type(x).__name__}{f' of {len(x)}' if isinstance(x, (tuple, list)) else ''}."
            )
        return tuple(_as_input(v) for v in x)

    def _item_ndim(self) -> int:
        """Dimensions of one input item (the first input's), read once from a batch; -1 if unknown."""
        if self._item_dims is None:
            self._item_dims = _UNKNOWN
            for dl in (self.dls.valid, self.dls.train):
                ndim = self._batch_ndim(dl)
                if ndim is not None:
                    self._item_dims = ndim - 1
                    break
        return self._item_dims

    def _batch_ndim(self, dl: Iterable[Any] | None) -> int | None:
        """Dimensions of the first input of `dl`'s first batch, or None."""
        batch = next(iter(dl), None) if dl is not None else None
        if batch is None:
            return None
        xb, _, why = self._split(batch)  # type: ignore[attr-defined]
        first = xb if self.n_inp == 1 else (xb[0] if why is None else None)
        return first.dim() if isinstance(first, Tensor) and first.dim() > 0 else None
