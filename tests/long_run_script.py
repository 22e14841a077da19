"""Run by test_long_runs_dist.py under torchrun: `torchrun --nproc_per_node=2 long_run_script.py OUT`.

A small MLP with Dropout, SGD with momentum, shuffled data: `fit(epochs)` with a CheckpointCB in
OUT/ck, optionally resumed (`--resume auto`), optionally broken on purpose: an exception on every
rank at one batch (`--crash-at`), or rank 1 vanishing with os._exit(1) on torchrun's first attempt
(`--die-at`). `--rank-seeds` seeds each rank's torch RNG its own way (`100 + rank`) after the
model is built; `--save-at` has rank 0 alone call `learn.save(OUT/rank0.pt)` after that training
step (inside an epoch: the others go on training). Each rank writes its pid to OUT/pid<rank>, where its fit starts to OUT/start<rank>.json
and where it ended to OUT/end<rank>.json (from after_fit, so a preempted fit records it too); rank 0 writes OUT/started
after training step `--marker-step` and the final weights to OUT/weights.pt. `make_learner` is
imported by the test for the single-process runs.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from functools import partial
from pathlib import Path

import torch
from helpers import make_data
from torch import nn
from torch.utils.data import DataLoader, Dataset

from learnloop import (
    Callback,
    CheckpointCB,
    DataLoaders,
    Learner,
    ProgressCB,
)
from learnloop.dist import rank, world_size

N_TRAIN, N_VALID = 200, 50


class SlowData(Dataset):
    """`make_data(n, seed=seed)`, each row fetched after sleeping `delay` seconds."""

    def __init__(self, n: int, seed: int = 0, delay: float = 0.0) -> None:
        self.rows, self.delay = make_data(n, seed=seed), delay

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int):
        if self.delay:
            time.sleep(self.delay)
        return self.rows[i]


def steps_per_epoch(bs: int) -> int:
    """Training batches per epoch on each process (DistributedSampler pads the shards to equal length)."""
    return math.ceil(math.ceil(N_TRAIN / world_size()) / bs)


class Breaker(Callback):
    """After training step `at` (counted over epochs, from 1), once CheckpointCB has had its turn:
    raise on every rank (`how='raise'`), or end rank 1 with os._exit(1) on torchrun's first attempt
    (`how='exit'`)."""

    order = CheckpointCB.order + 1

    def __init__(self, at: int, how: str, bs: int) -> None:
        self.at, self.how, self.bs = at, how, bs

    def after_batch(self, learn, *args, **kwargs):
        if not learn.training:
            return
        step = learn.epoch * steps_per_epoch(self.bs) + learn.iter + 1
        if step != self.at:
            return
        if self.how == "raise":
            raise RuntimeError(f"crash at step {step}, as asked")
        first_attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
        if rank() == 1 and first_attempt:
            os._exit(1)


class SaveOnRankZero(Callback):
    """After training step `at`, rank 0 alone writes `out/rank0.pt` with `learn.save`, as a user's
    `if is_main_process(): learn.save(path)` would: the other ranks do not wait for it."""

    order = CheckpointCB.order + 1

    def __init__(self, out: Path, at: int, bs: int) -> None:
        self.out, self.at, self.bs = out, at, bs

    def after_batch(self, learn, *args, **kwargs):
        step = learn.epoch * steps_per_epoch(self.bs) + learn.iter + 1
        if learn.training and step == self.at and rank() == 0:
            learn.save(self.out / "rank0.pt")


class Marks(Callback):
    """Every rank writes where its fit starts and ends; rank 0 writes `out/started` after step `marker_step`."""

    order = CheckpointCB.order + 2

    def __init__(self, out: Path, marker_step: int | None, bs: int) -> None:
        self.out, self.marker_step, self.bs = out, marker_step, bs

    def after_batch(self, learn, *args, **kwargs):
        if not learn.training or self.marker_step is None or rank() != 0:
            return
        step = learn.epoch * steps_per_epoch(self.bs) + learn.iter + 1
        if step == self.marker_step:
            (self.out / "started").write_text(str(step))

    def before_fit(self, learn, *args, **kwargs):
        start = {"epoch": learn.epoch, "iter": learn.start_iter}
        start["resumed"] = learn.resumed_from is not None
        (self.out / f"start{rank()}.json").write_text(json.dumps(start))

    def after_fit(self, learn, *args, **kwargs):
        end = {"epoch": learn.epoch, "iter": learn.iter, "training": learn.training}
        (self.out / f"end{rank()}.json").write_text(json.dumps(end))


def make_learner(
    ckpt: Path | None,
    bs: int = 8,
    shuffle: bool = True,
    dropout: float = 0.2,
    every_steps: int | None = None,
    delay: float = 0.0,
    cbs: tuple[Callback, ...] = (),
) -> Learner:
    """The learner every run trains: same seed, model, data and optimizer in each process."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(4, 16), nn.ReLU(), nn.Dropout(dropout), nn.Linear(16, 3)
    )
    dls = DataLoaders(
        DataLoader(SlowData(N_TRAIN, delay=delay), batch_size=bs, shuffle=shuffle),
        DataLoader(SlowData(N_VALID, seed=1, delay=delay), batch_size=bs),
    )
    files = [] if ckpt is None else [CheckpointCB(ckpt, every_steps=every_steps)]
    return Learner(
        model,
        dls,
        lr=0.05,
        opt_func=partial(torch.optim.SGD, momentum=0.9),
        cbs=[ProgressCB(bar=False), *files, *cbs],
    )


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("out", type=Path)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--bs", type=int, default=8)
    p.add_argument("--no-shuffle", action="store_true")
    p.add_argument("--dropout", type=float, default=0.2)
    p.add_argument("--every-steps", type=int)
    p.add_argument("--resume", choices=["auto"])
    p.add_argument("--crash-at", type=int, help="training step: raise on every rank")
    p.add_argument("--die-at", type=int, help="training step: rank 1 os._exit(1)s")
    p.add_argument("--delay", type=float, default=0.0, help="seconds per row fetched")
    p.add_argument("--marker-step", type=int)
    p.add_argument("--rank-seeds", action="store_true", help="torch seed 100 + rank")
    p.add_argument(
        "--save-at", type=int, help="training step: rank 0 alone learn.save()s"
    )
    args = p.parse_args()

    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"pid{rank()}").write_text(str(os.getpid()))
    cbs: list[Callback] = [Marks(args.out, args.marker_step, args.bs)]
    if args.crash_at is not None:
        cbs.append(Breaker(args.crash_at, "raise", args.bs))
    if args.die_at is not None:
        cbs.append(Breaker(args.die_at, "exit", args.bs))
    if args.save_at is not None:
        cbs.append(SaveOnRankZero(args.out, args.save_at, args.bs))
    learn = make_learner(
        args.out / "ck",
        bs=args.bs,
        shuffle=not args.no_shuffle,
        dropout=args.dropout,
        every_steps=args.every_steps,
        delay=args.delay,
        cbs=tuple(cbs),
    )
    if args.rank_seeds:  # each rank draws its own dropout masks
        torch.manual_seed(100 + rank())
    learn.fit(args.epochs, resume=args.resume)
    if rank() == 0:
        torch.save(learn.model.state_dict(), args.out / "weights.pt")


if __name__ == "__main__":
    main()
