"""How a fit continues: resume='auto', mid-epoch positions, the restarted loader, preemption stops.

`LongRuns` is a part of `Learner` (a base class of it), kept here so the loop itself stays short.
What it adds to a fit:

- `resume="auto"` picks the attached CheckpointCB's `last.pt`, or a fresh start (`_auto_resume`).
- Each epoch's training loader starts from RNG states kept for a mid-epoch checkpoint; a fit
  resumed from one starts the loader again from the saved states and skips the batches done in
  the sampler (`_start_training`, with `learnloop.midepoch`).
- `_position` is where the fit stands inside the epoch, for `state.capture`.
- At a batch boundary after a preemption signal (see `learnloop.preempt`), the CheckpointCB writes
  `last.pt` and the fit is cancelled (`_check_preempted`); `fit` then raises `Preempted`.
"""

from __future__ import annotations

import logging
import signal
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from .callbacks.tracking import CheckpointCB, holds_unsynced_grads
from .checkpoint import latest_checkpoint
from .dist import agree_any, any_process, is_distributed, is_main_process
from .events import CancelFitException
from .midepoch import fresh_iterator, skip_batches
from .rng import RngSnapshot, set_rng_state

__all__ = ["LongRuns"]

log = logging.getLogger(__name__)


class LongRuns:
    """The Learner's part that resumes fits (mid-epoch too) and stops them on preemption signals."""

    # Set by Learner (see its __init__ and run state).
    cbs: list[Any]
    epoch: int
    _resume_at: dict[str, Any] | None
    _epoch_start: dict[str, Any] | None
    _train_done: int | None
    _train_closed: bool
    _valid_rng: RngSnapshot | dict[str, Any] | None

    def _where(self) -> str:  # Learner's: where the loop is, for messages
        raise NotImplementedError

    def _checkpointing(self) -> bool:
        """Whether a CheckpointCB is attached (it may write inside an epoch)."""
        return any(isinstance(cb, CheckpointCB) for cb in self.cbs)

    def _auto_resume(self) -> Path | None:
        """resume='auto': the attached CheckpointCB's last.pt if rank 0 sees one, else None (a fresh start)."""
        found = [cb for cb in self.cbs if isinstance(cb, CheckpointCB)]
        if not found:
            raise ValueError(
                "resume='auto' resumes from a CheckpointCB's last.pt, but none is attached: add "
                "CheckpointCB(folder) to the Learner or to fit's cbs, or pass resume=<file>."
            )
        last = latest_checkpoint(found[0].path)
        exists = last is not None
        # Rank 0 decides for all once a process group runs, so that every rank resumes or none
        # does; before (a fresh torchrun process), each rank looks itself.
        if is_distributed():
            exists = any_process(is_main_process() and exists)
        if exists:
            log.info("resume='auto': resuming from %s.", last or found[0].path)
            return last or found[0].path
        log.info(
            "resume='auto': no checkpoint in %s yet, starting fresh.", found[0].path
        )
        return None

    def _start_training(self, dl: Iterable[Any]) -> tuple[Iterable[Any], int]:
        """The loader this epoch's training reads and its first batch: 0, or a resumed fit's next batch.

        The RNG states at the loader's start are kept for mid-epoch checkpoints. A resumed fit
        starts the loader again from the saved states, so the sampler draws the same order, and
        skips the batches done in the sampler (`learnloop.midepoch`), fetching none of them.
        """
        at, self._resume_at = self._resume_at, None
        if at is None:
            self._epoch_start = {
                "rng": RngSnapshot(dl),
                "fresh": fresh_iterator(dl),
            }
            self._train_done = 0
            return dl, 0
        self._epoch_start, self._train_done = at, at["batches"]

        def at_start() -> None:
            set_rng_state(at["rng"], dl)

        def after_skip() -> None:
            set_rng_state(at["now_rng"], dl)

        # A new iterator draws its worker seed before the sampler draws its order, so the state
        # goes back before the iterator is made; a reused one (persistent workers) draws only the
        # order, so the state goes back as the sampler starts.
        if at["fresh"]:
            at_start()
        before = None if at["fresh"] else at_start
        return skip_batches(dl, at["batches"], before, after_skip), at["batches"]  # type: ignore[arg-type]

    def _position(self) -> dict[str, Any] | None:
        """Where the fit stands inside the epoch, for a checkpoint; None between epochs."""
        if self._train_done is None or self._epoch_start is None:
            return None
        phase = "valid" if self._train_closed else "train"
        return {
            "epoch": self.epoch,
            "phase": phase,
            "batches": self._train_done,
            "rng": _as_state(self._epoch_start["rng"]),
            "fresh": self._epoch_start["fresh"],
            "valid_rng": _as_state(self._valid_rng) if phase == "valid" else None,
        }

    def _check_preempted(self, stop: Any, agree: bool) -> None:
        """At a batch boundary: stop the fit if a preemption signal arrived (on any process)."""
        if agree:
            # Every process stops at the same batch, or the others would wait in DDP's all-reduce.
            if not agree_any(stop.signum is not None):
                return
            stop.signum = stop.signum or signal.SIGTERM
        if holds_unsynced_grads(self):  # type: ignore[arg-type]
            return  # FSDP holds a group's gradients inside itself: stop at the group's end
        stop.handled = True
        stop.where = self._where()
        stop.checkpoint = None
        for cb in self.cbs:
            if isinstance(cb, CheckpointCB):
                stop.checkpoint = cb.save_last(self)
        if stop.checkpoint is None and is_main_process():
            log.warning(
                "%s arrived at %s, but no CheckpointCB is attached: nothing is saved.",
                signal.Signals(stop.signum).name,
                stop.where,
            )
        raise CancelFitException(f"preempted by {signal.Signals(stop.signum).name}")


def _as_state(rng: RngSnapshot | dict[str, Any] | None) -> dict[str, Any] | None:
    """A snapshot taken in this fit as `rng_state`'s dict; a loaded state (a resumed fit's) as it is."""
    return rng.state() if isinstance(rng, RngSnapshot) else rng
