"""Callbacks that change how a step is taken: mixed precision, gradient accumulation, clipping.

They compose by `order` (accumulate 25 < mixed precision 30 < clip 35):

- before_backward: GradAccumCB divides the loss, then MixedPrecisionCB runs the (scaled) backward.
- after_backward: on a batch that does not step, GradAccumCB raises CancelBatchException, which
  skips the rest of the batch (unscale, clip, step, zero_grad), so gradients accumulate; on a
  batch that steps, MixedPrecisionCB unscales the gradients, then GradClipCB clips the true ones.
- before_step: MixedPrecisionCB steps through the GradScaler and cancels the plain step.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from ..errors import check_int
from ..events import CancelBackwardException, CancelBatchException, CancelStepException
from ..fsdp import is_sharded
from ..tensors import ScalarLog, map_tensors
from .core import ORDERS, Callback

if TYPE_CHECKING:
    from ..learner import Learner

__all__ = ["GradAccumCB", "GradClipCB", "MixedPrecisionCB"]

log = logging.getLogger(__name__)

_DTYPES = {
    "float16": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


def _to_float(t: Tensor) -> Tensor:
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


class MixedPrecisionCB(Callback):
    """Runs forward and loss under `torch.autocast`; float16 adds a `torch.amp.GradScaler`.

    `dtype=None` picks float16 (with a GradScaler) on CUDA and bfloat16 elsewhere; pass
    `torch.bfloat16` for bf16 on CUDA. Predictions are cast back to float32. Steps that the
    scaler skips because of inf/nan gradients are counted in `.skipped_steps` (this fit) and
    `.skipped_per_epoch`, and logged each epoch.

    Example:
        >>> learn = Learner(model, dls, cbs=[MixedPrecisionCB()])  # doctest: +SKIP
    """

    order = ORDERS["MixedPrecisionCB"]

    def __init__(
        self, dtype: torch.dtype | str | None = None, init_scale: float = 2.0**16
    ) -> None:
        if isinstance(dtype, str):
            if dtype not in _DTYPES:
                raise ValueError(
                    f"MixedPrecisionCB(dtype={dtype!r}): choose one of {sorted(_DTYPES)} or a torch dtype."
                )
            dtype = _DTYPES[dtype]
        if dtype not in (None, torch.float16, torch.bfloat16):
            raise ValueError(
                f"MixedPrecisionCB(dtype={dtype}): use torch.float16, torch.bfloat16 or None (auto)."
            )
        self.dtype, self.init_scale = dtype, init_scale
        self.scaler: torch.amp.GradScaler | None = None
        self.skipped_steps = 0
        self.skipped_per_epoch: list[int] = []
        self._autocast: Any = None
        self._hook: Any = None
        self._device_type = "cpu"
        self._epoch_skipped = 0
        self._loaded: dict[str, Any] | None = None

    def _setup(self, learn: Learner) -> None:
        first = next(learn.model.parameters(), None)
        self._device_type = first.device.type if first is not None else "cpu"
        if self.dtype is None:
            self._dtype = (
                torch.float16 if self._device_type == "cuda" else torch.bfloat16
            )
        else:
            self._dtype = self.dtype
        if self._dtype == torch.float16 and self.scaler is None:
            self.scaler = torch.amp.GradScaler(
                self._device_type, init_scale=self.init_scale
            )
        # State from a checkpoint, loaded before the fit.
        if self.scaler is not None and self._loaded:
            self.scaler.load_state_dict(self._loaded)
        self._loaded = None

    def before_fit(self, learn: Learner, *args: Any, **kwargs: Any) -> None:
        self._setup(learn)
        self.skipped_steps, self.skipped_per_epoch = 0, []
        self._hook = (
            learn.opt.register_step_post_hook(self._mark_stepped)
            if self.scaler is not None
            else None
        )

    def before_validate(self, learn: Learner, *args: Any, **kwargs: Any) -> None:
        self._setup(learn)  # validate()/get_preds() fire no before_fit

    def before_epoch(self, learn: Learner, *args: Any, **kwargs: Any) -> None:
        self._epoch_skipped = 0

    def before_batch(self, learn: Learner, *args: Any, **kwargs: Any) -> None:
        self._exit_autocast()
        self._autocast = torch.autocast(self._device_type, dtype=self._dtype)
        self._autocast.__enter__()

    def after_pred(self, learn: Learner, *args: Any, **kwargs: Any) -> None:
        learn.preds = map_tensors(_to_float, learn.preds)

    def after_loss(self, learn: Learner, *args: Any, **kwargs: Any) -> None:
        self._exit_autocast()

    def before_backward(self, learn: Learner, *args: Any, **kwargs: Any) -> None:
        if self.scaler is not None:
            self.scaler.scale(learn.loss).backward()
            raise CancelBackwardException()

    def after_backward(self, learn: Learner, *args: Any, **kwargs: Any) -> None:
        if self.scaler is not None:
            # So that clipping (GradClipCB) sees the true gradients.
            self.scaler.unscale_(learn.opt)

    def _mark_stepped(self, *args: Any) -> None:
        self._stepped = True

    def before_step(self, learn: Learner, *args: Any, **kwargs: Any) -> None:
        if self.scaler is None:
            return
        self._stepped = False
        self.scaler.step(learn.opt)  # steps only if no gradient is inf/nan
        self.scaler.update()
        if not self._stepped:
            self.skipped_steps += 1
            self._epoch_skipped += 1
        raise CancelStepException()

    def after_batch(self, learn: Learner, *args: Any, **kwargs: Any) -> None:
        self._exit_autocast()  # the batch was cancelled before after_loss

    def after_epoch(self, learn: Learner, *args: Any, **kwargs: Any) -> None:
        if self.scaler is None:
            return
        self.skipped_per_epoch.append(self._epoch_skipped)
        if self._epoch_skipped:
            log.info(
                "MixedPrecisionCB: %d optimizer steps skipped in epoch %d (inf/nan gradients); "
                "loss scale now %g.",
                self._epoch_skipped,
                learn.epoch,
                self.scaler.get_scale(),
            )

    def after_fit(self, learn: Learner, *args: Any, **kwargs: Any) -> None:
        self._exit_autocast()
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    def after_validate(self, learn: Learner, *args: Any, **kwargs: Any) -> None:
        self._exit_autocast()

    def _exit_autocast(self) -> None:
        if self._autocast is not None:
            ctx, self._autocast = self._autocast, None
            ctx.__exit__(None, None, None)

    def state_dict(self) -> dict[str, Any]:
        """The GradScaler's state (empty without one, or the loaded state it will get)."""
        return (
            self.scaler.state_dict()
            if self.scaler is not None
            else dict(self._loaded or {})
        )

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the GradScaler's state (kept until the fit makes the scaler, if it has not yet).

        An empty state (saved before any scaler existed) drops the scaler: the next fit makes a fresh one.
        """
        if not state:
            self.scaler, self._loaded = None, None
        elif self.scaler is not None:
            self.scaler.load_state_dict(state)
        else:
            self._loaded = dict(state)

    def __repr__(self) -> str:
        return f"MixedPrecisionCB(dtype={self.dtype})"


class GradAccumCB(Callback):
    """Accumulates gradients over `n_acc` batches and steps once, as if on one batch `n_acc` times larger.

    Each loss is divided by the number of batches in its group, so with a mean loss and equal
    batches the step equals one big batch's. The last group of an epoch may be shorter (it is
    divided by its own size and stepped at the end of the epoch); with a loader of unknown
    length it is divided by `n_acc`, and gradients left over at the end of the epoch are dropped.

    Example:
        >>> learn = Learner(model, dls, cbs=[GradAccumCB(4)])  # doctest: +SKIP
    """

    order = ORDERS["GradAccumCB"]

    def __init__(self, n_acc: int) -> None:
        self.n_acc = check_int(n_acc, "GradAccumCB n_acc", unit="batches per step")
        self._loss: Any = None
        self._fsdp = False
        #: True between a batch that did not step and its group's end, when the gradients held
        #: so far are not in the parameters' `.grad` (FSDP2 keeps them unsharded, inside itself):
        #: checkpoints and preemption stops wait for the group's end then.
        self.holds_unsynced_grads = False

    def _group(self, learn: Learner) -> tuple[int, bool]:
        """The size of this batch's group and whether this batch ends it."""
        start = learn.iter - learn.iter % self.n_acc
        if learn.n_iter is None:
            return self.n_acc, learn.iter - start + 1 == self.n_acc
        size = min(self.n_acc, learn.n_iter - start)
        return size, learn.iter - start + 1 == size

    def before_fit(self, learn: Learner, *args: Any, **kwargs: Any) -> None:
        self._fsdp = is_sharded(learn.model)
        self.holds_unsynced_grads = False

    def before_batch(self, learn: Learner, *args: Any, **kwargs: Any) -> None:
        # Under DDP, a batch that does not step skips the gradient all-reduce, as `no_sync()`
        # does; DDP reads this flag in its forward, so it is set before the forward pass. Under
        # FSDP2 it skips the reduce-scatter (`set_requires_gradient_sync`).
        if not learn.training:
            return
        if hasattr(learn.model, "require_backward_grad_sync"):
            learn.model.require_backward_grad_sync = self._group(learn)[1]
        elif self._fsdp:
            learn.model.set_requires_gradient_sync(self._group(learn)[1])

    def after_batch(self, learn: Learner, *args: Any, **kwargs: Any) -> None:
        if hasattr(learn.model, "require_backward_grad_sync"):
            learn.model.require_backward_grad_sync = True
        elif self._fsdp:
            learn.model.set_requires_gradient_sync(True)

    def before_backward(self, learn: Learner, *args: Any, **kwargs: Any) -> None:
        self._loss = learn.loss
        learn.loss = learn.loss / self._group(learn)[0]

    def after_backward(self, learn: Learner, *args: Any, **kwargs: Any) -> None:
        if self._loss is not None:
            # after_batch shows the batch's own loss.
            learn.loss, self._loss = self._loss, None
        ends = self._group(learn)[1]
        self.holds_unsynced_grads = self._fsdp and not ends
        if not ends:
            raise CancelBatchException()  # keep the gradients: no unscale, clip, step or zero_grad

    def after_train(self, learn: Learner, *args: Any, **kwargs: Any) -> None:
        self.holds_unsynced_grads = False
        if learn.n_iter is None and learn.opt is not None:
            learn.zero_grad()

    def __repr__(self) -> str:
        return f"GradAccumCB(n_acc={self.n_acc})"


class GradClipCB(Callback):
    """Clips the gradient norm to `max_norm` before each step; `.norms` holds the norm before clipping.

    Norms are kept without a host sync per step, in 4 bytes each (a `ScalarLog`: float32 chunks
    on the device, moved to the host once per epoch), and become floats when `.norms` is read.

    Example:
        >>> learn = Learner(model, dls, cbs=[GradClipCB(1.0)])  # doctest: +SKIP
    """

    order = ORDERS["GradClipCB"]

    def __init__(self, max_norm: float, norm_type: float = 2.0) -> None:
        if max_norm <= 0:
            raise ValueError(
                f"GradClipCB(max_norm={max_norm}): max_norm must be positive."
            )
        self.max_norm, self.norm_type = max_norm, norm_type
        self._norms = ScalarLog()

    def before_fit(self, learn: Learner, *args: Any, **kwargs: Any) -> None:
        self._norms.clear()

    def after_backward(self, learn: Learner, *args: Any, **kwargs: Any) -> None:
        norm = torch.nn.utils.clip_grad_norm_(
            learn.model.parameters(), self.max_norm, self.norm_type
        )
        if hasattr(norm, "full_tensor"):  # FSDP2: a DTensor, the norm over every shard
            norm = norm.full_tensor()
        self._norms.append(norm.detach())

    def after_epoch(self, learn: Learner, *args: Any, **kwargs: Any) -> None:
        self._norms.to_host()  # one copy per epoch frees the device's chunks

    def after_fit(self, learn: Learner, *args: Any, **kwargs: Any) -> None:
        self._norms.to_host()

    @property
    def norms(self) -> list[float]:
        """Gradient norm before clipping, one per step taken (or skipped by the GradScaler)."""
        return self._norms.tolist()

    def __repr__(self) -> str:
        return f"GradClipCB(max_norm={self.max_norm})"
