"""Preemption: the signals a scheduler sends before it kills a job, caught during a fit.

SLURM sends SIGTERM (or the signal asked for with `--signal=USR1@90`) some seconds before it kills
a job; cloud spot instances send SIGTERM; torchrun passes SIGTERM on to its workers. During
`Learner.fit`, `catch_signals` replaces the handlers of those signals by one that only records
the signal; the loop reads the record at the next batch boundary, writes `last.pt` through the
attached CheckpointCB, cancels the fit (every `after_fit` runs) and raises `Preempted`. The
previous handlers are put back when the fit ends, and a signal that arrived too late for the
loop to act on (after the last batch) is then delivered to them.

SLURM signals every process of a job, DataLoader workers included, and a torch worker dies on a
SIGTERM that its parent did not send; the main process then fails with "DataLoader worker ...
killed by signal" wherever it is, a checkpoint write included. So the loaders a fit iterates get
a `worker_init_fn` that makes their workers ignore the preemption signals (`shield_workers`):
the main process stops them as it stops any epoch's workers.
"""

from __future__ import annotations

import atexit
import signal
import weakref
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from torch.utils.data import DataLoader

from .signals import handlers_replaced

__all__ = [
    "DEFAULT_SIGNALS",
    "IgnoreInWorkers",
    "Preempted",
    "SignalRecord",
    "catch_signals",
    "release_workers",
    "shield_workers",
]

DEFAULT_SIGNALS: tuple[signal.Signals, ...] = (signal.SIGTERM, signal.SIGUSR1)


class Preempted(SystemExit):
    """Raised by `fit` after a preemption signal: the fit stopped at a batch boundary, saved, and cleaned up.

    It is a SystemExit, so a script that does not catch it ends quietly with exit status
    `128 + signal number` (143 for SIGTERM, 138 for SIGUSR1), as if the signal had killed it, and a
    bare `except Exception` does not swallow it; catch `Preempted` to handle it. `.signum` is the
    signal, `.checkpoint` the file written (None without a CheckpointCB).
    """

    def __init__(self, signum: int, checkpoint: Path | None, where: str) -> None:
        super().__init__(128 + signum)
        self.signum, self.checkpoint, self.where = signum, checkpoint, where

    def __str__(self) -> str:
        name = signal.Signals(self.signum).name
        if self.checkpoint is None:
            return (
                f"Preempted by {name} at {self.where}: no CheckpointCB is attached, so nothing "
                "was saved."
            )
        return (
            f"Preempted by {name} at {self.where}: wrote {self.checkpoint}. Run the same "
            "command with resume='auto' (learnloop train --resume auto) to continue."
        )


class SignalRecord:
    """The signals `catch_signals` recorded: `.signum` is the first (None: none yet); `.handled` is set by the loop."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.handled = False
        # Set by the loop when it acts: where it stopped and the checkpoint it wrote.
        self.where = ""
        self.checkpoint: Path | None = None

    def __call__(self, signum: int, frame: object) -> None:
        if self.signum is None:
            self.signum = signum


@contextmanager
def catch_signals(signals: Iterable[int]) -> Iterator[SignalRecord]:
    """Record `signals` instead of handling them while the block runs; put the old handlers back after.

    Only the main thread can install handlers: elsewhere nothing is caught (the record stays
    empty). A signal recorded but not `handled` by the end of the block is delivered to the old
    handler then (the default SIGTERM handler ends the process).
    """
    record = SignalRecord()
    try:
        with handlers_replaced(signals, record):
            yield record
    finally:
        if record.signum is not None and not record.handled:
            signal.raise_signal(record.signum)


class IgnoreInWorkers:
    """A DataLoader `worker_init_fn`: the worker ignores `signals`, then runs the loader's own `init`."""

    def __init__(
        self, signals: tuple[int, ...], init: Callable[[int], None] | None
    ) -> None:
        self.signals, self.init = signals, init

    def __call__(self, worker_id: int) -> None:
        for sig in self.signals:
            signal.signal(sig, signal.SIG_IGN)
        if self.init is not None:
            self.init(worker_id)


# Loaders whose persistent workers ignore SIGTERM: at exit, multiprocessing ends daemon workers
# with SIGTERM and then waits for them, which would wait forever. They are shut down first.
_PERSISTENT: weakref.WeakSet[DataLoader] = weakref.WeakSet()
_AT_EXIT: list[bool] = []  # registered yet?


def _stop_at_exit(dl: DataLoader) -> None:
    """Shut `dl`'s persistent workers down at interpreter exit, before multiprocessing waits for them."""
    if not _AT_EXIT:
        # Registered after multiprocessing's own exit handler, so it runs before it (atexit is LIFO).
        atexit.register(_shut_down_persistent_workers)
        _AT_EXIT.append(True)
    _PERSISTENT.add(dl)


def _shut_down_persistent_workers() -> None:
    for dl in list(_PERSISTENT):
        iterator = getattr(dl, "_iterator", None)
        shutdown = getattr(iterator, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()  # asks each worker to exit (no signal), then joins it


def release_workers(iterator: Any) -> None:
    """Shut down the workers of a loader `iterator` that a failed or cancelled phase leaves behind.

    Its workers ignore SIGTERM (see `shield_workers`), so a traceback kept after an error (the
    interpreter keeps the last one) would keep them alive, and the interpreter waiting for them at
    exit. Persistent workers stay: they serve the next epoch, and are shut down at exit.
    """
    if iterator is None or getattr(iterator, "_persistent_workers", False):
        return
    shutdown = getattr(iterator, "_shutdown_workers", None)
    if shutdown is not None:
        shutdown()


def shield_workers(dl: Any, signals: tuple[int, ...]) -> Callable[[], None] | None:
    """Make the workers `dl` starts from now on ignore `signals`; returns what undoes it (None: nothing done).

    Only a DataLoader with worker processes is changed, and only its `worker_init_fn`, which
    torch runs in each worker after its own signal handlers are set.
    """
    if (
        not signals
        or not isinstance(dl, DataLoader)
        or dl.num_workers == 0
        or isinstance(dl.worker_init_fn, IgnoreInWorkers)
    ):
        return None
    init = dl.worker_init_fn
    dl.worker_init_fn = IgnoreInWorkers(tuple(signals), init)
    if dl.persistent_workers:
        _stop_at_exit(dl)

    def undo() -> None:
        dl.worker_init_fn = init

    return undo
