"""Callbacks that shorten a fit while you debug it: one batch, or a few batches per phase."""

from __future__ import annotations

from typing import Any

from ..events import CancelFitException, CancelTrainException, CancelValidException
from .core import Callback

__all__ = ["LimitBatchesCB", "SingleBatchCB"]


class SingleBatchCB(Callback):
    """Stops the fit after its first batch, once every other callback's `after_batch` has run.

    Use it to check that a new model, loss or callback runs end to end in seconds.

    Example:
        >>> learn.fit(1, cbs=[SingleBatchCB()])  # doctest: +SKIP
    """

    order = 1000  # last, so the batch completes for every other callback first

    def after_batch(self, learn: Any, *args: Any, **kwargs: Any) -> None:
        raise CancelFitException("SingleBatchCB: stopping after one batch")


class LimitBatchesCB(Callback):
    """Runs at most `train` training batches and `valid` validation batches per epoch (None: all).

    The limited phase ends normally (its `after_train` / `after_validate` run), so metrics are
    computed over the batches that ran. Progress bars show the limited length.

    Example:
        >>> learn.fit(2, cbs=[LimitBatchesCB(train=5, valid=2)])  # doctest: +SKIP
    """

    # Before DeviceCB moves a batch that will not run, and before the bars are sized.
    order = -30

    def __init__(self, train: int | None = None, valid: int | None = None) -> None:
        for name, n in (("train", train), ("valid", valid)):
            if n is not None and (not isinstance(n, int) or n < 1):
                raise ValueError(
                    f"LimitBatchesCB {name} must be None or an int >= 1 (batches), got {n!r}."
                )
        self.train, self.valid = train, valid

    def _limit(self, learn: Any) -> int | None:
        return self.train if learn.training else self.valid

    def _shorten(self, learn: Any) -> None:
        limit = self._limit(learn)
        if limit is not None and learn.n_iter is not None:
            learn.n_iter = min(learn.n_iter, limit)

    def before_train(self, learn: Any, *args: Any, **kwargs: Any) -> None:
        self._shorten(learn)

    def before_validate(self, learn: Any, *args: Any, **kwargs: Any) -> None:
        self._shorten(learn)

    def before_batch(self, learn: Any, iter: int, **kwargs: Any) -> None:
        # The loader has already produced this batch; stopping here skips its work, not its loading.
        limit = self._limit(learn)
        if limit is not None and iter >= limit:
            raise CancelTrainException() if learn.training else CancelValidException()

    def __repr__(self) -> str:
        return f"LimitBatchesCB(train={self.train}, valid={self.valid})"
