"""The `Callback` base class, callback ordering, and the checks run when a callback is attached.

A callback is any object whose methods are named after events (see `learnloop.events`).
The checks here make mistakes fail at registration, before any batch runs: a class passed
instead of an instance, a method that looks like an event but is misspelled or is another
framework's hook (fastai v1's `begin_fit`, Lightning's `on_train_epoch_end`, miniai's
`cleanup_fit` and TrainCB's `predict`), any public `before_*`/`after_*`/`on_*`/`cleanup_*`
method that is no event (it would never be called), and a hook whose signature cannot take
`(learn, **context)`. A helper that must have such a name opts out with `@not_an_event`.
"""

from __future__ import annotations

import difflib
import inspect
import re
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from ..events import EVENT_CONTEXT, EVENTS

__all__ = ["ORDERS", "Callback", "as_callbacks", "check_callback", "not_an_event"]

F = TypeVar("F", bound=Callable[..., Any])

# The `order` of every built-in callback, in the order they run (lower first); each class takes
# its own from here. Your callbacks default to 0; place one by name, e.g.
# `order = MetricsCB.order + 1` to run after the metrics are recorded.
ORDERS: dict[str, int] = {
    "ProfileCB": -100,  # first: resets its records before anyone's before_fit runs
    "LimitBatchesCB": -30,  # before DeviceCB moves a batch that will not run
    "DeviceCB": -20,  # model and batch on the device before anyone reads them
    "CompileCB": -15,  # compiles the model once it is on its device
    "DistributedCB": -10,  # wraps the placed model in DDP, shards the loaders
    "LRFinderCB": -5,  # sets the sweep's lr in before_batch before anyone reads it
    "ActivationStatsCB": 5,
    "MetricsCB": 10,  # records the batch loss in after_loss, builds the epoch's row
    "TerminateOnNaNCB": 15,  # right after MetricsCB has recorded the loss
    "Recorder": 20,
    "GradAccumCB": 25,  # divides the loss before the (scaled) backward
    "BatchSchedCB": 27,
    "EpochSchedCB": 27,  # reads the epoch's row after MetricsCB has filled it
    "MixedPrecisionCB": 30,  # scaled backward, unscale, scaler step
    "GradClipCB": 35,  # clips the unscaled, true gradients
    "CSVLoggerCB": 40,  # after MetricsCB has finished the row
    "TensorBoardCB": 45,
    "CheckpointCB": 50,
    "ProgressCB": 60,  # the table shows the finished row
    "EarlyStoppingCB": 90,  # after the checkpoint and the table have seen the epoch
    "GatherPredsCB": 100,
    "SingleBatchCB": 1000,  # last: the batch completes for every other callback first
}


def _squash(name: str) -> str:
    return name.replace("_", "").lower()


_SQUASHED = {_squash(e): e for e in EVENTS}


class Callback:
    """Base class for callbacks: define methods named after events, e.g. `after_batch`.

    Hooks are called as `hook(learn, **context)`; swallow what you don't use with
    `def after_batch(self, learn, *args, **kwargs)`. Callbacks run in ascending `order`,
    ties in the order they were attached.

    Example:
        >>> class PrintEpoch(Callback):
        ...     def after_epoch(self, learn, epoch, **kwargs):
        ...         print("finished epoch", epoch)
    """

    #: Callbacks run in ascending order; see `ORDERS` for the built-in ones.
    order: int = 0
    #: False: `learn.lr_find` detaches this callback during its sweep.
    run_in_lr_find: bool = True
    #: False: `learn.profile` detaches this callback for its run (it writes files or stops fits).
    run_in_profile: bool = True
    #: True: one callback of this kind at a time; a new one (at construction, or in
    #: `fit(cbs=...)` for that fit) replaces the attached one, as the defaults are replaced.
    unique: bool = False

    @property
    def name(self) -> str:
        """The class name, used in messages."""
        return type(self).__name__

    def __repr__(self) -> str:
        return f"{self.name}(order={self.order})"


# Hook names from fastai v1 (begin_*), Lightning (on_*_start/end, on_before_*) and Keras
# (on_*_begin/end), translated to ours so that a user's habit gets a "did you mean".
_FOREIGN_PARTS = {
    "train_batch": "batch",
    "validation_batch": "batch",
    "train_epoch": "epoch",
    "validation_epoch": "validate",
    "validation": "validate",
    "optimizer_step": "step",
}


def _translate(name: str) -> str:
    n = name.lower()
    if n.startswith("begin_"):
        return "before_" + _FOREIGN_PARTS.get(n[6:], n[6:])
    m = re.fullmatch(r"on_(before|after)_(.+)", n)
    if m:
        return f"{m[1]}_{_FOREIGN_PARTS.get(m[2], m[2])}"
    m = re.fullmatch(r"on_(.+)_(start|begin|end)", n)
    if m:
        when = "after" if m[2] == "end" else "before"
        return f"{when}_{_FOREIGN_PARTS.get(m[1], m[1])}"
    return n


def _nearest_event(name: str) -> str | None:
    """The event `name` most likely meant, or None if it looks like no event."""
    for candidate in dict.fromkeys([_squash(name), _squash(_translate(name))]):
        if candidate in _SQUASHED:
            return _SQUASHED[candidate]
        close = difflib.get_close_matches(candidate, list(_SQUASHED), n=1, cutoff=0.8)
        if close:
            return _SQUASHED[close[0]]
    return None


# miniai's TrainCB methods: in learnloop they are the Learner's step pieces, not hooks.
_STEP_PIECES = ("predict", "get_loss", "backward", "step", "zero_grad")
# Names that say "call me at some point of the loop", so one that is no event is a mistake.
_EVENT_PREFIXES = ("before_", "after_", "on_", "cleanup_", "begin_")
_NOT_AN_EVENT = "__learnloop_not_an_event__"
# Words of other frameworks' hook names, and the events that come nearest to what they name.
_WORD_EVENTS = {
    "loss": ("after_loss",),
    "pred": ("after_pred",),
    "predict": ("after_pred",),
    "zero": ("after_step",),
    "grad": ("after_backward", "after_step"),
    "create": ("before_fit",),  # fastai's after_create: do it in __init__ or before_fit
    "init": ("before_fit",),
}
# Where a callback acts around each step piece instead of replacing it.
_AROUND = {
    "predict": "after_pred",
    "get_loss": "after_loss",
    "backward": "before_backward (raise CancelBackwardException to replace it)",
    "step": "before_step (raise CancelStepException to replace it)",
    "zero_grad": "after_step",
}


def not_an_event(method: F) -> F:
    """Mark `method` as a helper, not a hook, so its event-like name (`after_fit_report`) is allowed.

    Example:
        >>> class Report(Callback):
        ...     @not_an_event
        ...     def after_fit_summary(self):
        ...         return "..."
    """
    # On the function itself, so that it holds under @staticmethod or @classmethod too.
    setattr(getattr(method, "__func__", method), _NOT_AN_EVENT, True)
    return method


def _nearest_events(name: str, n: int = 3) -> list[str]:
    """Up to `n` events nearest to `name`: by what it names (its words), then by spelling."""
    words = set(name.lower().split("_")) | set(_translate(name).split("_"))
    words -= {"before", "after", "on", "cleanup", "begin", "start", "end", "cancel", ""}
    named = [e for w in sorted(words) for e in _WORD_EVENTS.get(w, ())]
    shared = [e for e in EVENTS if words & set(e.split("_")[1:])]

    def spelling(event: str) -> float:
        return difflib.SequenceMatcher(None, _squash(name), _squash(event)).ratio()

    ranked = [*named, *sorted(shared, key=spelling, reverse=True)]
    ranked += sorted(EVENTS, key=spelling, reverse=True)
    return list(dict.fromkeys(ranked))[:n]


def _refuse_method(cls: str, name: str) -> None:
    """Raise if the public method `name` of callback class `cls` cannot be what its author meant."""
    if name in _STEP_PIECES:
        raise ValueError(
            f"{cls}.{name}: learnloop's step pieces ({', '.join(_STEP_PIECES)}) are Learner "
            f"methods, not callback hooks (miniai's TrainCB). Subclass Learner and override "
            f"{name}(self) there (e.g. `class MyLearner(Learner): def {name}(self): ...`), or "
            f"act around it from a hook such as {_AROUND[name]}. A helper method that must "
            "have this name: decorate it with @learnloop.not_an_event."
        )
    level = name.removeprefix("cleanup_")
    if level != name and f"after_{level}" in EVENT_CONTEXT:
        after = f"after_{level}"
        when = (
            "it runs after errors and cancels too"
            if level == "fit"
            else "it runs after cancels too (after an error, after_fit runs, for every callback)"
        )
        raise ValueError(
            f"{cls}.{name}: learnloop has no cleanup_* events: use {after} instead: {when}."
        )
    nearest = _nearest_event(name)
    if nearest is None and not name.startswith(_EVENT_PREFIXES):
        return
    hint = (
        f"did you mean {nearest}?"
        if nearest
        else "the nearest events are " + ", ".join(_nearest_events(name)) + "."
    )
    raise ValueError(
        f"{cls}.{name} looks like an event but is not one, so it would never be called: {hint} "
        f"Valid events: {', '.join(EVENTS)}. A helper method that must have this name: "
        "decorate it with @learnloop.not_an_event."
    )


def _check_signature(cb: Any, event: str) -> None:
    hook = getattr(cb, event)
    if not callable(hook):
        raise TypeError(
            f"{type(cb).__name__}.{event} is not callable: hooks must be methods."
        )
    context = EVENT_CONTEXT[event]
    try:
        sig = inspect.signature(hook)
    except (TypeError, ValueError):  # builtins without a signature: trust them
        return
    try:
        sig.bind(object(), **{key: None for key in context})
    except TypeError as e:
        args = ", ".join(["learn"] + [f"{k}=..." for k in context])
        raise TypeError(
            f"{type(cb).__name__}.{event}{sig} cannot be called as {event}({args}) ({e}). "
            f"Define it as `def {event}(self, learn, *args, **kwargs)`."
        ) from None


def check_callback(cb: Any) -> None:
    """Raise if `cb` is not a usable callback instance: a class, a misspelled hook, a bad signature."""
    if isinstance(cb, type):
        raise TypeError(
            f"Got the class {cb.__name__}, not an instance: pass {cb.__name__}() instead."
        )
    if not hasattr(cb, "order"):
        raise TypeError(
            f"{cb!r} ({type(cb).__name__}) is not a callback: subclass learnloop.Callback "
            "and name its methods after events (before_fit, after_batch, ...)."
        )
    for name in dir(type(cb)):
        if name.startswith("_"):
            continue
        if name in EVENT_CONTEXT:
            _check_signature(cb, name)
            continue
        method = getattr(type(cb), name, None)
        if (
            callable(method)
            and not getattr(method, _NOT_AN_EVENT, False)
            and not _from_torch(type(cb), name)
        ):
            _refuse_method(type(cb).__name__, name)


def _from_torch(cls: type, name: str) -> bool:
    """Whether `cls` has `name` from a torch base class (a callback that is also an nn.Module has
    its `zero_grad`): that name is torch's, not a hook of the callback's author."""
    owner = next((k for k in cls.__mro__ if name in vars(k)), None)
    return owner is not None and owner.__module__.split(".")[0] == "torch"


def as_callbacks(cbs: Callback | Sequence[Callback] | None) -> list[Callback]:
    """`cbs` as a list: None is no callback, and a single callback is a list of one."""
    if cbs is None:
        return []
    if isinstance(cbs, (list, tuple)):
        return list(cbs)
    if isinstance(cbs, type) or hasattr(cbs, "order"):
        return [cbs]  # type: ignore[list-item]  # a class: check_callback says to instantiate it
    try:
        return list(cbs)  # type: ignore[arg-type]
    except TypeError:
        raise TypeError(
            f"cbs must be a callback or a list of callbacks, got {type(cbs).__name__}."
        ) from None
