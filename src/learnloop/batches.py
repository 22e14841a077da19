"""The current batch and its two views: `xb` (the model's inputs) and `yb` (the loss's targets).

`Batches` is a part of `Learner` (a base class of it). Both habits of the course and of fastai
must reach the model from a `before_batch` hook: miniai replaces `learn.batch`, fastai sets
`learn.xb`/`learn.yb`. So `batch` is a property: setting it splits it (the first `n_inp` items
are inputs, the rest targets, None when there are none), and setting `xb` or `yb` rebuilds the
batch the next time it is read, so a callback later in the order (DeviceCB moving `learn.batch`)
keeps what an earlier one set.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from .errors import describe

__all__ = ["Batches"]


class Batches:
    """The Learner's part that holds `batch`, `xb` and `yb` and keeps them consistent."""

    n_inp: int
    xb: Any
    yb: Any

    @property
    def batch(self) -> Any:
        """The current batch. Setting it splits it into `xb` and `yb`; setting those rebuilds it."""
        if self.xb is not self._split_xb or self.yb is not self._split_yb:
            self._batch = self._join(self.xb, self.yb)
            self._split_xb, self._split_yb = self.xb, self.yb
        return self._batch

    @batch.setter
    def batch(self, batch: Any) -> None:
        self._batch = batch
        self.xb, self.yb, self._unsplit = self._split(batch)
        self._split_xb, self._split_yb = self.xb, self.yb

    def split_batch(self, batch: Any) -> tuple[Any, Any]:
        """`(xb, yb)` of `batch`: its first `n_inp` items (one, or a tuple), then the rest (None if none)."""
        xb, yb, why = self._split(batch)
        if why is not None:
            raise TypeError(why)
        return xb, yb

    def _resplit(self) -> None:
        """Split the batch again unless `xb`/`yb` were set: a hook may have changed it in place."""
        # A tuple cannot change in place: splitting it again gives the same xb and yb.
        if type(self._batch) is tuple:
            return
        if self.xb is self._split_xb and self.yb is self._split_yb:
            self.xb, self.yb, self._unsplit = self._split(self._batch)
            self._split_xb, self._split_yb = self.xb, self.yb

    def _split(self, batch: Any) -> tuple[Any, Any, str | None]:
        """`(xb, yb, None)` for `batch`, or `(None, None, why)` if it cannot be split.

        The loop raises `why` only after `before_batch`, so a hook there may still turn an
        unsplittable batch (a dict) into a tuple.
        """
        n = self.n_inp
        # (inputs, targets), the usual batch, split at once.
        if n == 1 and (type(batch) is tuple or type(batch) is list) and len(batch) == 2:
            return batch[0], batch[1], None
        if isinstance(batch, (tuple, list)) and len(batch) >= n:
            rest = batch[n:]
            yb = rest[0] if len(rest) == 1 else tuple(rest) if rest else None
            return (batch[0] if n == 1 else tuple(batch[:n])), yb, None
        if batch is None or (n == 1 and isinstance(batch, Tensor)):
            return batch, None, None  # inputs only (a loader over a bare tensor)
        if isinstance(batch, dict):
            why = (
                f"Batches must be (inputs, targets) tuples, got a dict with keys {list(batch)}: "
                "pass collate_fn=collate_dict(dataset) to the DataLoader, or use DataLoaders.from_dd."
            )
        else:
            why = (
                f"Batches must be tuples or lists of inputs then targets, got {describe(batch)} "
                f"(n_inp={n}, so at least {n} items): yield (x, y) from your DataLoader, set "
                "Learner(n_inp=...) to the number of model inputs, or replace learn.batch in "
                "before_batch."
            )
        return None, None, why

    def _join(self, xb: Any, yb: Any) -> tuple[Any, ...]:
        """The batch that `xb` and `yb` (set by a hook) make, checked against `n_inp`."""
        n = self.n_inp
        if n == 1:
            if xb is None:
                raise TypeError(
                    "learn.xb was set to None: set it to the model's inputs (a tensor)."
                )
            xs: tuple[Any, ...] = (xb,)
        elif isinstance(xb, (tuple, list)) and len(xb) == n:
            xs = tuple(xb)
        else:
            raise TypeError(
                f"learn.xb must be a tuple of the model's {n} inputs (n_inp={n}), but a hook "
                f"set it to {describe(xb)}: set all {n}, e.g. learn.xb = (x1, x2)."
            )
        ys = () if yb is None else yb if isinstance(yb, tuple) else (yb,)
        return (*xs, *ys)
