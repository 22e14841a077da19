"""`MetricsCB` and `Accuracy`: the loss and metrics of each epoch, without a per-batch host sync.

Any object with `update(preds, targets)`, `compute()` and `reset()` is a metric, so torchmetrics
and torcheval metrics work as they are. Batch results stay on the device as tensors; they are
turned into Python numbers once, at the end of a phase.

Under torch.distributed the loss is summed with its sample count over processes, and a metric
that keeps sums (as `Accuracy` does) says so with `all_reduce(sum_fn)`, called before `compute()`;
torchmetrics metrics synchronise themselves in `compute()`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from ..dist import is_distributed, sum_across_processes
from ..tensors import to_plain
from .core import ORDERS, Callback

if TYPE_CHECKING:
    from ..learner import Learner

__all__ = ["Accuracy", "MetricsCB"]

log = logging.getLogger(__name__)


class Accuracy:
    """Share of rows whose arg-max prediction equals the target (counts kept on the device)."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """Forget every update."""
        self.correct: Tensor | int = 0
        self.total = 0

    def update(self, preds: Tensor, targets: Tensor) -> None:
        """Count the correct rows of one batch."""
        if preds.shape[0] != targets.shape[0]:
            raise ValueError(
                f"Accuracy got {preds.shape[0]} predictions for {targets.shape[0]} targets "
                f"(preds shape {tuple(preds.shape)}, targets shape {tuple(targets.shape)})."
            )
        self.correct = self.correct + (preds.argmax(dim=-1) == targets).sum()
        self.total += targets.shape[0]

    def all_reduce(self, sum_fn: Callable[[Tensor], Tensor]) -> None:
        """Replace the counts by their sums over processes (`sum_fn` sums a tensor across them)."""
        self.correct = sum_fn(torch.as_tensor(self.correct))
        self.total = int(sum_fn(torch.as_tensor(self.total)))

    def compute(self) -> float:
        """Accuracy over every update since the last reset."""
        if self.total == 0:
            return float("nan")
        return float(self.correct) / self.total

    def __repr__(self) -> str:
        return "Accuracy()"


def _metric_name(metric: Any) -> str:
    name = type(metric).__name__
    return "".join(
        "_" + c.lower() if c.isupper() and i else c.lower() for i, c in enumerate(name)
    )


def _batch_size(yb: Any, xb: Any) -> int:
    for x in (yb, xb):
        if isinstance(x, Tensor) and x.dim() > 0:
            return x.shape[0]
        if isinstance(x, (tuple, list)) and x:
            return _batch_size(x[0], None)
    return 1


class MetricsCB(Callback):
    """Averages the loss (weighted by batch size) and computes `metrics` on the validation set.

    After each epoch one row `{'epoch', 'train_loss', 'valid_loss', <metrics>..., 'time'}` is
    appended to `.history` and set as `learn.epoch_log`, where later callbacks (progress,
    loggers, early stopping) read it.

    Example:
        >>> learn = Learner(model, dls, cbs=[MetricsCB(Accuracy(), f1=F1Score())])  # doctest: +SKIP
    """

    # a MetricsCB passed to the Learner or to fit replaces the attached one
    unique = True

    run_in_lr_find = False  # lr_find detaches it for the sweep

    order = ORDERS["MetricsCB"]

    def __init__(self, *metrics: Any, **named_metrics: Any) -> None:
        for m in (*metrics, *named_metrics.values()):
            missing = [
                a
                for a in ("update", "compute", "reset")
                if not callable(getattr(m, a, None))
            ]
            if missing:
                raise TypeError(
                    f"{m!r} is not a metric: it lacks {', '.join(missing)}. A metric needs "
                    "update(preds, targets), compute() and reset() (torchmetrics metrics have them)."
                )
        self.metrics: dict[str, Any] = {_metric_name(m): m for m in metrics}
        self.metrics.update(named_metrics)
        self.history: list[dict[str, Any]] = []

    def before_fit(self, learn: Learner, *args: Any, **kwargs: Any) -> None:
        self.history = []

    def before_epoch(self, learn: Learner, epoch: int, **kwargs: Any) -> None:
        self._start = time.perf_counter()
        learn.epoch_log = {"epoch": epoch}

    def before_train(self, learn: Learner, *args: Any, **kwargs: Any) -> None:
        self._reset()

    def before_validate(self, learn: Learner, *args: Any, **kwargs: Any) -> None:
        self._reset()
        for m in self.metrics.values():
            m.reset()

    def _reset(self) -> None:
        self._losses: list[Tensor] = []
        self._counts: list[int] = []

    def after_loss(self, learn: Learner, loss: Tensor, **kwargs: Any) -> None:
        self._losses.append(loss.detach())
        self._counts.append(_batch_size(learn.yb, learn.xb))
        if not learn.training:
            for m in self.metrics.values():
                m.update(learn.preds.detach(), learn.yb)

    def _mean_loss(self) -> float:
        total, count = torch.zeros(()), torch.zeros(())
        if self._losses:
            losses = torch.stack([x.float().reshape(()) for x in self._losses])
            counts = torch.tensor(
                self._counts, dtype=losses.dtype, device=losses.device
            )
            total, count = (losses * counts).sum(), counts.sum()
        # Sums and counts over every process (each rank calls this, even with an empty shard).
        total, count = sum_across_processes(total), sum_across_processes(count)
        return float(total / count)  # 0/0 is nan: no batches

    def _sync_metrics(self) -> None:
        if not is_distributed():
            return
        for name, m in self.metrics.items():
            if callable(getattr(m, "all_reduce", None)):
                m.all_reduce(sum_across_processes)
            # torchmetrics syncs itself in compute()
            elif not hasattr(m, "sync_on_compute"):
                log.warning(
                    "Metric %r has no all_reduce(sum_fn): it covers this process's shard only.",
                    name,
                )

    def after_train(self, learn: Learner, *args: Any, **kwargs: Any) -> None:
        learn.epoch_log["train_loss"] = self._mean_loss()

    def after_validate(self, learn: Learner, *args: Any, **kwargs: Any) -> None:
        learn.epoch_log["valid_loss"] = self._mean_loss()
        self._sync_metrics()
        for name, m in self.metrics.items():
            learn.epoch_log[name] = to_plain(m.compute())

    def after_epoch(self, learn: Learner, *args: Any, **kwargs: Any) -> None:
        learn.epoch_log["time"] = time.perf_counter() - self._start
        self.history.append(dict(learn.epoch_log))

    def __repr__(self) -> str:
        return f"MetricsCB({', '.join(self.metrics)})"
