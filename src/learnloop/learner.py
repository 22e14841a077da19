"""`Learner`: the training loop, its events, and the step pieces subclasses override.

The loop knows nothing of devices, metrics, progress bars or schedules: those are callbacks
that listen to the events in `learnloop.events`; `dispatch.CallbackHost` holds them and
fires the events.
"""

from __future__ import annotations

import functools
import inspect
import logging
import warnings
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .batches import Batches
from .callbacks.core import Callback, as_callbacks, check_callback
from .callbacks.device import DeviceCB
from .callbacks.distributed import DistributedCB
from .callbacks.gather import GatherPredsCB
from .callbacks.metrics import MetricsCB
from .callbacks.progress import ProgressCB
from .callbacks.recorder import Recorder
from .checkpoint import checkpoint_path, load_checkpoint, save_checkpoint
from .data.loaders import DataLoaders
from .dispatch import CallbackHost, displaced
from .dist import (
    barrier,
    world_size,
)
from .errors import (
    add_note,
    check_int,
    check_loss,
    check_lr,
    check_not_empty,
    describe,
    warn_empty_loader,
)
from .events import (
    EVENT_SCOPES,
    LEVELS,
    CancelBackwardException,
    CancelBatchException,
    CancelException,
    CancelFitException,
    CancelStepException,
)
from .inference import Inference
from .long_runs import LongRuns
from .midepoch import hand_over
from .preempt import (
    DEFAULT_SIGNALS,
    Preempted,
    catch_signals,
    release_workers,
    shield_workers,
)
from .rng import RngSnapshot, set_rng_state
from .types import PathLike, length

if TYPE_CHECKING:
    from .callbacks.lr_finder import LRFindResult
    from .callbacks.profile_report import ProfileReport

__all__ = ["Learner"]

log = logging.getLogger(__name__)

T = TypeVar("T")

#: The learning rate of `Learner(lr=None)`.
DEFAULT_LR = 1e-2
# `predict()` without an argument: the step piece the loop calls.
_STEP = object()
Callbacks = Callback | Sequence[Callback] | None


class Learner(LongRuns, Inference, Batches, CallbackHost):
    """Trains `model` on `dls` with `loss_func` and an optimizer made by `opt_func`.

    Device placement, metrics, the recorder and the progress bar are default callbacks
    (DeviceCB, MetricsCB, Recorder, ProgressCB); passing a callback of the same kind in
    `cbs` (a callback or a list) replaces the default, and `default_cbs=False` attaches none of
    them. The first `n_inp` items of each batch are the model's inputs (`learn.xb`, a tuple when
    `n_inp > 1`), the rest its targets (`learn.yb`; None when the batch has none). After a fit the
    model is left in eval mode, ready for inference (as fastai leaves it); `learn.predict(x)`
    runs it on one item or a small batch.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from torch.utils.data import DataLoader, TensorDataset
        >>> from learnloop import DataLoaders, Learner
        >>> ds = TensorDataset(torch.randn(64, 4), torch.randint(0, 2, (64,)))
        >>> dls = DataLoaders(DataLoader(ds, batch_size=16), DataLoader(ds, batch_size=32))
        >>> learn = Learner(nn.Linear(4, 2), dls, default_cbs=False)
        >>> learn.fit(1)
    """

    # Run state, documented so callbacks can rely on it.
    model: nn.Module
    dls: DataLoaders
    loss_func: Callable[..., Tensor]
    opt: torch.optim.Optimizer | None
    lr: float
    n_epochs: int
    epoch: int
    epochs_done: int
    iter: int
    n_iter: int | None
    training: bool
    dl: Iterable[Any] | None
    n_inp: int
    xb: Any
    yb: Any
    preds: Any
    loss: Tensor | None
    epoch_log: dict[str, Any]
    # The checkpoint file this fit resumed from (fit's `resume=`); None in a fresh fit.
    resumed_from: Path | None
    # 0, except in the epoch a fit resumed into from a mid-epoch checkpoint: the training batches
    # that checkpoint had done (the loop starts at that batch). Callbacks keep the epoch's state
    # (sums, rows) at before_epoch/before_train when it is > 0.
    start_iter: int
    #: Signals that stop a fit cleanly (save last.pt, run after_fit, raise `Preempted`); () turns it off.
    preempt_signals: tuple[int, ...] = DEFAULT_SIGNALS

    def __init__(
        self,
        model: nn.Module,
        dls: DataLoaders,
        loss_func: Callable[..., Tensor] = F.cross_entropy,
        lr: float | None = DEFAULT_LR,
        cbs: Callbacks = None,
        opt_func: Callable[..., torch.optim.Optimizer] = torch.optim.SGD,
        default_cbs: bool = True,
        n_inp: int = 1,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(
                f"model must be a torch.nn.Module, got {type(model).__name__}."
            )
        if not (hasattr(dls, "train") and hasattr(dls, "valid")):
            raise TypeError(
                f"dls must have .train and .valid loaders, got {type(dls).__name__}: "
                "wrap your loaders as DataLoaders(train_dl, valid_dl)."
            )
        if not callable(loss_func):
            raise TypeError(
                f"loss_func must be callable, got {type(loss_func).__name__}."
            )
        lr = DEFAULT_LR if lr is None else lr
        check_lr(lr, "Learner lr")
        check_int(n_inp, "Learner n_inp", minimum=1)
        check_not_empty(dls.train, "train")
        super().__init__()
        self.model, self.dls, self.loss_func = model, dls, loss_func
        self.lr, self.opt_func, self.n_inp = lr, opt_func, n_inp
        self.opt = None
        self.n_epochs = self.epoch = self.epochs_done = self.iter = 0
        self.n_iter = None
        self.training = False
        self.dl = self.batch = self.xb = self.yb = self.preds = self.loss = None
        self.epoch_log = {}
        self.resumed_from = None
        self.start_iter = 0
        # Where the fit stands inside the epoch: training batches done (None between epochs),
        # whether the training phase closed, the RNG states at the training loader's start and at
        # validation's, and the position a resumed fit continues from (see learnloop.midepoch).
        self._train_done: int | None = None
        self._train_closed = False
        self._epoch_start: dict[str, Any] | None = None
        self._valid_rng: RngSnapshot | dict[str, Any] | None = None
        self._resume_at: dict[str, Any] | None = None
        self._signals: Any = None  # the preempt_signals record of the running fit
        self._unshield: list[Callable[[], None]] = []  # undoes preempt.shield_workers
        self._check_loss = False  # set for each phase's first batch
        self._no_targets = 0  # evaluation batches without targets (no loss) in this run
        self._warned_empty: set[bool] = (
            set()
        )  # phases (training?) whose empty loader was reported
        user_cbs = as_callbacks(cbs)
        for cb in user_cbs:
            check_callback(cb)
        defaults = _default_callbacks() if default_cbs else []
        replaced = displaced(defaults, user_cbs)
        self.add_cbs(*[d for d in defaults if d not in replaced], *user_cbs)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        step = cls.__dict__.get("predict")
        if step is not None and not _takes_input(step):
            # The course's `def predict(self)` overrides the step piece; learn.predict(x) still
            # works on such a Learner, running that override on x.
            @functools.wraps(step)
            def predict(self: Learner, x: Any = _STEP) -> Any:
                if x is _STEP:
                    return step(self)
                return self._infer(x)

            cls.predict = predict  # type: ignore[method-assign]

    @property
    def recorder(self) -> Recorder:
        """The attached `Recorder` (per-batch learning rates and losses)."""
        return self._attached_cb(Recorder, "Recorder()")

    @property
    def metrics(self) -> MetricsCB:
        """The attached `MetricsCB` (miniai's `learn.metrics`): `.history`, `.metrics`."""
        return self._attached_cb(MetricsCB, "MetricsCB(...)")

    def _attached_cb(self, kind: type[T], example: str) -> T:
        """The attached callback of `kind`; an AttributeError saying how to attach one (`example`)."""
        for cb in self.cbs:
            if isinstance(cb, kind):
                return cb
        raise AttributeError(
            f"No {kind.__name__} is attached: pass cbs=[{example}] to the Learner."
        )

    def _where(self, event: str | None = None) -> str:
        """Where the loop is when `event` fires (None: inside a batch), for error notes."""
        phase = "training" if self.training else "validation"
        scope = "batch" if event is None else EVENT_SCOPES[event]
        if scope == "batch":
            return f"epoch {self.epoch}, {phase} batch {self.iter}"
        if scope == "phase":
            return f"epoch {self.epoch}, {phase}"
        if scope == "epoch":
            return f"epoch {self.epoch}"
        if event == "before_fit":
            return f"before epoch {self.epoch}, the first of this fit"
        return f"the fit's end, epochs_done={self.epochs_done}"

    # ---------------------------------------------------------------- step pieces
    def predict(self, x: Any = _STEP) -> Any:
        """The step piece: set `self.preds` from the model applied to `self.xb` (`*xb` if `n_inp > 1`).

        Called with `x` (one item, or a small batch), it is inference instead: the model's output
        for `x`, detached, on the CPU, with no autograd graph and the model's train/eval mode
        restored. One item (an input with the dimensions of the dataset's items, without the batch
        dimension) gets a batch dimension of 1 added and removed. `x` must be prepared as the
        model's inputs are (normalised, say): no transform of the loaders is applied. With
        `n_inp > 1`, `x` is a tuple of the inputs. A model sharded by FSDP runs on every
        process at once: call it on all of them.
        """
        if x is not _STEP:
            return self._infer(x)
        xb = self.xb
        self.preds = self.model(*xb) if self.n_inp > 1 else self.model(xb)

    def get_loss(self) -> None:
        """Set `self.loss` from `loss_func(preds, yb)` (several targets are passed as several arguments).

        A batch without targets has no loss: `self.loss` is None in evaluation (`get_preds`), and
        an error in training.
        """
        yb = self.yb
        if yb is None:
            if self.training:
                raise ValueError(
                    f"This training batch has no targets (n_inp={self.n_inp}, and the batch "
                    "holds only inputs): yield (inputs, targets) batches, or subclass Learner "
                    "and override get_loss for a loss computed without targets."
                )
            self.loss = None
        elif isinstance(yb, tuple):
            self.loss = self.loss_func(self.preds, *yb)
        else:
            self.loss = self.loss_func(self.preds, yb)

    def backward(self) -> None:
        """Backpropagate `self.loss`."""
        self.loss.backward()  # type: ignore[union-attr]

    def step(self) -> None:
        """Take an optimizer step."""
        self.opt.step()  # type: ignore[union-attr]

    def zero_grad(self) -> None:
        """Reset the gradients (to None, as torch does by default)."""
        self.opt.zero_grad()  # type: ignore[union-attr]

    # ---------------------------------------------------------------- fitting
    def fit(
        self,
        n_epochs: int = 1,
        train: bool = True,
        valid: bool = True,
        cbs: Callbacks = None,
        lr: float | None = None,
        resume: PathLike | None = None,
    ) -> None:
        """Train for `n_epochs`; `cbs` (a callback or a list) are attached for this fit only.

        `lr` replaces the learning rate (None keeps it).

        `resume` (a checkpoint file, or a CheckpointCB folder meaning its `last.pt`) restores the
        learner from it first and runs what remains up to `n_epochs` in all, from the next batch
        for a mid-epoch checkpoint; callbacks see the file as `learn.resumed_from`. With no epoch
        left it warns and runs nothing. `resume="auto"` resumes from the attached CheckpointCB's
        `last.pt` when there is one and starts fresh when there is none: the same command for a
        first start and a restart.

        A signal in `preempt_signals` (SIGTERM, SIGUSR1) stops the fit at the next batch boundary:
        the CheckpointCB writes `last.pt`, every `after_fit` runs, and `Preempted` is raised.
        """
        check_int(n_epochs, "fit n_epochs", minimum=0)
        if lr is not None:
            check_lr(lr, "fit lr")
        if train:
            check_not_empty(self.dls.train, "train")
        with self._attached(as_callbacks(cbs)):
            self._prepare_model()
            if isinstance(resume, str) and resume == "auto":
                resume = self._auto_resume()
            start = 0
            self.resumed_from, self._resume_at, self.start_iter = None, None, 0
            if resume is not None:
                barrier()  # under torchrun, rank 0 may still be writing the checkpoint
                self.load(resume)
                start = self.epochs_done
                if start >= n_epochs:
                    self._resume_at, self.start_iter = None, 0
                    warnings.warn(
                        f"Nothing to resume: {resume} already holds {start} epochs and fit asked "
                        f"for {n_epochs} in all, so no epoch ran. Ask for more, e.g. "
                        f"fit({start + n_epochs}, resume=...).",
                        stacklevel=2,
                    )
                    return
                self.resumed_from = checkpoint_path(resume)
            self._prepare_opt(lr)
            self.n_epochs = n_epochs
            try:
                with catch_signals(self.preempt_signals) as self._signals:
                    self._run_fit(
                        n_epochs, train, valid and self.dls.valid is not None, start
                    )
            finally:
                self._signals = None
            self._warn_no_targets("fit")

    def fit_one_cycle(
        self,
        n_epochs: int,
        lr_max: float | Sequence[float] | None = None,
        pct_start: float = 0.25,
        div: float = 25.0,
        div_final: float = 1e5,
        moms: tuple[float, float, float] | None = (0.95, 0.85, 0.95),
        cbs: Callbacks = None,
        resume: PathLike | None = None,
    ) -> None:
        """Fit with fastai's one-cycle policy peaking at `lr_max` (default `self.lr`); see `OneCycle`.

        The learning rate warms up from `lr_max/div` over the first `pct_start` of the batches,
        then anneals to `lr_max/div_final`; momentum (or Adam's beta1) moves through `moms`.
        `resume=folder` continues the schedule from a checkpoint.
        """
        from .callbacks.schedule import one_cycle

        lr_max = self.lr if lr_max is None else lr_max
        # Checked before the fit, not at its before_fit where the schedule is built.
        for value in [lr_max] if isinstance(lr_max, (int, float)) else lr_max:
            check_lr(value, "fit_one_cycle lr_max")
        sched = one_cycle(self, n_epochs, lr_max, pct_start, div, div_final, moms)
        self.fit(n_epochs, cbs=[sched, *as_callbacks(cbs)], resume=resume)

    def lr_find(
        self,
        start_lr: float = 1e-7,
        end_lr: float = 10.0,
        num_it: int = 100,
        stop_div: bool = True,
        suggest: str = "valley",
        cbs: Callbacks = None,
        show_plot: bool | None = None,
    ) -> LRFindResult:
        """Sweep the learning rate from `start_lr` to `end_lr` over `num_it` batches; return the suggestion.

        The learner is restored afterwards, bit for bit (see `learnloop.callbacks.lr_finder`).
        `suggest` is 'valley' (fastai's default), 'steep' (steepest fall of the loss) or
        'minimum' (a tenth of the lr at the lowest loss); `stop_div` stops when the loss diverges.
        The result is a float with the sweep attached: `.plot()` draws it. `show_plot` shows
        that plot, the suggestion marked, at the end of the notebook cell (so `lr = learn.lr_find()`
        shows it); None (the default) shows it in a notebook only, False never. Outside a
        notebook nothing is drawn: save it with `lr.plot().savefig("lr.png")`.
        """
        from .callbacks.lr_finder import SUGGESTERS, LRFinderCB, run_sweep

        if suggest not in SUGGESTERS:
            raise ValueError(
                f"suggest={suggest!r} is not a method; choose one of {sorted(SUGGESTERS)}."
            )
        finder = LRFinderCB(start_lr, end_lr, num_it, stop_div)
        self._prepare_model()  # the sweep's snapshot is of the model as fit will train it
        run_sweep(self, finder, as_callbacks(cbs))
        result = finder.result(suggest)
        _show_plot(result, show_plot, "lr_find", "lr.plot().savefig('lr.png')")
        return result

    def profile(
        self,
        n_batches: int = 50,
        warmup: int = 2,
        valid: bool = True,
        cbs: Callbacks = None,
        show_plot: bool | None = None,
    ) -> ProfileReport:
        """Time `n_batches` training and validation batches part by part; return the report.

        Runs one epoch of the fit you would run (your callbacks and the defaults, each hook timed)
        limited to `warmup + n_batches` batches a phase, the first `warmup` not counted, then restores
        the learner as `lr_find` does (see `learnloop.trial`). Callbacks that write files or stop
        fits (CheckpointCB, EarlyStoppingCB, the loggers: `run_in_profile = False`) are detached
        for it. The report prints as a table (µs per step and share for the loader wait, the
        host-to-device move, forward, loss, backward, optimizer step, zero_grad and each
        callback's hooks; samples/s) ending with the one line to act on; `.plot()` draws it as a
        stacked bar, which a notebook shows (`show_plot` as in `lr_find`). On CUDA each part
        waits for the device, in these batches only (see `learnloop.callbacks.profiler`).
        """
        from .callbacks.debug import LimitBatchesCB
        from .callbacks.profiler import ProfileCB, _EndBeforeEpochEnd
        from .trial import trial_fit

        check_int(n_batches, "profile n_batches", minimum=1, unit="batches")
        profiler = ProfileCB(warmup)
        limit = LimitBatchesCB(train=warmup + n_batches, valid=warmup + n_batches)
        end = _EndBeforeEpochEnd()  # no epoch row for a profile
        profiler.untimed = (limit, end)
        self._prepare_model()
        skipped = trial_fit(
            self,
            [profiler, limit, end, *as_callbacks(cbs)],
            skip=lambda cb: not getattr(cb, "run_in_profile", True),
            n_epochs=1,
            valid=valid,
        )
        profiler.skipped = [type(cb).__name__ for cb in skipped]
        report = profiler.report()
        _show_plot(
            report,
            show_plot,
            "profile",
            "learn.profile().plot().savefig('profile.png')",
        )
        return report

    def _prepare_model(self) -> None:
        """Let DistributedCB shard the model (strategy 'fsdp') before an optimizer or a load uses it."""
        for cb in self.cbs:
            if isinstance(cb, DistributedCB):
                cb.prepare(self)

    def _prepare_opt(self, lr: float | None) -> None:
        if lr is not None:
            self.lr = lr
        if self.opt is None:
            self.opt = self.opt_func(self.model.parameters(), lr=self.lr)
        elif lr is not None:
            for group in self.opt.param_groups:
                group["lr"] = lr
        # A fit interrupted between backward and zero_grad left gradients behind: don't add to
        # them. A mid-epoch resume keeps the ones its checkpoint accumulated (GradAccumCB).
        if self._resume_at is None:
            self.opt.zero_grad()

    # ---------------------------------------------------------------- the loop
    def _run_fit(self, n_epochs: int, train: bool, valid: bool, start: int = 0) -> None:
        # At before_fit, learn.epoch is the first epoch to run (learn.resumed_from says why).
        self.epoch = self.epochs_done = start
        self._warned_empty, self._no_targets = set(), 0
        failure: BaseException | None = None
        try:
            self._fire("before_fit", n_epochs=n_epochs)
            for epoch in range(start, n_epochs):
                self.epoch = epoch
                self._run_level(
                    "epoch", lambda: self._one_epoch(train, valid), epoch=epoch
                )
        except CancelFitException as e:
            self._fire("after_cancel_fit", exception=e)
        except CancelException as e:
            where = getattr(e, "_learnloop_raised_in", "the loop")
            raise RuntimeError(
                f"{type(e).__name__} was raised in {where}, outside the level it cancels "
                f"(epoch {self.epoch}); raise it from a hook of that level (see learnloop.events)."
            ) from e
        except BaseException as e:
            failure = e
            raise
        finally:
            self._fire_cleanup("after_fit", failure, n_epochs=n_epochs)
            # The re-raised error's traceback holds this frame: without this, frame and error
            # form a cycle that keeps the loader's worker processes alive until a garbage
            # collection, which then waits for them (about 5 s each with torch 2.x).
            failure = None
            # Drop the last batch, its graph and activations: nothing should outlive the fit.
            self.batch = self.xb = self.yb = self.preds = self.loss = None
            self._train_done, self._resume_at, self.start_iter = None, None, 0
            while self._unshield:  # the loaders' own worker_init_fn back
                self._unshield.pop()()
            self.model.eval()  # ready for inference, as fastai leaves it
        stop = self._signals
        if stop is not None and stop.handled:
            raise Preempted(stop.signum, stop.checkpoint, stop.where)

    def _run_level(self, level: str, body: Callable[[], None], **context: Any) -> None:
        """before_<level>, body, after_<level>; the level's Cancel exception skips to after_cancel_<level>."""
        before, after, after_cancel, cancel = _LEVEL_EVENTS[level]
        try:
            self._fire(before, **context)
            body()
        except cancel as e:
            self._fire(after_cancel, exception=e)
        if level == "epoch":
            # Counted before after_epoch fires (a cancelled epoch too), so that a checkpoint
            # written there resumes at the next epoch.
            self.epochs_done = self.epoch + 1
            self._train_done, self.start_iter = None, 0
        self._fire(after, **context)

    def _one_epoch(self, train: bool, valid: bool) -> None:
        self._train_done, self._train_closed = None, False
        at = self._resume_at
        if at is not None and at["phase"] == "valid":
            # Training was over when the checkpoint was written: validation runs again, from the
            # RNG state it started with.
            self._resume_at = None
            self._train_done, self._train_closed = at["batches"], True
            self._epoch_start = at
            set_rng_state(at["now_rng"], self.dls.train)
        elif train:
            self._one_phase(self.dls.train, training=True)
            self._train_closed = True
        if valid:
            # A checkpoint written in validation reruns it, from the RNG state it started with.
            # Only a CheckpointCB writes there (a preemption); without one, a learn.save of
            # yours there keeps the state of its moment, the same unless validation draws.
            self._valid_rng = None
            if self._train_done is not None and self._checkpointing():
                self._valid_rng = RngSnapshot(self.dls.train)
            self._one_phase(self.dls.valid, training=False)

    def _one_phase(self, dl: Iterable[Any], training: bool) -> None:
        self.training, self.dl = training, dl
        self.n_iter = length(dl)
        was_training = self.model.training
        self.model.train(training)
        try:
            with torch.set_grad_enabled(training):
                level = "train" if training else "validate"
                # self.dl, not dl: a before_train/before_validate hook may swap the loader (DistributedCB does).
                self._run_level(
                    level, lambda: self._all_batches(self.dl), epoch=self.epoch
                )
        finally:
            self.model.train(was_training)

    def _all_batches(self, dl: Iterable[Any]) -> None:
        self._check_loss = True  # the first batch's loss is checked
        start, loader = 0, dl
        if self._signals is not None:  # inside a fit
            undo = shield_workers(dl, self.preempt_signals)
            if undo is not None:
                self._unshield.append(undo)
            if self.training:
                dl, start = self._start_training(dl)
        i = start - 1
        stop = self._signals
        # Under torchrun the processes agree at each training batch (validation shards may
        # differ in length, so a signal there is acted on at the next training batch).
        agree = stop is not None and world_size() > 1
        if agree and not self.training:
            stop = None
        batches = None
        try:
            batches = iter(dl)
            # A resumed epoch's persistent workers serve the next epochs.
            hand_over(loader, dl)
            for i, batch in enumerate(batches, start):
                self._one_batch(i, batch)
                if stop is not None and (stop.signum is not None or agree):
                    try:
                        self._check_preempted(stop, agree)
                    except CancelException:
                        raise
                    except Exception as e:
                        # Not the loader's: the processes' agreement, or the checkpoint it writes.
                        add_note(
                            e,
                            f"learnloop: raised checking for a preemption signal after {self._where()}.",
                        )
                        raise
        except BaseException as e:
            # The phase ends here: its workers go now, not when a kept traceback lets go of them.
            release_workers(batches)
            if isinstance(e, Exception) and not isinstance(e, CancelException):
                # Errors of the batch itself are noted already; what is left came from the loader.
                phase = "training" if self.training else "validation"
                add_note(
                    e,
                    f"learnloop: raised by the {phase} loader fetching batch {i + 1} "
                    f"(epoch {self.epoch}).",
                )
            raise
        if i < 0 and start == 0:
            self._warn_empty()

    def _warn_empty(self) -> None:
        """Say once per fit that a phase's loader yielded no batch (its loss is then absent)."""
        if self.training not in self._warned_empty:
            self._warned_empty.add(self.training)
            warn_empty_loader(self.training, self.epoch)

    def _one_batch(self, i: int, batch: Any) -> None:
        # The batch level is written out, not run by _run_level: after_batch passes the loss,
        # which before_batch cannot. One try notes which step piece failed (`piece`), rather
        # than a guarding call around each piece: a call costs about as much as a hook. This runs
        # every batch, so an event is fired only if it is in the table (read live: a hook may
        # attach callbacks): the one dict lookup of an event nobody listens to, without a call.
        self.iter = i
        self.preds = self.loss = None  # a cancelled batch must not show the last one's
        fire, training = self._fire, self.training
        piece = "split"
        try:
            # Split before before_batch, so its hooks see this batch's xb/yb (and may replace
            # them, or the whole batch: fastai's idiom and miniai's both reach the model).
            self.batch = batch
            if "before_batch" in self._table:
                fire("before_batch", iter=i)
                self._resplit()  # a hook may have changed the batch in place
            if self._unsplit is not None and self.xb is None:
                raise TypeError(self._unsplit)
            piece = "predict"
            self.predict()
            if "after_pred" in self._table:
                fire("after_pred", preds=self.preds)
            piece = "get_loss"
            self.get_loss()
            loss = self.loss
            if loss is None and not training:
                # Predictions only (a batch without targets): no loss, so no after_loss.
                self._no_targets += 1
            else:
                if self._check_loss:  # each phase's first batch
                    self._check_loss = False
                    check_loss(loss, self.loss_func)
                if "after_loss" in self._table:
                    fire("after_loss", loss=loss)
            if training:
                # The backward and step levels, written out as _run_level runs them: they run
                # every training batch, and a call through _run_level costs a frame and a dict.
                piece = "backward"
                loss = self.loss
                try:
                    if "before_backward" in self._table:
                        fire("before_backward", loss=loss)
                    self.backward()
                except CancelBackwardException as e:
                    fire("after_cancel_backward", exception=e)
                if "after_backward" in self._table:
                    fire("after_backward", loss=loss)
                piece = "step"
                try:
                    if "before_step" in self._table:
                        fire("before_step")
                    self.step()
                except CancelStepException as e:
                    fire("after_cancel_step", exception=e)
                if "after_step" in self._table:
                    fire("after_step")
                piece = "zero_grad"
                self.zero_grad()
        except CancelBatchException as e:
            fire("after_cancel_batch", exception=e)
        except CancelException:  # an outer level's: not an error
            raise
        except Exception as e:
            # A hook's error already carries its own note, and the first note stays.
            self._note_piece(e, piece)
            raise
        if training and self._train_done is not None:
            # So a checkpoint written in after_batch resumes at i + 1.
            self._train_done = i + 1
        if "after_batch" in self._table:
            fire("after_batch", iter=i, loss=self.loss)

    def _note_piece(self, e: Exception, piece: str) -> None:
        """Note on `e` the step piece it came from, where the loop was, and the shapes involved."""
        if piece == "split":
            add_note(e, f"learnloop: raised in {_PIECES[piece]} ({self._where()}).")
            return
        note = f"learnloop: raised in {_PIECES[piece]} ({self._where()}); inputs {describe(self.xb)}"
        if piece != "predict":
            note += f", preds {describe(self.preds)}, targets {describe(self.yb)}"
        if piece not in ("predict", "get_loss"):
            note += f", loss {describe(self.loss)}"
        add_note(e, note + ".")

    # ---------------------------------------------------------------- checkpoints
    def save(self, path: PathLike) -> Learner:
        """Write a checkpoint (model, optimizer, callback states, counters, RNG states) atomically to `path`.

        Under torchrun rank 0 writes its own state, with no collective, so a call on rank 0 alone
        (`if is_main_process(): learn.save(path)`) is safe, inside an epoch too; CheckpointCB's
        files also hold every rank's RNG states and loss sums (see `checkpoint.save_checkpoint`).
        A model sharded with `DistributedCB(strategy="fsdp")` is saved as a sharded checkpoint
        folder at `path` instead, by every process: call it on all of them.
        """
        save_checkpoint(self, path)
        return self

    def load(self, path: PathLike) -> Learner:
        """Restore everything `save` wrote; a bad file raises ValueError and changes nothing.

        Under `DistributedCB(strategy="fsdp")` every process must call it: the model is sharded
        first, then a sharded folder or a plain file loads into the shards.
        """
        self._prepare_model()
        load_checkpoint(self, path)
        return self

    # ---------------------------------------------------------------- inference
    def validate(
        self, dl: Iterable[Any] | None = None, cbs: Callbacks = None
    ) -> dict[str, Any]:
        """Loss and metrics over `dl` (default `dls.valid`), without touching the weights.

        Only the validation events fire (before_validate ... after_validate); the result is
        what the metrics callback logged, e.g. `{'valid_loss': 0.31, 'accuracy': 0.9}`.
        The model's train/eval mode is left as it was found.
        """
        log = self._evaluate(dl, as_callbacks(cbs))
        self._warn_no_targets("validate")
        return log

    def get_preds(
        self, dl: Iterable[Any] | None = None, cbs: Callbacks = None
    ) -> tuple[Tensor, Any]:
        """Predictions and targets over `dl` (default `dls.valid`), on the CPU, with no autograd graph.

        Several targets per batch come back as a tuple of tensors; batches without targets
        (a `TensorDataset(x)`, an unlabelled test split) give `(preds, None)`. The model's mode
        is kept.
        """
        gather = GatherPredsCB()
        self._evaluate(dl, [gather, *as_callbacks(cbs)])
        return gather.result()

    def _warn_no_targets(self, what: str) -> None:
        """Say that evaluation batches had no targets, so their loss and metrics are absent."""
        if self._no_targets:
            warnings.warn(
                f"{what}: {self._no_targets} validation batches had no targets (n_inp="
                f"{self.n_inp}), so they have no loss and no metrics; use get_preds() for "
                "predictions, or yield (inputs, targets) batches.",
                stacklevel=3,
            )

    def _evaluate(
        self, dl: Iterable[Any] | None, extra: list[Callback]
    ) -> dict[str, Any]:
        """One validation phase over `dl`; returns its log and leaves `epoch_log` as it was."""
        dl = self.dls.valid if dl is None else dl
        if dl is None:
            raise ValueError("No data to evaluate: dls.valid is None; pass dl=... .")
        saved, self.epoch_log = self.epoch_log, {}
        self._warned_empty, self._no_targets = set(), 0
        try:
            with self._attached(extra):
                try:
                    self._one_phase(dl, training=False)
                except CancelException as e:  # any cancel ends an evaluation, cleanly
                    self._fire("after_cancel_validate", exception=e)
                    self._fire("after_validate", epoch=self.epoch)
                # Autocast contexts, bars: clean up, then raise.
                except BaseException as e:
                    self._fire_cleanup("after_validate", e, epoch=self.epoch)
                    raise
            return dict(self.epoch_log)
        finally:
            self.epoch_log = saved
            self.batch = self.xb = self.yb = self.preds = self.loss = None

    def __repr__(self) -> str:
        return f"Learner(model={type(self.model).__name__}, cbs={self.cbs})"


def _show_plot(result: Any, show_plot: bool | None, call: str, save: str) -> None:
    """Draw `result.plot()` for a notebook to show at the cell's end (`show_plot` None or True).

    Outside a notebook nothing is drawn; `show_plot=True` there warns how to save it instead.
    """
    from .notebook import in_notebook

    if show_plot is not False and in_notebook():
        result.plot()  # a notebook shows it when the cell ends (learnloop.figure)
    elif show_plot:
        warnings.warn(
            f"{call}(show_plot=True) shows its plot in a notebook only; in a script save "
            f"it: {save}.",
            stacklevel=3,
        )


def _takes_input(method: Callable[..., Any]) -> bool:
    """Whether `method(self, x)` can be called: a `predict` override with an input parameter."""
    try:
        inspect.signature(method).bind(object(), object())
    except TypeError:
        return False
    except ValueError:  # no signature to read: assume it does
        return True
    return True


_PIECES = {
    "split": "splitting the batch into inputs and targets",
    "predict": "the model's forward pass (predict)",
    "get_loss": "the loss (get_loss)",
    "backward": "the backward pass (backward)",
    "step": "the optimizer step (step)",
    "zero_grad": "zero_grad",
}


# For each level: its before, after and after_cancel events and the exception that cancels it.
_LEVEL_EVENTS = {
    level: (f"before_{level}", f"after_{level}", f"after_cancel_{level}", exc)
    for level, exc in LEVELS.items()
}


def _default_callbacks() -> list[Callback]:
    defaults: list[Callback] = [DeviceCB(), MetricsCB(), Recorder(), ProgressCB()]
    if world_size() > 1:  # launched by torchrun with several processes
        defaults.append(DistributedCB())
    return defaults
