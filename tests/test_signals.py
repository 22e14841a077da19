"""defer_signals: signals wait for the block to end, then reach the handler that was there before."""

from __future__ import annotations

import signal
import threading

import pytest

from learnloop.signals import defer_signals

pytestmark = pytest.mark.skipif(
    not hasattr(signal, "SIGUSR1"), reason="needs POSIX signals"
)


@pytest.fixture
def recorded():
    """SIGUSR1 and SIGTERM handled by a recorder for the test; the old handlers come back after."""
    seen: list[int] = []
    old = {
        s: signal.signal(s, lambda n, f: seen.append(n))
        for s in (signal.SIGUSR1, signal.SIGTERM)
    }
    yield seen
    for s, handler in old.items():
        signal.signal(s, handler)


def test_ctrl_c_is_held_until_the_block_ends():
    """SIGINT inside the block lets the block finish; KeyboardInterrupt comes on exit."""
    steps = []
    with pytest.raises(KeyboardInterrupt), defer_signals() as held:
        signal.raise_signal(signal.SIGINT)
        steps.append("after the signal")
        assert held.received == [signal.SIGINT]
    assert steps == ["after the signal"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM], ids=["USR1", "TERM"])
def test_second_signal_is_delivered_once_to_the_previous_handler(recorded, sig):
    """Two signals while held: the previous handler runs once, after the block, and is put back."""
    with defer_signals((sig,)):
        signal.raise_signal(sig)
        signal.raise_signal(sig)
        assert recorded == []
    assert recorded == [sig]
    assert signal.getsignal(sig) is not None and recorded == [sig]
    signal.raise_signal(sig)
    assert recorded == [sig, sig]  # the recorder is in place again


def test_several_signals_all_delivered_in_arrival_order(recorded):
    """Each held signal reaches its own handler, in the order they arrived."""
    with defer_signals((signal.SIGUSR1, signal.SIGTERM)):
        signal.raise_signal(signal.SIGTERM)
        signal.raise_signal(signal.SIGUSR1)
    assert recorded == [signal.SIGTERM, signal.SIGUSR1]


def test_ignored_signal_stays_ignored():
    """A signal set to SIG_IGN is left alone: nothing is held or delivered."""
    old = signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    try:
        with defer_signals((signal.SIGUSR1,)) as held:
            signal.raise_signal(signal.SIGUSR1)
        assert (
            held.received == [] and signal.getsignal(signal.SIGUSR1) == signal.SIG_IGN
        )
    finally:
        signal.signal(signal.SIGUSR1, old)


def test_interrupt_wins_over_an_error_in_the_block():
    """If the block fails and a Ctrl-C was held, KeyboardInterrupt comes out, the error as its context."""
    with pytest.raises(KeyboardInterrupt) as info, defer_signals():
        signal.raise_signal(signal.SIGINT)
        raise OSError("disk vanished")
    assert isinstance(info.value.__context__, OSError)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_other_threads_hold_nothing():
    """Outside the main thread (where Python cannot set handlers) the block just runs."""
    result = {}

    def run():
        with defer_signals() as held:
            result["held"] = held.received

    t = threading.Thread(target=run)
    t.start()
    t.join()
    assert result == {"held": []}
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
