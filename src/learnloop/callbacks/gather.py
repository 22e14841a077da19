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
        # The loader actually read (a shard of it under DistributedCB)
        self.dl = learn.dl

    def after_loss(self, learn: Any, *args: Any, **kwargs: Any) -> None:
        self.preds.append(learn.preds.detach().cpu())
        self.targets.append(_to_cpu(learn.yb))

    def result(self) -> tuple[Tensor, Any]:
        """All predictions and targets, concatenated (several targets: a tuple of tensors)."""
        from .distributed import gather_in_order  # a no-op outside torch.distributed

        self.preds, self.targets = gather_in_order(self.preds, self.targets, self.dl)
        if not self.preds:
            raise ValueError("get_preds saw no batches: the loader is empty.")
        preds = torch.cat(self.preds)
        if isinstance(self.targets[0], tuple):
            return preds, tuple(torch.cat(parts) for parts in zip(*self.targets))
        return preds, torch.cat(self.targets)


def _to_cpu(yb: Any) -> Any:
    if isinstance(yb, tuple):
        return tuple(y.detach().cpu() for y in yb)
    return yb.detach().cpu()
