"""`GatherPredsCB`: collects predictions and targets batch by batch (what `learn.get_preds` uses).

A batch with targets is collected once its loss reaches `after_loss`; one without (inputs only,
which has no loss and no `after_loss`) at `after_pred`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from ..dist import gather_in_order
from ..tensors import map_tensors
from .core import ORDERS, Callback

if TYPE_CHECKING:
    from ..learner import Learner

__all__ = ["GatherPredsCB"]


def _detached_cpu(t: Tensor) -> Tensor:
    return t.detach().cpu()


class GatherPredsCB(Callback):
    """Collects detached CPU predictions and targets batch by batch (for `get_preds`)."""

    order = ORDERS["GatherPredsCB"]

    def __init__(self) -> None:
        self.preds: list[Tensor] = []
        self.targets: list[Tensor] = []
        self.dl: Any = None

    def before_validate(self, learn: Learner, *args: Any, **kwargs: Any) -> None:
        # The loader actually read (a shard of it under DistributedCB)
        self.dl = learn.dl

    def after_pred(self, learn: Learner, *args: Any, **kwargs: Any) -> None:
        if learn.yb is None:
            self._collect(learn)

    def after_loss(self, learn: Learner, *args: Any, **kwargs: Any) -> None:
        self._collect(learn)

    def _collect(self, learn: Learner) -> None:
        self.preds.append(_detached_cpu(learn.preds))
        self.targets.append(map_tensors(_detached_cpu, learn.yb))

    def result(self) -> tuple[Tensor, Any]:
        """All predictions and targets, concatenated (several targets: a tuple of tensors; none: None)."""
        missing = sum(t is None for t in self.targets)
        if 0 < missing < len(self.targets):
            raise ValueError(
                f"get_preds: {missing} of {len(self.targets)} batches have no targets: the "
                "loader must yield targets in every batch or in none."
            )
        self.preds, self.targets = gather_in_order(self.preds, self.targets, self.dl)
        if not self.preds:
            raise ValueError("get_preds saw no batches: the loader is empty.")
        preds = torch.cat(self.preds)
        if self.targets[0] is None:
            return preds, None
        if isinstance(self.targets[0], tuple):
            return preds, tuple(torch.cat(parts) for parts in zip(*self.targets))
        return preds, torch.cat(self.targets)
