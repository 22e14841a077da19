"""Step checkpoints: what one costs to write inside an epoch, and how long a resume takes to its next batch.

    python benchmarks/checkpoint.py                       # 10M and 100M parameters, 5 repeats
    python benchmarks/checkpoint.py --sizes 100M --repeats 3 --dir /mnt/scratch --cold

The models are MLPs of Linear layers (32 inputs, `width` wide, `depth` hidden layers, 10 classes)
trained with AdamW, so the optimizer holds two float32 tensors per parameter and a file is about
three times the weights. The data are random tensors in a TensorDataset, shuffled, `--batches`
batches of 8 an epoch. Only the first `--steps` batches really train (AdamW's moments exist from
the first step on); the loop then goes on to batch `--at` with every later batch cancelled in
`before_batch` (CancelBatchException): the batches are fetched and counted, nothing is computed,
so batch 900 is reached in a second even for 100M parameters, and the state written is what
real steps would leave (weights, moments, counters, RNG, the default callbacks' states).

Saving: at the `--repeats` training batches before `--at`, a callback in `after_batch` (after
every other callback, as CheckpointCB's writes are) times `save_checkpoint(learn, path)`, the
same work split in two (`checkpoint_state(learn)`: capture and checks, then `atomic_save`:
write, fsync, rename, fsync of the folder), and a bare `torch.save(checkpoint_state(learn),
path)` of the same dict in the same folder, without and with an fsync of the file. Each timed
write starts after `os.sync()`, so none waits on the previous one's writeback, and with no file
of the folder in the page cache (see `SaveTimer._timed`); the four go in a new random order at
each batch (a rotation would keep each kind after the same other one, and what the previous
write left behind shifted the next one's time). An untimed `save_checkpoint` at batch `--at`
then writes the `last.pt` that the resumes read.

Resuming: from calling `learn.fit(1, resume=path)` on a fresh Learner (model built already) to
the first `before_batch` of the resumed epoch, against a bare `torch.load(path,
weights_only=True)` plus `model.load_state_dict` and `opt.load_state_dict` (a fresh AdamW) of
the same file; which goes first alternates. Timestamps at `before_fit` and `before_train` split
the resume into reading, checking and restoring the file; the hooks up to the epoch; and
starting the loader, which redraws the shuffled order and skips the done batches in the
sampler (their indices are drawn, no item is fetched), plus fetching the first batch. The same
loader start in a fresh fit (nothing skipped) shows what the skip adds. The file is in the page
cache (a restart on the same machine); `--cold` evicts it first (posix_fadvise DONTNEED), as a
restart elsewhere would find it.

One thread (`--threads`) for both sides: serializing and reading are single-threaded in torch,
and copies of large tensors would otherwise split over the cores unevenly between runs. The
disk matters more than anything here: the header names the filesystem the files go to.
Reported figures are medians, and the summary again with the fastest of the repeats: on a
shared machine single writes of the same file can differ 2-4x (other processes' CPU and disk
use; on a VM, memory the host must hand back for the page cache), so raise `--repeats` there.
All files are removed at the end.
"""

from __future__ import annotations

import argparse
import gc
import io
import os
import random
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from learnloop import (
    Callback,
    CancelBatchException,
    CancelFitException,
    DataLoaders,
    Learner,
    ProgressCB,
)
from learnloop.atomic import atomic_save
from learnloop.checkpoint import checkpoint_state, save_checkpoint

SIZES = {"tiny": (32, 2), "10M": (1024, 9), "100M": (2048, 24)}  # name: (width, depth)
N_IN, N_OUT, BS = 32, 10, 8
# One timed write of each kind per batch, in a random order.
KINDS = ("learnloop", "split", "torch.save", "torch.save+fsync")


def make_model(width: int, depth: int) -> nn.Module:
    """An MLP: Linear(32, width), `depth` hidden Linear(width, width), Linear(width, 10), ReLUs between."""
    layers: list[nn.Module] = [nn.Linear(N_IN, width), nn.ReLU()]
    for _ in range(depth):
        layers += [nn.Linear(width, width), nn.ReLU()]
    layers.append(nn.Linear(width, N_OUT))
    return nn.Sequential(*layers)


def make_dls(batches: int) -> DataLoaders:
    """Shuffled training batches of random inputs and labels; validation never runs here."""
    g = torch.Generator().manual_seed(0)
    n = batches * BS
    ds = TensorDataset(
        torch.randn(n, N_IN, generator=g), torch.randint(0, N_OUT, (n,), generator=g)
    )
    return DataLoaders(
        DataLoader(ds, batch_size=BS, shuffle=True), DataLoader(ds, batch_size=64)
    )


def make_learner(model: nn.Module, dls: DataLoaders, cbs: list[Callback]) -> Learner:
    """A Learner with the default callbacks (the progress table to a string) and AdamW."""
    return Learner(
        model,
        dls,
        F.cross_entropy,
        lr=1e-3,
        opt_func=torch.optim.AdamW,
        cbs=[ProgressCB(file=io.StringIO()), *cbs],
    )


def settle(collect: bool = False) -> None:
    """No writeback pending (and with `collect`, no garbage): the next timing starts from a quiet disk."""
    if collect:  # a collection costs ~0.2 s with torch's modules loaded: only where big tensors die
        gc.collect()
    os.sync()


def fsync_save(obj: Any, path: Path) -> None:
    """`torch.save` made durable: the file's data on the disk, as `atomic_save` does (no rename)."""
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def evict(path: Path) -> None:
    """Drop `path` from the page cache (its pages are clean once written and synced)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


class SaveTimer(Callback):
    """Reaches training batch `at` cheaply and times the writes at the `repeats` batches before it."""

    order = 1000  # after every other callback, as CheckpointCB's mid-epoch writes

    def __init__(self, folder: Path, steps: int, at: int, repeats: int) -> None:
        self.folder, self.steps, self.at = folder, steps, at
        self.first = at - repeats  # the first timed batch
        self.rng = random.Random(0)
        self.times: dict[str, list[float]] = {k: [] for k in KINDS}
        self.capture: list[float] = []
        self.write: list[float] = []

    def before_batch(self, learn: Learner, iter: int, **kwargs: Any) -> None:
        if learn.training and iter >= self.steps:
            raise CancelBatchException

    def after_batch(self, learn: Learner, iter: int, **kwargs: Any) -> None:
        if not learn.training or iter < self.first:
            return
        for kind in self.rng.sample(KINDS, len(KINDS)):
            self._timed(learn, kind)
        if iter + 1 == self.at:
            # The file the resume reads: last.pt at batch `at`, whichever kind went last.
            save_checkpoint(learn, self.folder / "last.pt")
            raise CancelFitException

    def _timed(self, learn: Learner, kind: str) -> None:
        last, bare = self.folder / "last.pt", self.folder / "bare.pt"
        state = checkpoint_state(learn) if kind.startswith("torch") else None
        settle()
        # Every write starts with no file of the folder cached. Else an atomic write right after
        # a bare one needs fresh memory for a second cached copy (the old last.pt stays cached
        # until the rename), where one right after another atomic write, or a bare overwrite,
        # reuses the pages just freed: on a VM that hands free memory back to its host, the
        # first case took 2-4x as long.
        for file in self.folder.iterdir():
            evict(file)
        start = time.perf_counter()
        if kind == "learnloop":
            save_checkpoint(learn, last)
        elif kind == "split":
            ck = checkpoint_state(learn)
            mid = time.perf_counter()
            atomic_save(ck, last)
            self.capture.append(mid - start)
            self.write.append(time.perf_counter() - mid)
        elif kind == "torch.save":
            torch.save(state, bare)
        else:
            fsync_save(state, bare)
        self.times[kind].append(time.perf_counter() - start)


class ResumeTimer(Callback):
    """Records when `before_fit`, `before_train` and the first training `before_batch` fire, then stops."""

    order = -1000  # first: the timestamps are taken before any other hook runs

    def __init__(self) -> None:
        self.at: dict[str, float] = {}
        self.first_batch: int | None = None

    def before_fit(self, learn: Learner, *args: Any, **kwargs: Any) -> None:
        self.at["fit"] = time.perf_counter()

    def before_train(self, learn: Learner, *args: Any, **kwargs: Any) -> None:
        self.at["train"] = time.perf_counter()

    def before_batch(self, learn: Learner, *args: Any, **kwargs: Any) -> None:
        if learn.training:
            self.at["batch"] = time.perf_counter()
            self.first_batch = learn.iter
            raise CancelFitException


def bare_load(model: nn.Module, path: Path) -> float:
    """Seconds to load `path` into `model` and a fresh AdamW by hand: no checks, no callbacks, no RNG."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    start = time.perf_counter()
    ck = torch.load(path, weights_only=True)
    model.load_state_dict(ck["model"])
    opt.load_state_dict(ck["optimizer"])
    return time.perf_counter() - start


def resume(
    model: nn.Module, dls: DataLoaders, path: Path, expected: int
) -> tuple[float, dict[str, float]]:
    """Seconds from `fit(1, resume=path)` on a fresh Learner to its first batch, and their parts."""
    timer = ResumeTimer()
    learn = make_learner(model, dls, [timer])
    start = time.perf_counter()
    learn.fit(1, resume=path)
    at = timer.at
    assert timer.first_batch == expected, (
        f"resumed at batch {timer.first_batch}, expected {expected}"
    )
    return at["batch"] - start, {
        "read+check+restore": at["fit"] - start,
        "hooks": at["train"] - at["fit"],
        "loader": at["batch"] - at["train"],
    }


def fresh_loader_start(model: nn.Module, dls: DataLoaders) -> float:
    """before_train to the first before_batch of a fresh fit: the loader starts, nothing skipped."""
    timer = ResumeTimer()
    make_learner(model, dls, [timer]).fit(1)
    return timer.at["batch"] - timer.at["train"]


def time_saves(
    name: str, args: argparse.Namespace, folder: Path, dls: DataLoaders
) -> dict[str, float]:
    """Median (and fastest) seconds of each kind of write before batch `args.at`; leaves last.pt there."""
    model = make_model(*SIZES[name])
    saver = SaveTimer(folder, args.steps, args.at, args.repeats)
    make_learner(model, dls, [saver]).fit(1)
    (folder / "bare.pt").unlink()
    return {
        "params": sum(p.numel() for p in model.parameters()),
        "mb": (folder / "last.pt").stat().st_size / 1e6,
        "save": statistics.median(saver.times["learnloop"]),
        "torch_save": statistics.median(saver.times["torch.save"]),
        "save_min": min(saver.times["learnloop"]),
        "torch_save_min": min(saver.times["torch.save"]),
        "torch_fsync": statistics.median(saver.times["torch.save+fsync"]),
        "capture": statistics.median(saver.capture),
        "write": statistics.median(saver.write),
    }


def time_resumes(
    name: str, args: argparse.Namespace, last: Path, dls: DataLoaders
) -> dict[str, float]:
    """Median (and fastest) seconds of a resume to its next batch and of a bare load, and the parts."""
    # A fresh model: every resumed fit and bare load overwrites its weights.
    model = make_model(*SIZES[name])
    resumes, loads, parts = [], [], []
    for i in range(args.repeats):
        for which in ("resume", "bare") if i % 2 == 0 else ("bare", "resume"):
            settle(collect=True)  # the last load's optimizer state
            if args.cold:
                evict(last)
            if which == "bare":
                loads.append(bare_load(model, last))
            else:
                total, split = resume(model, dls, last, args.at)
                resumes.append(total)
                parts.append(split)
    fresh = [fresh_loader_start(model, dls) for _ in range(args.repeats)]
    return {
        "resume": statistics.median(resumes),
        "load": statistics.median(loads),
        "resume_min": min(resumes),
        "load_min": min(loads),
        **{k: statistics.median(p[k] for p in parts) for k in parts[0]},
        "fresh_loader": statistics.median(fresh),
    }


def run(name: str, args: argparse.Namespace, folder: Path) -> dict[str, Any]:
    """One row of both tables for model `name`."""
    torch.manual_seed(0)
    dls = make_dls(args.batches)
    saves = time_saves(name, args, folder, dls)
    resumes = time_resumes(name, args, folder / "last.pt", dls)
    (folder / "last.pt").unlink()
    return {"model": name, **saves, **resumes}


def filesystem(folder: Path) -> str:
    """'ext4 (/dev/vda at /)': the type and device of the mount holding `folder`, from /proc/mounts."""
    try:
        with open("/proc/self/mounts") as f:
            mounts = [line.split()[:3] for line in f]
    except OSError:
        return "unknown filesystem"
    real = str(folder.resolve())
    best = max(
        (m for m in mounts if real == m[1] or real.startswith(m[1].rstrip("/") + "/")),
        key=lambda m: len(m[1]),
        default=None,
    )
    return (
        "unknown filesystem" if best is None else f"{best[2]} ({best[0]} at {best[1]})"
    )


def count(n: float) -> str:
    """`n` as '9.5M' or '3.5k'."""
    return f"{n / 1e6:.1f}M" if n >= 1e5 else f"{n / 1e3:.1f}k"


def summary_row(r: dict[str, Any], stat: str) -> str:
    """A line of the summary table from the `stat` figures of `r` ('' medians, '_min' fastest)."""
    save, torch_save = r["save" + stat], r["torch_save" + stat]
    resume, load = r["resume" + stat], r["load" + stat]
    return (
        f"{r['model']:<6} {count(r['params']):>7} {r['mb']:>8.1f} {save * 1e3:>8.0f} "
        f"{r['mb'] / save:>6.0f} {torch_save * 1e3:>14.0f} {save / torch_save:>6.2f} "
        f"{resume * 1e3:>10.0f} {load * 1e3:>13.0f} {resume / load:>6.2f}"
    )


def print_tables(rows: list[dict[str, Any]], at: int) -> None:
    """The summary table (medians, then the fastest), then where the time goes (medians, in ms)."""
    print(
        f"{'model':<6} {'params':>7} {'file MB':>8} {'save ms':>8} {'MB/s':>6} "
        f"{'torch.save ms':>14} {'ratio':>6} {'resume ms':>10} {'bare load ms':>13} {'ratio':>6}"
    )
    for r in rows:
        print(summary_row(r, ""))
    print()
    print(
        "The fastest of the repeats (the floor, where the medians carry a shared machine's noise):"
    )
    for r in rows:
        print(summary_row(r, "_min"))
    print()
    print(
        "Where the time goes (ms). Save: capture+checks, then the atomic write (torch.save, "
        "fsync, rename, fsync of the folder). Resume: load+checks (read, check, restore), the "
        "hooks up to the epoch, the loader (start, skip, first batch) against a fresh fit's."
    )
    skip = f"loader skip {at}"
    print(
        f"{'model':<6} {'capture+checks':>14} {'atomic write':>12} {'torch.save+fsync':>16} "
        f"{'load+checks':>11} {'hooks':>6} {skip:>16} {'skip 0':>7}"
    )
    for r in rows:
        print(
            f"{r['model']:<6} {r['capture'] * 1e3:>14.1f} {r['write'] * 1e3:>12.0f} "
            f"{r['torch_fsync'] * 1e3:>16.0f} {r['read+check+restore'] * 1e3:>11.0f} "
            f"{r['hooks'] * 1e3:>6.1f} {r['loader'] * 1e3:>16.1f} {r['fresh_loader'] * 1e3:>7.1f}"
        )


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    """Run the benchmark with the command line `argv` (default: sys.argv); returns the rows printed."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--sizes", default="10M,100M", help=f"comma-separated, of {', '.join(SIZES)}"
    )
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dir", help="where the files go (default: the temp folder)")
    parser.add_argument("--batches", type=int, default=1000, help="batches an epoch")
    parser.add_argument(
        "--at", type=int, default=900, help="the batch the resumed fit starts at"
    )
    parser.add_argument("--steps", type=int, default=2, help="real training steps")
    parser.add_argument(
        "--cold", action="store_true", help="evict the file before loads"
    )
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    sizes = args.sizes.split(",")
    unknown = [s for s in sizes if s not in SIZES]
    if unknown:
        parser.error(f"--sizes {unknown} unknown; choose from {', '.join(SIZES)}.")
    if args.repeats < 1:
        parser.error(f"--repeats must be >= 1, got {args.repeats}.")
    if not args.steps + args.repeats <= args.at <= args.batches - 1:
        parser.error(
            f"--at must be between --steps + --repeats ({args.steps + args.repeats}) and "
            f"--batches - 1 ({args.batches - 1}), got {args.at}."
        )
    torch.set_num_threads(args.threads)
    folder = Path(tempfile.mkdtemp(prefix="learnloop-ckpt-", dir=args.dir))
    cache = "cold (evicted)" if args.cold else "warm (page cache)"
    print(
        f"torch {torch.__version__}, {args.threads} thread(s), AdamW float32, {args.repeats} "
        f"repeats (medians); files in {folder} on {filesystem(folder)}; resume at batch "
        f"{args.at} of {args.batches}, file {cache}"
    )
    rows = []
    try:
        for name in sizes:
            rows.append(run(name, args, folder))
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    print_tables(rows, args.at)
    return rows


if __name__ == "__main__":
    main()
