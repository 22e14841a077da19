"""A trial fit: a short run (`lr_find`'s sweep, `profile`'s batches) that leaves the learner as it was.

`trial_fit` captures, then restores bit for bit (with `learnloop.state`, as checkpoints do): the
model's parameters, buffers and train/eval mode, the optimizer (none afterwards if there was none),
the random number generators, the counters, `epoch_log`, `resumed_from` and a loaded mid-epoch
position (kept: the trial itself runs a fresh epoch), and the attached callbacks:
the list itself, each one's attributes as they were bound (so a callback that starts new records in
`before_fit` keeps its old ones), and the `state_dict()` of those that have one (the Recorder's and
MetricsCB's records, a GradScaler). A list that a callback fills in place, without a `state_dict`,
keeps what the trial added: keep records in attributes you rebind, or give the callback a
`state_dict`; and read state that belongs to the learner (is the model compiled?) from the learner.
Callbacks that `skip` picks are detached for the trial. This holds when the trial stops early and
when it raises.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from .state import capture, restore

if TYPE_CHECKING:
    from .callbacks.core import Callback
    from .learner import Learner

__all__ = ["trial_fit"]


def trial_fit(
    learn: Learner,
    cbs: Sequence[Callback],
    skip: Callable[[Callback], bool],
    **fit_kwargs: Any,
) -> list[Callback]:
    """`learn.fit(cbs=cbs, **fit_kwargs)` without the callbacks `skip` picks, then restore `learn`.

    Returns the callbacks that were skipped.
    """
    saved = capture(learn, clone=True)
    mode, epoch_log, resumed = (
        learn.model.training,
        dict(learn.epoch_log),
        learn.resumed_from,
    )
    attached = list(learn.cbs)
    attributes = [dict(vars(cb)) for cb in attached]
    skipped = [cb for cb in attached if skip(cb)]
    # A loaded mid-epoch position is the learner's state: kept, while the trial runs a fresh epoch.
    position = learn._resume_at, learn.start_iter
    learn._resume_at, learn.start_iter = None, 0
    try:
        learn.remove_cbs(*skipped)
        learn.fit(cbs=list(cbs), **fit_kwargs)
    finally:
        learn.remove_cbs(*learn.cbs)
        for cb, before in zip(attached, attributes):
            vars(cb).clear()
            vars(cb).update(before)
        learn.add_cbs(*attached)
        # After the attributes: state_dict'd records filled in place (the Recorder's) go back too.
        restore(learn, saved)
        learn.model.train(mode)
        learn.epoch_log, learn.resumed_from = epoch_log, resumed
        learn._resume_at, learn.start_iter = position
    return skipped
