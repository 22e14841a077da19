"""A training process to preempt, for tests/test_preempt.py.

    python preempt_script.py FOLDER [--resume auto] [--workers N]

`train(folder)` trains a dropout MLP on shuffled, slow data (each item takes 1 ms), logs to
FOLDER/history.csv, keeps checkpoints in FOLDER/ckpt (every_steps=1000: only a preemption
writes inside an epoch), writes FOLDER/started once epoch 1 is under way (see `Started`), and
saves the final weights to FOLDER/final.pt. It does not catch `Preempted`: a SIGTERM ends it
with exit status 143, as the signal would.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from learnloop import (
    Callback,
    CheckpointCB,
    CSVLoggerCB,
    DataLoaders,
    DeviceCB,
    Learner,
    MetricsCB,
)

N_EPOCHS = 3


class SlowData(Dataset):
    """`n` rows of a separable 3-class task; each item takes `delay` seconds to fetch."""

    def __init__(self, n: int, seed: int, delay: float) -> None:
        w = torch.randn(4, 3, generator=torch.Generator().manual_seed(1234))
        self.x = torch.randn(n, 4, generator=torch.Generator().manual_seed(seed))
        self.y = (self.x @ w).argmax(dim=1)
        self.delay = delay

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        time.sleep(self.delay)
        return self.x[i], self.y[i]


class Started(Callback):
    """Touches `marker` at the first batch of epoch 1 (training is under way, with a row in the
    CSV), then slows the data down 20 times, so that a signal sent on seeing the marker lands
    before training ends however busy the machine is (the delay changes no number)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def after_batch(self, learn: Learner, *args: object, **kwargs: object) -> None:
        if learn.training and learn.epoch == 1 and learn.iter == 0:
            self.marker.touch()
            for dl in (learn.dls.train, learn.dls.valid):
                dl.dataset.delay *= 20


def train(
    folder: Path, resume: str | None = None, delay: float = 0.001, workers: int = 0
) -> Learner:
    """Train N_EPOCHS epochs, logging and checkpointing into `folder`; save the weights at the end.

    With `workers`, the training loader fetches in that many worker processes, each item taking
    20 times longer (the marker's slow-down does not reach workers already started).
    """
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(4, 16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 3)
    )
    train_dl = DataLoader(
        SlowData(64, 0, delay * (20 if workers else 1)),
        batch_size=8,
        shuffle=True,
        num_workers=workers,
    )
    dls = DataLoaders(train_dl, DataLoader(SlowData(32, 1, delay), batch_size=16))
    learn = Learner(
        model,
        dls,
        lr=0.1,
        default_cbs=False,
        cbs=[
            DeviceCB("cpu"),
            MetricsCB(),
            CSVLoggerCB(folder / "history.csv"),
            CheckpointCB(folder / "ckpt", every_steps=1000),
            Started(folder / "started"),
        ],
    )
    learn.fit(N_EPOCHS, resume=resume)
    torch.save(learn.model.state_dict(), folder / "final.pt")
    return learn


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("folder", type=Path)
    parser.add_argument("--resume", default=None)
    parser.add_argument("--workers", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    train(args.folder, args.resume, workers=args.workers)


if __name__ == "__main__":
    main()
