"""`CallbackHost`: the callbacks a Learner holds, and how their hooks are called.

The dispatch table (event -> bound hooks, in `order`) is rebuilt whenever the callbacks
change, so firing an event nobody listens to costs one dict lookup. While a `ProfileCB` is
attached, it instruments the table (every event marked, every hook timed). Errors raised in a hook
get a note naming the callback, the event and where the loop was (`_where`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from .callbacks.core import Callback, check_callback
from .errors import add_note
from .events import EVENTS, CancelException

__all__ = ["CallbackHost", "dispatch_table", "displaced", "sort_callbacks"]

log = logging.getLogger(__name__)

Hook = Callable[..., Any]
Table = dict[str, list[tuple[Callback, Hook]]]


def sort_callbacks(cbs: Iterable[Callback]) -> list[Callback]:
    """Callbacks in ascending `order`; ties keep the given order (sorted() is stable)."""
    return sorted(cbs, key=lambda cb: cb.order)


def dispatch_table(cbs: Iterable[Callback], instrument: bool = True) -> Table:
    """Map each event that someone listens to onto its `(callback, bound hook)` pairs, in order.

    An attached `ProfileCB` instruments it, unless `instrument` is False.
    """
    table: Table = {}
    ordered = sort_callbacks(cbs)
    for cb in ordered:
        for event in EVENTS:
            hook = getattr(cb, event, None)
            if hook is not None:
                table.setdefault(event, []).append((cb, hook))
    for cb in ordered if instrument else ():
        timed = getattr(cb, "instrument_dispatch", None)
        if timed is not None:  # a ProfileCB times every event and hook
            return timed(table)
    return table


def displaced(
    attached: Iterable[Callback], incoming: Iterable[Callback]
) -> list[Callback]:
    """The `unique` callbacks among `attached` that one of `incoming` replaces (same kind or a subclass)."""
    incoming = list(incoming)
    return [
        c
        for c in attached
        if getattr(c, "unique", False) and any(isinstance(x, type(c)) for x in incoming)
    ]


def _flat(cbs: tuple[Callback | Sequence[Callback], ...]) -> tuple[Callback, ...]:
    """`cbs` with lists and tuples among them opened: `add_cbs(a, b)` and `add_cbs([a, b])` alike."""
    return tuple(
        cb
        for item in cbs
        for cb in (item if isinstance(item, (list, tuple)) else [item])
    )


class CallbackHost:
    """Holds `cbs` in `order` and fires events at them; the Learner's base class."""

    cbs: list[Callback]

    def __init__(self) -> None:
        self.cbs = []
        self._table: Table = {}

    # ---------------------------------------------------------------- callbacks
    def add_cbs(self, *cbs: Callback | Sequence[Callback]) -> CallbackHost:
        """Attach callbacks, given one by one or as lists (fastai's `add_cbs([...])`), checked first."""
        cbs = _flat(cbs)
        for i, cb in enumerate(cbs):
            check_callback(cb)
            if any(cb is c for c in [*self.cbs, *cbs[:i]]):
                raise ValueError(
                    f"{cb!r} is already attached to this Learner: attach each callback once."
                )
        self.cbs = sort_callbacks([*self.cbs, *cbs])
        self._table = dispatch_table(self.cbs)
        return self

    def remove_cbs(self, *cbs: Callback | Sequence[Callback]) -> CallbackHost:
        """Detach callbacks that were attached with `cbs=` or `add_cbs` (one by one or as lists)."""
        cbs = _flat(cbs)
        for cb in cbs:
            if not any(cb is c for c in self.cbs):
                raise ValueError(
                    f"{cb!r} is not attached to this Learner; attached: {self.cbs}."
                )
        self.cbs = [c for c in self.cbs if not any(c is cb for cb in cbs)]
        self._table = dispatch_table(self.cbs)
        return self

    def show_training_loop(self) -> None:
        """Print, for each event, the callbacks that will run on it, in order."""
        table = dispatch_table(
            self.cbs, instrument=False
        )  # a ProfileCB's marks are no hooks
        for event in EVENTS:
            names = [
                cb.name if hasattr(cb, "name") else type(cb).__name__
                for cb, _ in table.get(event, [])
            ]
            print(f"{event:<24} {', '.join(names) if names else '-'}")

    def _fire(self, event: str, **context: Any) -> None:
        hooks = self._table.get(event)
        if hooks is None:  # nobody listens: one dict lookup
            return
        for cb, hook in hooks:
            try:
                hook(self, **context)
            except CancelException as e:
                # Kept for the message if it turns out to be raised outside its level.
                e._learnloop_raised_in = f"{type(cb).__name__}.{event}"  # type: ignore[attr-defined]
                raise
            except Exception as e:
                add_note(
                    e,
                    f"learnloop: raised in {type(cb).__name__}.{event} ({self._where(event)}).",
                )
                raise

    def _fire_cleanup(
        self, event: str, failure: BaseException | None, **context: Any
    ) -> None:
        """Call every hook of a cleanup event, even after one raises, so each gets to clean up.

        While `failure` propagates, a hook's error is logged and noted on it (the original error
        stays the one the user sees); otherwise the first hook error is raised at the end. A
        Cancel* raised here is ignored: the level it would cancel has already ended.
        """
        first: Exception | None = None
        for cb, hook in self._table.get(event, ()):
            try:
                hook(self, **context)
            except CancelException as e:
                # Nothing is left to cancel once a level ends: a Cancel* here stops nothing.
                log.debug("%s.%s raised %r during cleanup: ignored.", cb, event, e)
            except Exception as e:
                where = f"{type(cb).__name__}.{event} ({self._where(event)})"
                add_note(e, f"learnloop: raised in {where}.")
                if failure is None:
                    first = first or e
                else:
                    log.error("%s raised during cleanup", where, exc_info=e)
                    add_note(
                        failure,
                        f"learnloop: then {where} also raised {e!r}.",
                        once=False,
                    )
        if first is not None:
            raise first

    @contextmanager
    def _attached(self, extra: Sequence[Callback]) -> Iterator[None]:
        """Attach `extra` for one run (replacing attached `unique` ones of its kind), then restore."""
        if not extra:  # most fits: nothing to attach, no table to rebuild
            yield
            return
        hidden = displaced(self.cbs, extra)
        if hidden:
            self.remove_cbs(*hidden)
        try:
            self.add_cbs(*extra)
        except Exception:
            self.add_cbs(*hidden)
            raise
        try:
            yield
        finally:
            self.remove_cbs(*extra)
            self.add_cbs(*hidden)

    def _where(self, event: str | None = None) -> str:
        """Where the run is when `event` fires, for error notes (the Learner says epoch and batch)."""
        return "outside a fit"
