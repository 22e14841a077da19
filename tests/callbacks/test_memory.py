"""Memory per step: the built-in callbacks keep a few bytes per recorded value, not a tensor per step.

A fit of n training steps on a tiny task is measured at its last training batch (what a phase
holds: MetricsCB's losses too) and after it (what the run keeps: the Recorder's lrs and losses,
GradClipCB's norms), with tracemalloc (Python objects and arrays; a tensor kept per step shows
as its Python object), and by counting the tensors kept (whose storage tracemalloc does not
see). Two run lengths are compared, so that what does not grow with the steps cancels out.
benchmarks/memory.py measures the same over 200,000 steps.
"""

from __future__ import annotations

import gc
import io
import tracemalloc

import pytest
import torch
from torch import nn

from learnloop import Callback, DataLoaders, GradClipCB, Learner, ProgressCB

# Values recorded per training step: the Recorder's lr and loss, GradClipCB's norm.
RECORDED = 3
BYTES_PER_VALUE = 16
# Multiples of the chunk size (512), so no half-filled chunk is measured.
SHORT, LONG = 512, 1536


def traced() -> int:
    """Bytes tracemalloc holds, after a garbage collection."""
    gc.collect()
    return tracemalloc.get_traced_memory()[0]


def live_tensors() -> int:
    """Tensors alive (call after traced(), which collects the garbage)."""
    # type(), not isinstance(): that would call __class__ on lazy module proxies, which warn.
    return sum(issubclass(type(o), torch.Tensor) for o in gc.get_objects())


class Probe(Callback):
    """Measures at the last training batch, after every other callback has handled it."""

    order = 1000

    def __init__(self, last: int) -> None:
        self.last = last
        self.traced = 0

    def after_batch(self, learn, iter, **kwargs):
        if learn.training and iter == self.last:
            self.traced = traced()


def measure(n_steps: int) -> dict[str, int]:
    """Growth over a fit of `n_steps`: traced bytes in the phase and after it, tensors kept after it."""
    x, y = torch.randn(2, 4), torch.tensor([0, 1])
    dls = DataLoaders([(x, y)] * n_steps, [(x, y)])
    probe = Probe(n_steps - 1)
    progress = ProgressCB(file=io.StringIO(), bar=False)
    learn = Learner(nn.Linear(4, 2), dls, cbs=[progress, GradClipCB(1.0), probe])
    tracemalloc.start()
    try:
        start, tensors = traced(), live_tensors()
        learn.fit(1)
        end = traced()
    finally:
        tracemalloc.stop()
    assert len(learn.recorder.losses) == n_steps  # the run did record every step
    return {
        "phase_bytes": probe.traced - start,
        "kept_bytes": end - start,
        "kept_tensors": live_tensors() - tensors,
    }


@pytest.fixture(scope="module")
def growth() -> dict[str, float]:
    """Growth per training step, from a short and a long run (after a warm-up run)."""
    # Module-scoped, so it runs before conftest's per-test single thread: one thread is
    # several times faster for a model this small.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        measure(SHORT)  # warm-up: first use of each torch op allocates
        short, long = measure(SHORT), measure(LONG)
    finally:
        torch.set_num_threads(threads)
    return {k: (long[k] - short[k]) / (LONG - SHORT) for k in short}


@pytest.mark.parametrize("when", ["phase", "kept"])
def test_bytes_per_step_bounded(growth, when):
    """Python memory grows by at most 16 bytes per step per recorded value, in a phase and after it."""
    assert growth[f"{when}_bytes"] <= RECORDED * BYTES_PER_VALUE, growth


def test_no_tensor_per_step(growth):
    """Live tensors grow with the number of chunks, not the number of steps."""
    assert growth["kept_tensors"] <= 0.05, growth  # the old way kept 2 a step
