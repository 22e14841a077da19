"""The closed list of loop events, what each passes to its hooks, and the Cancel* exceptions.

Kept apart from `learner.py` so that callback modules and the learner can both import it
without an import cycle. Every other module takes event names from here: the loop, the
dispatch table, the typo check and the docs.
"""

from __future__ import annotations

__all__ = [
    "EVENTS",
    "EVENT_CONTEXT",
    "EVENT_SCOPES",
    "CancelBackwardException",
    "CancelBatchException",
    "CancelEpochException",
    "CancelException",
    "CancelFitException",
    "CancelStepException",
    "CancelTrainException",
    "CancelValidException",
]


class CancelException(Exception):
    """Base of the Cancel* exceptions: raise one from a hook to skip the rest of a level."""


class CancelFitException(CancelException):
    """Stop the fit; `after_cancel_fit` then `after_fit` run."""


class CancelEpochException(CancelException):
    """Skip the rest of this epoch; `after_cancel_epoch` then `after_epoch` run."""


class CancelTrainException(CancelException):
    """Skip the rest of this training phase; `after_cancel_train` then `after_train` run."""


class CancelValidException(CancelException):
    """Skip the rest of this validation phase; `after_cancel_validate` then `after_validate` run."""


class CancelBatchException(CancelException):
    """Skip the rest of this batch; `after_cancel_batch` then `after_batch` run."""


class CancelBackwardException(CancelException):
    """Skip `learn.backward()`; `after_cancel_backward` then `after_backward` run."""


class CancelStepException(CancelException):
    """Skip `learn.step()`; `after_cancel_step` then `after_step` run."""


# The levels the loop nests, outermost first, with the exception that cancels each.
LEVELS: dict[str, type[CancelException]] = {
    "fit": CancelFitException,
    "epoch": CancelEpochException,
    "train": CancelTrainException,
    "validate": CancelValidException,
    "batch": CancelBatchException,
    "backward": CancelBackwardException,
    "step": CancelStepException,
}

# Keyword arguments each event passes: hooks are called as hook(learn, **context).
EVENT_CONTEXT: dict[str, tuple[str, ...]] = {
    "before_fit": ("n_epochs",),
    "after_fit": ("n_epochs",),
    "before_epoch": ("epoch",),
    "after_epoch": ("epoch",),
    "before_train": ("epoch",),
    "after_train": ("epoch",),
    "before_validate": ("epoch",),
    "after_validate": ("epoch",),
    "before_batch": ("iter",),  # the batch is learn.batch: callbacks may replace it
    "after_pred": ("preds",),
    "after_loss": ("loss",),
    "before_backward": ("loss",),
    "after_backward": ("loss",),
    "before_step": (),
    "after_step": (),
    "after_batch": ("iter", "loss"),
    **{f"after_cancel_{level}": ("exception",) for level in LEVELS},
}

EVENTS: tuple[str, ...] = tuple(EVENT_CONTEXT)


def _events_of(level: str) -> tuple[str, ...]:
    return (f"before_{level}", f"after_{level}", f"after_cancel_{level}")


# The part of the run each event belongs to: "fit", "epoch", "phase" (a training or validation
# pass) or "batch" (its pieces included), so an error note can say where it happened.
EVENT_SCOPES: dict[str, str] = {
    **dict.fromkeys(EVENTS, "batch"),
    **dict.fromkeys(_events_of("train") + _events_of("validate"), "phase"),
    **dict.fromkeys(_events_of("epoch"), "epoch"),
    **dict.fromkeys(_events_of("fit"), "fit"),
}
