"""`GatherPredsCB`: collects predictions and targets batch by batch (what `learn.get_preds` uses)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .core import Callback

__all__ = ["GatherPredsCB"]


class GatherPredsCB(Callback):
    """Collects detached CPU predictions and targets batch by batch (for `get_preds`)."""

    order = 100

    def __init__(self) -> None:
        self.preds: list[Tensor] = []
        self.targets: list[Tensor] = []
        self.dl: Any = None

    def before_validate(self, learn: Any, *args: Any, **kwargs: Any) -> None:
        self.dl = (
            learn.dl
        )  # the loader actually read (a shard of it under DistributedCB)

    def after_loss(self, learn: Any, *args: Any, **kwargs: Any) -> None:
        self.preds.append(learn.preds.detach().cpu())
        self.targets.append(learn.yb.detach().cpu())

    def result(self) -> tuple[Tensor, Tensor]:
        from .distributed import gather_in_order  # a no-op outside torch.distributed

        self.preds, self.targets = gather_in_order(self.preds, self.targets, self.dl)
        if not self.preds:
            raise ValueError("get_preds saw no batches: the loader is empty.")
        return torch.cat(self.preds), torch.cat(self.targets)
