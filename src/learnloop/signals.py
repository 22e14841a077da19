"""Signal deferral: hold signals while a critical section runs, then deliver them to their handlers.

A Ctrl-C handled inside `torch.save` raises KeyboardInterrupt in its Python write callback, which
the C++ writer turns into `RuntimeError: [enforce fail at inline_container.cc]`, mid-file. Held
until the write is over, the same signal becomes an ordinary KeyboardInterrupt at a point where
the file is either whole or removed. Python runs signal handlers on the main thread only, so in
other threads `defer_signals` holds nothing (no signal can interrupt them there anyway).
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

__all__ = ["HeldSignals", "defer_signals", "handlers_replaced"]


class HeldSignals:
    """What `defer_signals` holds: `received` lists the signals that arrived, in order, repeats included."""

    def __init__(self, signals: tuple[int, ...]) -> None:
        self.signals = signals
        self.received: list[int] = []

    def __bool__(self) -> bool:
        return bool(self.received)

    def __repr__(self) -> str:
        names = [signal.Signals(s).name for s in self.received]
        return f"HeldSignals(signals={list(map(int, self.signals))}, received={names})"


@contextmanager
def handlers_replaced(
    signals: Iterable[int], handler: Callable[[int, Any], None]
) -> Iterator[None]:
    """Let `handler` handle `signals` while the block runs, then put the previous handlers back.

    Only the main thread can install handlers: elsewhere nothing changes. A signal that is
    ignored (SIG_IGN) stays ignored, and one whose handler was installed outside Python (None,
    which could not be put back) is left alone.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {}
    try:
        for sig in signals:
            old = signal.getsignal(sig)
            if old is not None and old != signal.SIG_IGN:
                previous[sig] = signal.signal(sig, handler)
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


@contextmanager
def defer_signals(
    signals: Iterable[int] = (signal.SIGINT,),
) -> Iterator[HeldSignals]:
    """Hold `signals` while the block runs; on exit put the previous handlers back and deliver them.

    Each signal that arrived is delivered once, in order of arrival, to the handler that was in
    place before: the default SIGINT handler raises KeyboardInterrupt there, a custom one is
    called, an ignored signal stays ignored. A second signal while held is only recorded. The
    block sees what arrived so far in the yielded `HeldSignals` (to stop early, say).
    """
    held = HeldSignals(tuple(signals))

    def record(signum: int, frame: object) -> None:
        held.received.append(signum)

    try:
        with handlers_replaced(held.signals, record):
            yield held
    finally:
        first: BaseException | None = None
        for sig in dict.fromkeys(held.received):
            # The restored handler runs before raise_signal returns (a KeyboardInterrupt for SIGINT).
            try:
                signal.raise_signal(sig)
            except BaseException as e:  # noqa: BLE001 - deliver the others too; the first error wins
                first = first or e
        if first is not None:
            raise first
