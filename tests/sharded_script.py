"""Run by test_sharded_checkpoints.py under torchrun: `torchrun --nproc-per-node=2 sharded_script.py OUT --mode MODE`.

Every learner is `make_learner`'s: an MLP whose two Linear layers FSDP2 shards (the second one
unevenly: 3 rows over 2 processes), AdamW, GradAccumCB(2), shuffled data and Dropout, each rank
seeding its torch RNG its own way after the model is built. Rank 0 writes what the
test compares: full weights (`<name>.pt`), the full optimizer state keyed by parameter name
(`<name>-opt.pt`) and OUT/<mode>.json (metrics histories, where each fit started, error
messages: every rank's).

`--mode first` trains, in one launch:
- `full`: 3 epochs never stopped, CheckpointCB(OUT/full, every_steps=3).
- `saved-first`, `saved`: a learner without CheckpointCB trains an epoch, `learn.save(OUT/saved)`,
  trains another, saves again; a fresh learner (other initial weights) loads OUT/saved (`loaded`).
- `crash`: as `full` in OUT/crash, raising on every rank after training step 11 (caught).
- `kill`: as `full` in OUT/kill with every_steps=1, both processes SIGKILLed inside the second
  sharded write, after the DCP shards and index are on disk and before learner.pt is: the
  launch ends there, with a nonzero exit status.

`--mode resume`, after it:
- `crash-resumed`, `kill-resumed`: `fit(3, resume="auto")` in OUT/crash and OUT/kill.
- `refused`: a fresh fit into OUT/kill (FileExistsError expected), then one with overwrite=True.
- `from-plain`: `fit(3, resume=OUT/plain.pt)` (a single-process file the test wrote), without
  GradAccumCB, Dropout or shuffling.
- `wrong-before`, `wrong-after`: a learner with wider layers, trained an epoch, before and after
  `learn.load(OUT/full)` (ValueError expected).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from helpers import make_data
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_optimizer_state_dict,
)
from torch.utils.data import DataLoader

import learnloop.sharded
from learnloop import (
    Callback,
    CheckpointCB,
    DataLoaders,
    DistributedCB,
    GradAccumCB,
    Learner,
    MetricsCB,
    ProgressCB,
)
from learnloop.dist import rank
from learnloop.fsdp import full_model_state

N_TRAIN, N_VALID, EPOCHS = 96, 48, 3
STEPS = 6  # training batches per epoch on each of 2 processes: 48 rows, batches of 8
CRASH_AT = (
    11  # training step (from 1) after which the crash run raises: epoch 1, batch 4
)


def make_learner(
    ckpt: Path | None,
    bs: int = 8,
    every_steps: int | None = 3,
    accum: bool = True,
    dropout: float = 0.2,
    shuffle: bool = True,
    width: int = 16,
    seed: int = 0,
    fsdp: bool = True,
    overwrite: bool = False,
    cbs: tuple[Callback, ...] = (),
) -> Learner:
    """The learner every run trains; `fsdp=False` for a plain one (the test's single process).

    The weights come from `seed`; then each rank seeds its RNG its own way (`100 + rank`), so
    the ranks draw different dropout masks and a resume must give each its own generators back.
    """
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Linear(4, width), nn.ReLU(), nn.Dropout(dropout), nn.Linear(width, 3)
    )
    torch.manual_seed(100 + rank())
    dls = DataLoaders(
        DataLoader(make_data(N_TRAIN), batch_size=bs, shuffle=shuffle),
        DataLoader(make_data(N_VALID, seed=1), batch_size=bs),
    )
    more: list[Callback] = [ProgressCB(bar=False), *cbs]
    if fsdp:
        more.append(DistributedCB(strategy="fsdp", shard=nn.Linear))
    if accum:
        more.append(GradAccumCB(2))
    if ckpt is not None:
        more.append(CheckpointCB(ckpt, every_steps=every_steps, overwrite=overwrite))
    return Learner(model, dls, lr=0.01, opt_func=torch.optim.AdamW, cbs=more)


class Crash(Callback):
    """Raises on every rank after training step `at` (counted over epochs, from 1), once CheckpointCB has had its turn."""

    order = CheckpointCB.order + 1

    def __init__(self, at: int) -> None:
        self.at = at

    def after_batch(self, learn: Learner, *args: Any, **kwargs: Any) -> None:
        if learn.training and learn.epoch * STEPS + learn.iter + 1 == self.at:
            raise RuntimeError(f"crash at step {self.at}, as asked")


class Start(Callback):
    """Where the fit starts: its first epoch, the batch it enters that epoch at, resumed or not."""

    def before_fit(self, learn: Learner, *args: Any, **kwargs: Any) -> None:
        self.at = [learn.epoch, learn.start_iter, learn.resumed_from is not None]


def kill_inside_write(out: Path, write: int) -> None:
    """SIGKILL both processes in the `write`-th sharded checkpoint write, before learner.pt is written.

    learner.pt is written by rank 0 (`atomic_save`) after every process's DCP shards and the
    index are in the hidden temporary folder: a node dying then leaves that folder half-written.
    """
    writes = 0
    save = learnloop.sharded.atomic_save

    def dying_save(obj: Any, path: Path) -> Path:
        nonlocal writes
        writes += 1
        if writes == write:
            os.kill(int((out / "pid1").read_text()), signal.SIGKILL)
            os.kill(os.getpid(), signal.SIGKILL)
        return save(obj, path)

    learnloop.sharded.atomic_save = dying_save


class Results:
    """What rank 0 writes for the test: tensors as files in `out`, the rest in out/<mode>.json."""

    def __init__(self, out: Path, mode: str) -> None:
        self.out, self.mode, self.values = out, mode, {}

    def states(self, name: str, learn: Learner) -> None:
        """Full weights and optimizer state of `learn` (every process calls it: all-gathers)."""
        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        weights = full_model_state(learn.model)
        opt = get_optimizer_state_dict(learn.model, learn.opt, options=opts)
        if rank() == 0:
            torch.save(weights, self.out / f"{name}.pt")
            torch.save(opt, self.out / f"{name}-opt.pt")

    def fit(self, name: str, learn: Learner, *args: Any, **kwargs: Any) -> None:
        """`learn.fit(*args, **kwargs)`; then its states, history and where it started."""
        start = Start()
        learn.fit(*args, cbs=[start], **kwargs)
        self.states(name, learn)
        metrics = next(cb for cb in learn.cbs if isinstance(cb, MetricsCB))
        history = [{k: v for k, v in r.items() if k != "time"} for r in metrics.history]
        self.every_rank(f"{name}-start", start.at)
        self.values[f"{name}-history"] = history
        self.values[f"{name}-epochs"] = learn.epochs_done

    def error(self, name: str, expected: type[Exception], call: Any) -> None:
        """Run `call()`, which must raise `expected` on every rank; keep each rank's message."""
        try:
            call()
        except expected as e:
            self.every_rank(name, str(e))
        else:
            self.every_rank(name, None)

    def every_rank(self, name: str, value: Any) -> None:
        gathered: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, value)
        self.values[name] = gathered

    def write(self) -> None:
        if rank() == 0:
            (self.out / f"{self.mode}.json").write_text(json.dumps(self.values))


def first(out: Path, res: Results) -> None:
    res.fit("full", make_learner(out / "full"), EPOCHS)

    learn = make_learner(None)
    learn.fit(1)
    learn.save(out / "saved")
    res.states("saved-first", learn)
    learn.fit(1)
    learn.save(out / "saved")
    res.states("saved", learn)
    fresh = make_learner(None, seed=1)
    fresh.load(out / "saved")
    res.states("loaded", fresh)
    res.every_rank("loaded-epochs", fresh.epochs_done)

    crash = make_learner(out / "crash", cbs=(Crash(CRASH_AT),))
    res.error("crash", RuntimeError, lambda: crash.fit(EPOCHS))
    res.write()

    kill_inside_write(out, write=2)
    make_learner(out / "kill", every_steps=1).fit(EPOCHS)


def resume(out: Path, res: Results) -> None:
    for name in ("crash", "kill"):
        res.fit(f"{name}-resumed", make_learner(out / name), EPOCHS, resume="auto")

    res.error("refused", FileExistsError, lambda: make_learner(out / "kill").fit(1))
    res.fit("refused", make_learner(out / "kill", overwrite=True), 1)

    plain = make_learner(None, accum=False, dropout=0.0, shuffle=False)
    res.fit("from-plain", plain, EPOCHS, resume=out / "plain.pt")

    wrong = make_learner(None, width=32)
    wrong.fit(1)
    res.states("wrong-before", wrong)
    res.error("wrong", ValueError, lambda: wrong.load(out / "full"))
    res.states("wrong-after", wrong)
    res.write()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("out", type=Path)
    p.add_argument("--mode", choices=["first", "resume"], required=True)
    args = p.parse_args()
    torch.set_num_threads(1)
    (args.out / f"pid{rank()}").write_text(str(os.getpid()))
    {"first": first, "resume": resume}[args.mode](
        args.out, Results(args.out, args.mode)
    )
    dist.barrier()  # no process leaves while another still talks to it
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
