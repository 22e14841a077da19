"""Memory per training step: what the default callbacks and GradClipCB keep as a run gets longer.

    python benchmarks/memory.py                  # 200,000 steps in one epoch
    python benchmarks/memory.py --steps 50000 --device cuda

Trains Linear(4, 2) on one tiny batch served again and again (a loader that keeps nothing per
step; a step costs 100 to 150 us on one CPU thread), with the default callbacks (DeviceCB,
MetricsCB, Recorder, ProgressCB with its bars on, written to a null stream) plus GradClipCB:
three values recorded per step (the Recorder's lr and loss, GradClipCB's gradient norm).

Memory is read after about `--warmup` steps and again at the last training batch, when the
epoch holds the most (MetricsCB's running sums, the chunks not yet moved to the host), so the
growth in between is what the steps cost. The two reads are a multiple of the 512-value chunk
apart, so as many values wait to be stacked at both. Two runs, each with a fresh Learner: one
reads the resident set size (RSS, from /proc/self/statm), the other tracemalloc's traced bytes
(Python objects and arrays; a run of its own, as tracing slows each step and adds its own
records). On CUDA, `torch.cuda.memory_allocated` is read too, in a third run. Exits 1 if a
figure exceeds `--limit` bytes per step per recorded value. Takes about 2 minutes on a CPU.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import os
import resource
import sys
import time
import tracemalloc
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from learnloop import Callback, DataLoaders, DeviceCB, GradClipCB, Learner, ProgressCB

RECORDED = 3  # values per step: the Recorder's lr and loss, GradClipCB's gradient norm
CHUNK = 512  # values stacked at a time (ScalarLog, MetricsCB)


class Repeat:
    """`batch`, `n` times: a loader that holds nothing per step."""

    def __init__(self, batch: Any, n: int) -> None:
        self.batch, self.n = batch, n

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[Any]:
        return itertools.repeat(self.batch, self.n)


def rss_bytes() -> int:
    """The resident set size now (Linux), else the peak so far (resource's ru_maxrss: it only grows)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024


def traced_bytes() -> int:
    return tracemalloc.get_traced_memory()[0]


def cuda_bytes() -> int:
    torch.cuda.synchronize()
    return torch.cuda.memory_allocated()


class Probe(Callback):
    """Reads `measure()` after training batch `first` and after the last training batch."""

    order = 1000  # after every other callback has handled the batch

    def __init__(self, measure: Callable[[], int], first: int, last: int) -> None:
        self.measure, self.first, self.last = measure, first, last
        self.start = self.end = 0

    def after_batch(self, learn: Learner, iter: int, **kwargs: Any) -> None:
        if learn.training and iter in (self.first, self.last):
            gc.collect()  # garbage awaiting the collector is not memory the run keeps
            value = self.measure()
            if iter == self.first:
                self.start = value
            else:
                self.end = value


def run(
    measure: Callable[[], int], steps: int, warmup: int, device: str
) -> tuple[int, int, float]:
    """Growth of `measure()` over one epoch of `steps`, the steps it spans, and seconds per step."""
    torch.manual_seed(0)
    x, y = torch.randn(2, 4), torch.tensor([0, 1])
    dls = DataLoaders(Repeat((x, y), steps), Repeat((x, y), 1))
    last = steps - 1
    # Reads a multiple of the chunk size apart: as many values wait to be stacked at both.
    first = last - (last - warmup) // CHUNK * CHUNK
    probe = Probe(measure, first, last)
    null = open(os.devnull, "w")  # noqa: SIM115 - closed below, after the fit
    cbs = [DeviceCB(device), ProgressCB(file=null, bar=True), GradClipCB(1.0), probe]
    learn = Learner(nn.Linear(4, 2), dls, lr=0.01, cbs=cbs)
    start = time.perf_counter()
    learn.fit(1)
    seconds = time.perf_counter() - start
    null.close()
    assert len(learn.recorder.losses) == steps
    return probe.end - probe.start, last - first, seconds / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200_000)
    parser.add_argument(
        "--warmup", type=int, default=10_000, help="steps before the first read"
    )
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--limit", type=float, default=16.0, help="bytes per step per value"
    )
    args = parser.parse_args()
    if not 0 < args.warmup <= args.steps - 1 - CHUNK:
        parser.error(
            f"--warmup must be between 1 and --steps - {CHUNK + 1}, got {args.warmup}."
        )
    torch.set_num_threads(args.threads)
    print(
        f"torch {torch.__version__}, {args.device}, {args.threads} thread(s): {args.steps} steps "
        f"in one epoch, {RECORDED} values recorded per step"
    )
    print(
        f"{'measure':<20} {'growth (MB)':>12} {'B/step':>8} {'B/value':>8} {'limit':>6} "
        f"{'us/step':>8}"
    )
    measures: list[tuple[str, Callable[[], int]]] = [("RSS", rss_bytes)]
    if args.device.startswith("cuda"):
        measures.append(("cuda allocated", cuda_bytes))
    measures.append(("tracemalloc", traced_bytes))
    over = False
    for name, measure in measures:
        if name == "tracemalloc":
            tracemalloc.start()
        growth, n, seconds = run(measure, args.steps, args.warmup, args.device)
        if name == "tracemalloc":
            tracemalloc.stop()
        per_value = growth / n / RECORDED
        flag = "ok" if per_value <= args.limit else "OVER"
        over |= per_value > args.limit
        print(
            f"{name:<20} {growth / 1e6:>12.2f} {growth / n:>8.1f} {per_value:>8.1f} "
            f"{args.limit:>6.0f} {seconds * 1e6:>8.0f}  {flag}"
        )
    sys.exit(1 if over else 0)


if __name__ == "__main__":
    main()
