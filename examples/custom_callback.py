"""Writing your own callbacks: swallow the arguments you don't use, cancel a batch, pick an order.

    python examples/custom_callback.py --epochs 2

Trains a small MLP on the embedded digits (offline, seconds) with three callbacks of our own.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

import torch

from learnloop import Accuracy, Callback, CancelBatchException, Learner, MetricsCB
from learnloop import is_main_process as is_rank0
from learnloop.data import DataLoaders, Normalize, load_digits
from learnloop.models import mlp


class CountBatches(Callback):
    """A hook that takes `learn` and swallows the event's context (`iter=`, `loss=`) it doesn't need."""

    def __init__(self) -> None:
        self.train_batches = 0

    def after_batch(self, learn: Learner, *args: Any, **kwargs: Any) -> None:
        if learn.training:
            self.train_batches += 1


class SkipWarmup(Callback):
    """Cancel the first `n` training batches of each epoch: the rest of the batch is skipped."""

    def __init__(self, n: int = 2) -> None:
        self.n, self.skipped = n, 0

    def before_batch(self, learn: Learner, iter: int, **kwargs: Any) -> None:
        if learn.training and iter < self.n:
            self.skipped += 1
            raise CancelBatchException()


class BestEpoch(Callback):
    """Runs after MetricsCB, so `learn.epoch_log` is this epoch's finished row."""

    order = MetricsCB.order + 1  # place a callback by naming the one it follows

    def __init__(self) -> None:
        self.best: tuple[int, float] | None = None

    def after_epoch(self, learn: Learner, epoch: int, **kwargs: Any) -> None:
        accuracy = learn.epoch_log["accuracy"]
        if self.best is None or accuracy > self.best[1]:
            self.best = (epoch, accuracy)


def add_channel(b: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Batch transform: the digits are (N, 8, 8); models take (N, 1, 8, 8)."""
    b["image"] = b["image"].unsqueeze(1)
    return b


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Train with the three callbacks and return what they saw."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--bs", type=int, default=64, help="batch size")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    dls = DataLoaders.from_dd(
        load_digits(),
        args.bs,
        batched=True,
        batch_tfms=[Normalize(4.9, 6.0), add_channel],
    )
    count, skip, best = CountBatches(), SkipWarmup(n=2), BestEpoch()
    learn = Learner(
        mlp(n_in=64, n_out=10),
        dls,
        lr=3e-3,
        opt_func=torch.optim.AdamW,
        cbs=[MetricsCB(Accuracy())],
    )
    learn.fit(args.epochs, cbs=[count, skip, best])  # these three for this fit only
    seen = {
        "train_batches": count.train_batches,
        "skipped": skip.skipped,
        "best_epoch": best.best,
    }
    if is_rank0():  # under torchrun, rank 0 alone prints
        print(
            f"{count.train_batches} training batches ({skip.skipped} cancelled); best: {best.best}"
        )
    return seen


if __name__ == "__main__":
    main()
