"""FSDP memory per process: parameter, gradient and optimizer-state bytes at 1, 2 and 4 processes.

    python benchmarks/fsdp_memory.py                          # 50M parameters, 1 2 4 processes
    python benchmarks/fsdp_memory.py --params 200000 --worlds 1 2 --no-ddp

Each world size N is one `torchrun --standalone --nproc-per-node=N` of this script (gloo on CPU,
one thread per process), N = 1 included: there DistributedCB(strategy="fsdp") notes that it
runs unsharded (one process, no process group), so that row is the whole model, launched the same way
as the others. Every process builds the same model (seeded): `--depth` residual blocks
(LayerNorm, Linear(w, w), GELU), w a multiple of 16 picked so the model has about `--params`
parameters, then Linear(w, 8), and trains it through a Learner with
`DistributedCB(strategy="fsdp", shard=Block)` and AdamW for `--steps` batches of `--bs` random
rows per process (plus one validation batch).

At the optimizer step of the last batch (gradients still there, `after_step`), each process
counts the bytes of what it holds: its parameters (a DTensor's local shard, `.to_local()`), their
gradients, and the optimizer's state tensors (AdamW's exp_avg, exp_avg_sq and step); and reads
its resident set size then (RSS, after glibc's malloc_trim: see `rss_bytes`) and its peak so
far (ru_maxrss). Every rank writes its figures to a file the driver reads; a row shows the
largest rank's (with w a multiple of 16 the shards are equal), s/step the median time of a
training step after the first. Both RSS figures include torch itself (some 330 MB); the peak
also holds the whole model each process built before sharding it and AdamW's temporaries, the
RSS at the step only what is live then. One more row, unless `--no-ddp`: DDP at 2 processes, a
whole copy of everything per process.

Exits 1 unless the total at each N is within `--tolerance` (10%) of the total at 1 process / N
(the 1-process run is always made). 50M parameters take a few minutes on 2 cores, the 4-process
run most of it.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import learnloop
from learnloop import Callback, DataLoaders, DeviceCB, DistributedCB, Learner

CLASSES = 8
ROUND = 16  # the width is a multiple of this, so 1, 2, 4, 8 or 16 processes get equal shards
MB = 1e6


class Block(nn.Module):
    """x + GELU(Linear(LayerNorm(x))): the unit FSDP shards."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm, self.linear = nn.LayerNorm(width), nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + nn.functional.gelu(self.linear(self.norm(x)))


def width_for(params: int, depth: int) -> int:
    """The multiple of ROUND nearest to the width giving `depth` blocks about `params` parameters."""
    return max(ROUND, round(math.sqrt(params / depth) / ROUND) * ROUND)


def make_model(width: int, depth: int) -> nn.Sequential:
    # Every process builds the same weights: FSDP does not broadcast them.
    torch.manual_seed(0)
    return nn.Sequential(
        *[Block(width) for _ in range(depth)], nn.Linear(width, CLASSES)
    )


def local_bytes(t: torch.Tensor) -> int:
    """Bytes this process holds of `t`: a DTensor's local shard, or the whole tensor."""
    if hasattr(t, "to_local"):
        t = t.to_local()
    return t.numel() * t.element_size()


def rss_bytes() -> int:
    """The resident set size now (Linux), once glibc has handed its free heap memory back.

    Without the trim, memory freed long ago (the whole model built before sharding, AdamW's
    temporaries) still counts: glibc keeps it for later allocations.
    """
    with contextlib.suppress(AttributeError):  # a C library without malloc_trim
        ctypes.CDLL(None).malloc_trim(0)
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class Probe(Callback):
    """Times each training step; at the last one's optimizer step, reads what the process holds."""

    order = 1000

    def __init__(self) -> None:
        self.figures: dict[str, float] = {}
        self.times: list[float] = []
        self.last = 0.0

    def before_batch(self, learn: Learner, **kwargs: Any) -> None:
        if learn.training:
            self.last = time.perf_counter()

    def after_step(self, learn: Learner, **kwargs: Any) -> None:
        self.times.append(time.perf_counter() - self.last)
        if learn.iter < learn.n_iter - 1:
            return
        params = [p for g in learn.opt.param_groups for p in g["params"]]
        state = [
            t
            for s in learn.opt.state.values()
            for t in s.values()
            if isinstance(t, torch.Tensor)
        ]
        self.figures = {
            "params": sum(local_bytes(p) for p in params),
            "grads": sum(local_bytes(p.grad) for p in params if p.grad is not None),
            "optimizer": sum(local_bytes(t) for t in state),
            "rss": rss_bytes(),
        }


def worker(args: argparse.Namespace) -> None:
    """One process of a torchrun: train, measure, write this rank's figures to `--out`/<rank>.json.

    Then it leaves with os._exit, skipping the interpreter's shutdown: after FSDP training on
    gloo, a process that shut down normally aborted now and then ("terminate called without an
    active exception"; a core dump showed a gloo worker thread freeing an all-gather's tensors,
    which takes the GIL, while the main thread was in Py_FinalizeEx), in about 1 run in 8 on 2
    busy cores, with or without destroy_process_group first; never in 40 runs with os._exit. A
    file per rank, not a gather to rank 0, so no collective is left to finish.
    """
    torch.set_num_threads(1)
    width = width_for(args.params, args.depth)
    model = make_model(width, args.depth)
    n = int(os.environ["WORLD_SIZE"])
    g = torch.Generator().manual_seed(1)
    rows = args.steps * args.bs * n
    x, y = torch.randn(rows, width, generator=g), torch.randint(0, CLASSES, (rows,))
    train = DataLoader(TensorDataset(x, y), batch_size=args.bs)
    valid = DataLoader(TensorDataset(x[: args.bs * n], y[: args.bs * n]), args.bs)
    if args.strategy == "fsdp":
        distributed = DistributedCB(strategy="fsdp", shard=Block)
    else:
        distributed = DistributedCB()
    probe = Probe()
    cbs = [DeviceCB("cpu"), distributed, probe]
    learn = Learner(
        model,
        DataLoaders(train, valid),
        lr=1e-4,
        cbs=cbs,
        opt_func=torch.optim.AdamW,
        default_cbs=False,
    )
    learn.fit(1)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    # The first step also builds AdamW's state.
    steady = sorted(probe.times[1:] or probe.times)
    mine = {
        **probe.figures,
        "peak_rss": peak,
        "step_s": steady[len(steady) // 2],
        "n_params": sum(p.numel() for p in model.parameters()),
    }
    Path(args.out, f"{learnloop.rank()}.json").write_text(json.dumps(mine))
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # not through the interpreter's shutdown: see the docstring


def launch(args: argparse.Namespace, strategy: str, n: int, folder: Path) -> list[dict]:
    """Every rank's figures from `torchrun --standalone --nproc-per-node=n` of this script."""
    out = folder / f"{strategy}-{n}"
    out.mkdir()
    # The learnloop this driver imported, for the workers too.
    paths = [str(Path(learnloop.__file__).parents[1]), os.environ.get("PYTHONPATH")]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(p for p in paths if p),
        "OMP_NUM_THREADS": "1",
        "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1",
    }
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    cmd += [f"--nproc-per-node={n}", __file__, "--worker", "--strategy", strategy]
    cmd += ["--params", str(args.params), "--depth", str(args.depth)]
    cmd += ["--steps", str(args.steps), "--bs", str(args.bs), "--out", str(out)]
    done = subprocess.run(cmd, check=False, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        sys.stderr.write(done.stdout + done.stderr)
        raise SystemExit(
            f"{strategy} at {n} processes failed (exit {done.returncode})."
        )
    return [json.loads((out / f"{rank}.json").read_text()) for rank in range(n)]


def row(strategy: str, n: int, ranks: list[dict]) -> dict[str, Any]:
    """The largest rank's figures (by total bytes), its peak RSS the largest of all."""
    for r in ranks:
        r["total"] = r["params"] + r["grads"] + r["optimizer"]
    top = max(ranks, key=lambda r: r["total"])
    peak = max(r["peak_rss"] for r in ranks)
    return {"strategy": strategy, "world": n, **top, "peak_rss": peak}


def report(rows: list[dict[str, Any]], tolerance: float) -> int:
    """Print the table of `rows` (the 1-process FSDP row first); 1 if an FSDP total is off by more than `tolerance`."""
    print(f"parameters: {rows[0]['n_params']:,} (bytes are the largest rank's)")
    print(
        f"{'run':<5} {'procs':>5}  {'params MB':>9}  {'grads MB':>8}  {'optim MB':>8}  "
        f"{'total MB':>8}  {'ratio':>5}  {'RSS MB':>6}  {'peak RSS MB':>11}  {'s/step':>6}"
    )
    whole = rows[0]["total"]
    failed = False
    for r in rows:
        flag = "-"
        if r["strategy"] == "fsdp":
            ok = abs(r["total"] - whole / r["world"]) <= tolerance * whole / r["world"]
            flag = "ok" if ok else "OFF"
            failed |= not ok
        print(
            f"{r['strategy']:<5} {r['world']:>5}  {r['params'] / MB:>9.1f}  "
            f"{r['grads'] / MB:>8.1f}  {r['optimizer'] / MB:>8.1f}  {r['total'] / MB:>8.1f}  "
            f"{r['total'] / whole:>5.3f}  {r['rss'] / MB:>6.0f}  {r['peak_rss'] / MB:>11.0f}  "
            f"{r['step_s']:>6.2f}  {flag}"
        )
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark with the command line `argv` (default: sys.argv); returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--params", type=int, default=50_000_000, help="about this many"
    )
    parser.add_argument("--depth", type=int, default=16, help="blocks (FSDP units)")
    parser.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--steps", type=int, default=3, help="training batches")
    parser.add_argument("--bs", type=int, default=8, help="rows per batch per process")
    parser.add_argument("--no-ddp", action="store_true", help="skip the DDP row")
    parser.add_argument("--tolerance", type=float, default=0.10)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--strategy", default="fsdp", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    if args.steps < 1 or args.bs < 1 or min(args.worlds) < 1:
        parser.error("--steps, --bs and --worlds must be positive.")
    worlds = sorted({1, *args.worlds})
    width = width_for(args.params, args.depth)
    print(
        f"torch {torch.__version__}, gloo on CPU, 1 thread per process: {args.depth} blocks "
        f"of width {width}, AdamW float32, {args.steps} steps of {args.bs} rows per process"
    )
    runs = [("fsdp", n) for n in worlds]
    if not args.no_ddp:
        runs.append(("ddp", 2))
    with tempfile.TemporaryDirectory(prefix="learnloop-fsdp-") as folder:
        rows = [row(s, n, launch(args, s, n, Path(folder))) for s, n in runs]
    return report(rows, args.tolerance)


if __name__ == "__main__":
    sys.exit(main())
