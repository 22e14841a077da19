"""Schedules: `BatchSchedCB` and `EpochSchedCB` drive any torch scheduler; `OneCycle` is fastai's policy.

A scheduler is made by `sched_factory(learn.opt)` at the start of each fit (so
`functools.partial(torch.optim.lr_scheduler.StepLR, step_size=2)` works as it is). Batch
schedules advance once per training batch, in `after_batch`: the schedule follows training
progress, not the count of optimizer steps, so it ends on time with `GradAccumCB` or when
mixed precision skips a step. The optimizer keeps the last scheduled values after the fit,
as torch schedulers leave them; pass `lr=` to the next `fit` to start over.
"""

from __future__ import annotations

import logging
import math
import re
import warnings
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch

from ..errors import check_int, check_lr
from ..types import length
from .core import ORDERS, Callback
from .tracking import _SkipsCancelledEpochs

if TYPE_CHECKING:
    from ..learner import Learner

__all__ = ["BatchSchedCB", "EpochSchedCB", "OneCycle"]

log = logging.getLogger(__name__)

SchedFactory = Callable[[torch.optim.Optimizer], Any]


def cos_interp(start: float, end: float, pct: float) -> float:
    """Cosine interpolation from `start` (pct=0) to `end` (pct=1)."""
    return start + (end - start) * (1 - math.cos(math.pi * pct)) / 2


def _per_group(value: float | Sequence[float], n_groups: int, name: str) -> list[float]:
    if isinstance(value, (int, float)):
        return [check_lr(value, name)] * n_groups
    values = [check_lr(v, name) for v in value]
    if len(values) != n_groups:
        raise ValueError(
            f"{name} has {len(values)} values for {n_groups} parameter groups: give one per group."
        )
    return values


class OneCycle:
    """fastai's one-cycle policy as a scheduler: call `.step()` once per batch, `total_steps` times.

    The learning rate warms up from `lr_max/div` to `lr_max` over the first `pct_start` of
    training, then anneals to `lr_max/div_final`, both with cosine curves. Momentum (SGD's
    `momentum`, or the first of Adam's `betas`) moves the other way through `moms`. Momentum is
    only cycled in groups that use it: an SGD group with `momentum=0` stays plain SGD.

    Example:
        >>> opt = torch.optim.AdamW(model.parameters())  # doctest: +SKIP
        >>> sched = OneCycle(opt, total_steps=100, lr_max=1e-3)  # doctest: +SKIP
    """

    def __init__(
        self,
        opt: torch.optim.Optimizer,
        total_steps: int,
        lr_max: float | Sequence[float],
        pct_start: float = 0.25,
        div: float = 25.0,
        div_final: float = 1e5,
        moms: tuple[float, float, float] | None = (0.95, 0.85, 0.95),
    ) -> None:
        check_int(total_steps, "OneCycle total_steps", unit="batches")
        if not 0 <= pct_start <= 1:
            raise ValueError(f"pct_start must be in [0, 1], got {pct_start}.")
        if div <= 0 or div_final <= 0:
            raise ValueError(
                f"div and div_final must be positive, got div={div}, div_final={div_final}."
            )
        if moms is not None and len(moms) != 3:
            raise ValueError(f"moms must be (start, middle, end), got {moms!r}.")
        self.opt, self.total_steps, self.pct_start = opt, total_steps, pct_start
        self.lr_max = _per_group(lr_max, len(opt.param_groups), "lr_max")
        self.div, self.div_final, self.moms = div, div_final, moms
        self.last_step = 0
        self._set(0)

    def _pct(self, step: int) -> float:
        return step / max(self.total_steps - 1, 1)

    def lr_at(self, step: int) -> list[float]:
        """The learning rate of each group at `step` (0-based)."""
        pct, start = self._pct(step), self.pct_start
        out = []
        for lr_max in self.lr_max:
            if pct < start:
                out.append(cos_interp(lr_max / self.div, lr_max, pct / start))
            else:
                out.append(
                    cos_interp(
                        lr_max,
                        lr_max / self.div_final,
                        (pct - start) / max(1 - start, 1e-12),
                    )
                )
        return out

    def mom_at(self, step: int) -> float | None:
        """The momentum (or beta1) at `step`, None when momentum is not scheduled."""
        if self.moms is None:
            return None
        pct, start = self._pct(step), self.pct_start
        if pct < start:
            return cos_interp(self.moms[0], self.moms[1], pct / start)
        return cos_interp(
            self.moms[1], self.moms[2], (pct - start) / max(1 - start, 1e-12)
        )

    def _set(self, step: int) -> None:
        step = min(step, self.total_steps - 1)
        mom = self.mom_at(step)
        for group, lr in zip(self.opt.param_groups, self.lr_at(step)):
            group["lr"] = lr
            if mom is None:
                continue
            if "betas" in group:
                group["betas"] = (mom, *group["betas"][1:])
            elif group.get("momentum", 0):
                group["momentum"] = mom

    def step(self) -> None:
        """Move to the next batch's values (they stay at the final values past `total_steps`)."""
        self.last_step += 1
        self._set(self.last_step)

    def get_last_lr(self) -> list[float]:
        """The learning rate of each group now, as torch schedulers report it."""
        return [group["lr"] for group in self.opt.param_groups]

    def state_dict(self) -> dict[str, Any]:
        """The step count (the rest is given to the constructor)."""
        return {"last_step": self.last_step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume at the saved step."""
        self.last_step = state["last_step"]
        self._set(self.last_step)

    def __repr__(self) -> str:
        return f"OneCycle(total_steps={self.total_steps}, lr_max={self.lr_max}, pct_start={self.pct_start})"


class _SchedCB(Callback):
    """Makes a scheduler from `sched_factory(learn.opt)` at each fit start."""

    order = ORDERS["BatchSchedCB"]

    def __init__(self, sched_factory: SchedFactory) -> None:
        if not callable(sched_factory):
            raise TypeError(
                f"sched_factory must be callable as sched_factory(opt), got {type(sched_factory).__name__}: "
                "pass e.g. functools.partial(torch.optim.lr_scheduler.StepLR, step_size=2)."
            )
        self.sched_factory = sched_factory
        self.sched: Any = None
        self._loaded: dict[str, Any] | None = None

    def before_fit(self, learn: Learner, *args: Any, **kwargs: Any) -> None:
        resuming, loaded = learn.resumed_from is not None, self._loaded
        self._loaded = None
        if not resuming:
            # torch schedulers keep `initial_lr` in the optimizer: a fresh fit (with lr=, say)
            # starts from the optimizer's current rate, not the first fit's.
            for group in learn.opt.param_groups:
                group.pop("initial_lr", None)
        self.sched = self.sched_factory(learn.opt)
        if not callable(getattr(self.sched, "step", None)):
            raise TypeError(
                f"sched_factory returned {self.sched!r}, which has no step() method."
            )
        # Continue where the checkpoint left the schedule.
        if resuming and loaded is not None:
            self.sched.load_state_dict(loaded)
        self._first = True

    def state_dict(self) -> dict[str, Any]:
        """The scheduler's state (empty before the first fit), for checkpoints."""
        if self.sched is None:
            return {} if self._loaded is None else {"sched": self._loaded}
        return {"sched": self.sched.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Keep `state` for the scheduler that the next fit builds."""
        self._loaded = state.get("sched")

    def _step(self, *args: Any) -> None:
        if self._first:
            # torch warns when a scheduler steps before the optimizer has; here that only means
            # accumulation or a skipped fp16 step delayed the first optimizer step.
            self._first = False
            with warnings.catch_warnings():
                warnings.filterwarnings(
                    "ignore",
                    message=re.escape("Detected call of `lr_scheduler.step()` before"),
                )
                self.sched.step(*args)
        else:
            self.sched.step(*args)

    def __repr__(self) -> str:
        return f"{self.name}({self.sched_factory!r})"


class BatchSchedCB(_SchedCB):
    """Steps a scheduler made by `sched_factory(opt)` after every training batch.

    Example:
        >>> sched = partial(torch.optim.lr_scheduler.CosineAnnealingLR, T_max=60)  # doctest: +SKIP
        >>> learn.fit(10, cbs=[BatchSchedCB(sched)])  # doctest: +SKIP
    """

    run_in_lr_find = False  # lr_find detaches it for the sweep

    def after_batch(self, learn: Learner, *args: Any, **kwargs: Any) -> None:
        if learn.training:
            self._step()


class EpochSchedCB(_SchedCB, _SkipsCancelledEpochs):
    """Steps a scheduler made by `sched_factory(opt)` after every epoch.

    `ReduceLROnPlateau` is stepped with `learn.epoch_log[monitor]` (default the validation loss).

    Example:
        >>> sched = partial(torch.optim.lr_scheduler.StepLR, step_size=2, gamma=0.5)  # doctest: +SKIP
        >>> learn.fit(10, cbs=[EpochSchedCB(sched)])  # doctest: +SKIP
    """

    run_in_lr_find = False  # lr_find detaches it for the sweep
    order = ORDERS["EpochSchedCB"]

    def __init__(
        self, sched_factory: SchedFactory, monitor: str = "valid_loss"
    ) -> None:
        super().__init__(sched_factory)
        self.monitor = monitor

    def after_epoch(self, learn: Learner, *args: Any, **kwargs: Any) -> None:
        if not isinstance(self.sched, torch.optim.lr_scheduler.ReduceLROnPlateau):
            self._step()
            return
        value = self._monitored(learn, self.monitor, "EpochSchedCB")
        if value is not None:  # None: the epoch was cancelled before its value was made
            self._step(value)


def one_cycle(
    learn: Learner,
    n_epochs: int,
    lr_max: float | Sequence[float],
    pct_start: float,
    div: float,
    div_final: float,
    moms: tuple[float, float, float] | None,
) -> BatchSchedCB:
    """The BatchSchedCB of a one-cycle schedule over `n_epochs` (what `Learner.fit_one_cycle` attaches)."""
    if length(learn.dls.train) is None:
        raise TypeError(
            "fit_one_cycle needs the number of training batches, but dls.train has no len(): "
            "use a sized DataLoader, or BatchSchedCB(partial(OneCycle, total_steps=..., lr_max=...))."
        )

    def factory(opt: torch.optim.Optimizer) -> OneCycle:
        # Called at before_fit, so the length is that of the loader the fit reads (a shard under DDP).
        total = max(n_epochs * len(learn.dls.train), 1)
        return OneCycle(opt, total, lr_max, pct_start, div, div_final, moms)

    return BatchSchedCB(factory)
