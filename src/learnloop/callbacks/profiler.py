"""`ProfileCB`: where each step's time goes, measured inside the loop users actually run.

While a ProfileCB is attached, `dispatch.dispatch_table` hands it the dispatch table to instrument
(`instrument_dispatch`): every event gets a mark when it opens and when it closes, and every hook
is timed. The time between two marks is the step piece the loop ran there (between `before_batch`
and `after_pred`: the forward pass; between `after_batch` and the next `before_batch`: waiting
for the loader), the time inside hooks goes to their callback and event (`DeviceCB.before_batch`
is the host-to-device move), and what is left inside an event is the loop's own dispatch. So the
parts tile each step exactly, with nothing counted twice. Without a ProfileCB, nothing of this
exists: the table holds the plain hooks and an event nobody listens to costs one dict lookup.

On CUDA (and MPS) each mark synchronises the device first, so the parts are the device's time,
not the launch's; that happens in profiled fits only, never in a normal one.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from ..errors import check_int
from ..events import (
    EVENTS,
    CancelBackwardException,
    CancelFitException,
    CancelStepException,
)
from .core import ORDERS, Callback
from .device import DeviceCB
from .metric_kinds import batch_size
from .profile_report import (
    BACKWARD,
    FORWARD,
    HOST_TO_DEVICE,
    LOADER,
    LOOP,
    LOSS,
    STEP,
    ZERO_GRAD,
    PhaseProfile,
    ProfileReport,
)
from .training import MixedPrecisionCB

if TYPE_CHECKING:
    from ..learner import Learner

__all__ = ["ProfileCB"]

Hook = Callable[..., Any]
Table = dict[str, list[tuple[Any, Hook]]]

# What the loop runs between one event's end and the next one's start.
_BETWEEN: dict[tuple[str, str], str] = {
    ("after_batch", "before_batch"): LOADER,
    ("before_train", "before_batch"): LOADER,
    ("before_validate", "before_batch"): LOADER,
    ("before_batch", "after_pred"): FORWARD,
    ("after_pred", "after_loss"): LOSS,
    (
        "after_pred",
        "after_batch",
    ): LOSS,  # a batch without targets: get_loss set no loss
    ("before_backward", "after_backward"): BACKWARD,
    ("before_step", "after_step"): STEP,
    ("after_step", "after_batch"): ZERO_GRAD,
}

_PHASES = {"before_train": "train", "before_validate": "valid"}

# MixedPrecisionCB's hook of these events that raises the Cancel has done the piece in the
# loop's place (the scaled backward, the scaler's step).
_REPLACES: dict[str, tuple[type[BaseException], str]] = {
    "before_backward": (CancelBackwardException, BACKWARD),
    "before_step": (CancelStepException, STEP),
}


class ProfileCB(Callback):
    """Times every part of each step: the loader, the device move, forward, loss, backward, step, zero_grad, each hook.

    `learn.profile()` attaches one for a few batches and returns its report. Attached to a fit of
    yours (`learn.fit(3, cbs=ProfileCB())`), it times the whole fit (add `LimitBatchesCB` for
    fewer batches); `.report()` then says where the time went. The first `warmup` batches of each
    phase (worker start-up, first allocations) run but are not counted, unless a phase has no
    other.

    Example:
        >>> profiler = ProfileCB()  # doctest: +SKIP
        >>> learn.fit(1, cbs=profiler)  # doctest: +SKIP
        >>> print(profiler.report())  # doctest: +SKIP
    """

    order = ORDERS["ProfileCB"]  # first: its marks open before any hook
    unique = True
    run_in_lr_find = False

    def __init__(self, warmup: int = 2) -> None:
        check_int(warmup, "ProfileCB warmup", minimum=0, unit="batches")
        self.warmup = warmup
        # Set by learn.profile: the callbacks it detached, and those it added (not timed).
        self.skipped: list[str] = []
        self.untimed: tuple[Callback, ...] = ()
        self._reset()

    def _reset(self) -> None:
        # Per phase, one dict per batch: part -> seconds, plus "_wall", "_samples", "_events",
        # "_hooks" (the profiler's own marks and timed hooks, to estimate its cost).
        self._batches: dict[str, list[dict[str, float]]] = {"train": [], "valid": []}
        self._phase: str | None = None
        self._current: dict[str, float] = {}
        self._last_event = ""
        self._last_end = self._event_start = self._batch_start = 0.0
        self._event_hooks = 0.0
        self._clock: Callable[[], float] = time.perf_counter
        self._synced = ""
        self._loader: Any = None

    # ---------------------------------------------------------------- instrumenting
    def _own(self, cb: Any) -> bool:
        """Whether `cb` is part of the profiling (this callback, learn.profile's limit): not timed."""
        return cb is self or any(cb is c for c in self.untimed)

    def instrument_dispatch(self, table: Table) -> Table:
        """The dispatch table with every event marked and every hook timed (see the module docstring)."""
        timed: Table = {}
        for event in EVENTS:
            hooks = [
                (cb, h if self._own(cb) else self._timed(cb, event, h))
                for cb, h in table.get(event, ())
            ]
            timed[event] = [
                (self, self._opener(event)),
                *hooks,
                (self, self._closer(event)),
            ]
        return timed

    def _opener(self, event: str) -> Hook:
        phase = _PHASES.get(event)

        def open_event(learn: Learner, **context: Any) -> None:
            if phase is not None:
                self._start_phase(learn, phase)
            t = self._clock()
            part = _BETWEEN.get((self._last_event, event), LOOP)
            current = self._current
            current[part] = current.get(part, 0.0) + t - self._last_end
            current["_events"] = current.get("_events", 0.0) + 1
            self._event_start, self._event_hooks = t, 0.0

        return open_event

    def _closer(self, event: str) -> Hook:
        def close_event(learn: Learner, **context: Any) -> None:
            self._close(learn, event)

        return close_event

    def _close(self, learn: Learner, event: str) -> None:
        """End `event`: what its hooks did not take was dispatch; a batch ends at `after_batch`."""
        t = self._clock()
        current = self._current
        inside = t - self._event_start - self._event_hooks
        current[LOOP] = current.get(LOOP, 0.0) + inside
        self._last_event, self._last_end = event, t
        if event == "after_batch" and self._phase is not None:
            current["_wall"] = t - self._batch_start
            current["_samples"] = batch_size(learn.yb, learn.xb)
            self._batches[self._phase].append(current)
            self._current, self._batch_start = {}, t
        elif event in _PHASES:  # the phase's first batch starts here
            self._current, self._batch_start = {}, t

    def _timed(self, cb: Any, event: str, hook: Hook) -> Hook:
        part = (
            HOST_TO_DEVICE
            if isinstance(cb, DeviceCB) and event == "before_batch"
            else f"{type(cb).__name__}.{event}"
        )

        # Only MixedPrecisionCB's scaler path runs backward and the step in the loop's place; another
        # callback's Cancel skips them, and its time stays its own.
        replaced = _REPLACES.get(event) if isinstance(cb, MixedPrecisionCB) else None

        def timed_hook(learn: Learner, **context: Any) -> Any:
            t = self._clock()
            try:
                result = hook(learn, **context)
            except BaseException as e:
                # A hook that ran the piece itself and cancels the loop's (MixedPrecisionCB's
                # scaled backward and step) did that piece's work: it counts as the piece.
                ran = replaced is not None and isinstance(e, replaced[0])
                self._add_hook(replaced[1] if ran else part, self._clock() - t)  # type: ignore[index]
                # The event's later hooks and close mark will not run (a Cancel*, an error):
                # close it here, so its time is not counted again in the next interval.
                self._close(learn, event)
                raise
            self._add_hook(part, self._clock() - t)
            return result

        return timed_hook

    def _add_hook(self, part: str, spent: float) -> None:
        self._event_hooks += spent
        current = self._current
        current[part] = current.get(part, 0.0) + spent
        current["_hooks"] = current.get("_hooks", 0.0) + 1

    def _start_phase(self, learn: Learner, phase: str) -> None:
        # A fit's signal record is set from its start to its last after_fit: an evaluation inside
        # a fit (a callback's validate() in after_fit) joins the fit's report; validate() or
        # get_preds() on their own start a report of their own.
        if phase == "valid" and getattr(learn, "_signals", None) is None:
            self._reset()
        self._phase = phase
        if phase == "train" or not self._batches["train"]:
            self._loader = learn.dl  # the training loader's, else the validation one's
        if not self._synced:
            self._use_device_clock(learn)

    def _use_device_clock(self, learn: Learner) -> None:
        """On CUDA or MPS, each mark waits for the device first (profiled runs only)."""
        first = next(learn.model.parameters(), None)
        kind = first.device.type if first is not None else "cpu"
        perf_counter = time.perf_counter
        if kind == "cuda":
            device = first.device  # type: ignore[union-attr]

            def clock() -> float:
                torch.cuda.synchronize(device)
                return perf_counter()

            self._clock = clock
        elif kind == "mps":

            def clock() -> float:
                torch.mps.synchronize()
                return perf_counter()

            self._clock = clock
        self._synced = kind

    # ---------------------------------------------------------------- events
    def before_fit(self, learn: Learner, *args: Any, **kwargs: Any) -> None:
        self._reset()

    # ---------------------------------------------------------------- the report
    def report(self) -> ProfileReport:
        """Where each step's time went, per phase, with the one thing to do about it."""
        phases = {
            name: self._phase_profile(name, batches)
            for name, batches in self._batches.items()
            if batches
        }
        if not phases:
            raise RuntimeError(
                "ProfileCB timed no batch: attach it to a fit that runs batches "
                "(learn.fit(1, cbs=ProfileCB())), or use learn.profile()."
            )
        per_mark, per_hook = _own_cost()
        return ProfileReport(
            phases=phases,
            device=self._synced or "cpu",
            synced=self._synced in ("cuda", "mps"),
            profiler_us={
                name: 1e6 * (p.marks * per_mark + p.timed_hooks * per_hook)
                for name, p in phases.items()
            },
            num_workers=getattr(self._loader, "num_workers", None),
            skipped=list(self.skipped),
        )

    def _phase_profile(
        self, name: str, batches: list[dict[str, float]]
    ) -> PhaseProfile:
        counted = batches[self.warmup :] or batches
        n = len(counted)
        parts: dict[str, float] = {}
        for b in counted:
            for part, seconds in b.items():
                if not part.startswith("_"):
                    parts[part] = parts.get(part, 0.0) + seconds
        mean = lambda key: sum(b.get(key, 0.0) for b in counted) / n
        return PhaseProfile(
            name=name,
            n_batches=n,
            warmup=len(batches) - n,
            step_us=1e6 * mean("_wall"),
            samples=mean("_samples"),
            parts_us={part: 1e6 * s / n for part, s in parts.items()},
            marks=mean("_events"),
            timed_hooks=mean("_hooks"),
        )


class _EndBeforeEpochEnd(Callback):
    """Ends the fit as its first epoch ends, before anyone's `after_epoch`: no row, no epoch logged.

    `learn.profile` runs one epoch with it, so its batches leave no table row behind.
    """

    order = ORDERS["ProfileCB"] - 1  # first of all at after_epoch

    def after_epoch(self, learn: Learner, *args: Any, **kwargs: Any) -> None:
        raise CancelFitException("profile: done")


def _own_cost(repeats: int = 2000) -> tuple[float, float]:
    """Seconds the profiler adds per event it marks and per hook it times, measured here."""
    probe = ProfileCB()

    def noop(learn: Any, **context: Any) -> None:
        return None

    plain = [(probe, noop)]
    marked = probe.instrument_dispatch({"after_step": plain})
    timed = marked["after_step"]
    bare = marked["before_step"]  # an event with marks only

    def cost(entries: list[tuple[Any, Hook]]) -> float:
        t = time.perf_counter()
        for _ in range(repeats):
            for _, hook in entries:
                hook(None)
        return (time.perf_counter() - t) / repeats

    per_mark = max(0.0, cost(bare))  # an event's two marks (its open and close)
    per_hook = max(0.0, cost(timed) - per_mark - cost(plain))
    return per_mark, per_hook
