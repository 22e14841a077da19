"""Callbacks that shorten a fit while you debug it: one batch, or a few batches per phase."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..errors import check_int
from ..events import CancelFitException, CancelTrainException, CancelValidException
from .core import ORDERS, Callback

if TYPE_CHECKING:
    from ..learner import Learner

__all__ = ["LimitBatchesCB", "SingleBatchCB"]


class SingleBatchCB(Callback):
    """Stops the fit after its first batch, once every other callback's `after_batch` has run.

    Use it to check that a new model, loss or callback runs end to end in seconds.

    Example:
        >>> learn.fit(1, cbs=[SingleBatchCB()])  # doctest: +SKIP
    """

    order = ORDERS["SingleBatchCB"]

    def after_batch(self, learn: Learner, *args: Any, **kwargs: Any) -> None:
        raise CancelFitException("SingleBatchCB: stopping after one batch")


class LimitBatchesCB(Callback):
    """Runs at most `train` training batches and `valid` validation batches per epoch (None: all).

    The limited phase ends normally (its `after_train` / `after_validate` run), so metrics are
    computed over the batches that ran. Progress bars show the limited length.

    Example:
        >>> learn.fit(2, cbs=[LimitBatchesCB(train=5, valid=2)])  # doctest: +SKIP
    """

    order = ORDERS["LimitBatchesCB"]

    def __init__(self, train: int | None = None, valid: int | None = None) -> None:
        for name, n in (("train", train), ("valid", valid)):
            if n is not None:
                check_int(n, f"LimitBatchesCB {name} (None for all)", unit="batches")
        self.train, self.valid = train, valid

    def _limit(self, learn: Learner) -> int | None:
        return self.train if learn.training else self.valid

    def _shorten(self, learn: Learner) -> None:
        limit = self._limit(learn)
        if limit is not None and learn.n_iter is not None:
            learn.n_iter = min(learn.n_iter, limit)

    def before_train(self, learn: Learner, *args: Any, **kwargs: Any) -> None:
        self._shorten(learn)

    def before_validate(self, learn: Learner, *args: Any, **kwargs: Any) -> None:
        self._shorten(learn)

    def before_batch(self, learn: Learner, iter: int, **kwargs: Any) -> None:
        # The loader has already produced this batch; stopping here skips its work, not its loading.
        limit = self._limit(learn)
        if limit is not None and iter >= limit:
            raise CancelTrainException() if learn.training else CancelValidException()

    def __repr__(self) -> str:
        return f"LimitBatchesCB(train={self.train}, valid={self.valid})"
