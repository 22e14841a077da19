"""Checkpoints: everything a fit needs to continue exactly, written atomically and loaded safely.

A checkpoint is one `torch.save` file of `state.capture(learn)` plus a format tag: only tensors
and plain Python values, so it loads with `torch.load(weights_only=True)` and no pickled code ever
runs. It holds the model and optimizer states, the state of every attached callback that has
`state_dict()` and `load_state_dict(state)` (schedulers, grad scalers, early stopping, ...), the
epoch counters and the random number generators, which make a resumed fit reproduce the
uninterrupted one bit for bit (see `learnloop.state`). A checkpoint written inside an epoch (a
step checkpoint, a preemption) also holds the fit's `position` there and the gradients accumulated
so far; a resumed fit continues at the next batch (see `learnloop.midepoch`).

Under torchrun rank 0 writes and every rank loads. A CheckpointCB checkpoint (`save_checkpoint`
with `every_rank=True`) is captured by every rank at the same point: it holds the loss sums and
accumulated gradients of all processes, and each rank's random number generators as `rng_ranks`
(one entry per rank: its current states, its epoch's start and its validation's start), so a
script that seeds each rank its own way resumes exactly; on loading with the same number of
processes each rank gets its own entry back, with another number every rank gets rank 0's.
`learn.save` captures on rank 0 alone, with no collective (safe behind `is_main_process()`,
inside an epoch too): its file holds rank 0's own state and RNGs only, which every rank loads.

What is guaranteed:

- Every checkpoint written can be read back: before anything is written, numpy values in it
  become Python numbers and tensors, and anything else `weights_only` loading would refuse (a
  deque, a Path, an object) raises TypeError naming the callback, model entry or optimizer, the
  key and the type (`checkpoint_checks.weights_only_safe`).
- Writing is atomic (`atomic.atomic_save`): the file is the old one or the new one, whole, after
  a crash, an error, a full disk (an OSError that says so) or a Ctrl-C (a KeyboardInterrupt);
  temporary files of killed writers are cleaned up by the next write.
- Loading is all or nothing: every section is checked against the learner first (model keys and
  shapes, a trial load of the optimizer state, the counters, every RNG state applied to a fresh
  generator, the callbacks section), and a callback that refuses its state gets the others' old
  states back. Any failure is a ValueError naming the file and the section, and the learner is
  as it was. A file holding pickled objects is refused without running any of it.
- A mid-epoch checkpoint loads only into a learner whose training loader gives the same batch
  order (dataset length, batch size, drop_last, shuffling), else ValueError saying what differs;
  where the order cannot be continued exactly (another number of processes, a loader that cannot
  be entered at a batch), the fit resumes at the next epoch, with a warning.

The callback protocol: `state_dict()` returns tensors and plain values; `load_state_dict(state)` is
called by `load_checkpoint`, before `before_fit` of a resumed fit. A callback that builds its object
in `before_fit` (a scheduler, say) keeps the loaded state and applies it there; at `before_fit`,
`learn.resumed_from` (the checkpoint file, else None) tells a resumed fit from a fresh one.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path
from pickle import UnpicklingError
from typing import TYPE_CHECKING, Any

import torch

from .atomic import atomic_save
from .checkpoint_checks import check_model, check_optimizer, weights_only_safe
from .dist import every_rank as capture_on_every_rank
from .dist import is_distributed, is_main_process, rank, world_size
from .fsdp import is_sharded
from .midepoch import can_skip, loader_signature, signature_differences
from .state import capture, check_state, restore, unwrap_model, use_own_rng
from .types import PathLike

if TYPE_CHECKING:
    from .learner import Learner

__all__ = [
    "atomic_save",
    "checkpoint_path",
    "checkpoint_state",
    "fit_to_this_run",
    "latest_checkpoint",
    "load_checkpoint",
    "read_checked",
    "read_checkpoint",
    "save_checkpoint",
    "settle_position",
]

FORMAT = "learnloop.checkpoint"
# The newest format this learnloop reads. A checkpoint written inside an epoch is version 2 (it
# holds a position an older learnloop would ignore, resuming at the epoch's start with weights
# from its middle); one written between epochs stays version 1, readable by older releases.
VERSION = 2


def checkpoint_path(path: PathLike) -> Path:
    """`path` itself for a file or a sharded checkpoint folder; for a CheckpointCB folder its newest `last`.

    The newest `last` is `last.pt`, or the newest complete sharded `last-NNNNNN` folder (FSDP),
    whichever was written later.
    """
    path = Path(path)
    if path.is_dir():
        found = latest_checkpoint(path)
        if found is not None:
            return found
        from .sharded import is_sharded_checkpoint

        if is_sharded_checkpoint(path):
            return path
        raise FileNotFoundError(
            f"{path} is a folder without last.pt (or a sharded last-NNNNNN folder): pass a "
            "checkpoint file or a CheckpointCB folder."
        )
    if not path.is_file():
        raise FileNotFoundError(
            f"No checkpoint at {path}: pass a file written by learn.save or a CheckpointCB folder."
        )
    return path


def latest_checkpoint(folder: PathLike) -> Path | None:
    """The newest `last` checkpoint CheckpointCB wrote in `folder` (file or sharded folder), else None."""
    from .sharded import sharded_folders

    folder = Path(folder)
    found = [p for p in [folder / "last.pt"] if p.is_file()]
    found += sharded_folders(folder, "last")[-1:]
    if not found:
        return None
    return max(found, key=lambda p: p.stat().st_mtime_ns)


def checkpoint_state(
    learn: Learner, epochs_done: int | None = None, weights: bool = True
) -> dict[str, Any]:
    """The checkpoint of `learn` as a dict; `epochs_done` defaults to `learn.epochs_done`.

    `weights=False` leaves the model and optimizer out (None): a sharded checkpoint writes them
    with DCP beside this dict. They are left out of a sharded (FSDP2) model's always.

    Raises TypeError for a value that `torch.load(weights_only=True)` could not load back (numpy
    values are converted), ValueError for counters or RNG states that loading would refuse.
    """
    weights = weights and not is_sharded(unwrap_model(learn.model))
    state = capture(learn, weights=weights)
    if epochs_done is not None:
        state["epochs_done"] = epochs_done
    # TorchVersion is not a weights_only type.
    ck = weights_only_safe(
        {
            "format": FORMAT,
            "version": 2 if state.get("position") is not None else 1,
            "torch_version": str(torch.__version__),
            **state,
        }
    )
    try:
        check_state(ck, learn.dls.train)
    except ValueError as e:
        raise ValueError(f"Cannot save the checkpoint: {e}") from e
    return ck


def save_checkpoint(
    learn: Learner,
    path: PathLike,
    epochs_done: int | None = None,
    every_rank: bool = False,
) -> Path:
    """Write the checkpoint of `learn` to `path` atomically; returns the path.

    `epochs_done` is the epoch a resumed fit starts from; it defaults to `learn.epochs_done`, the
    epochs finished so far (an epoch counts once its phases ran, so from `after_epoch` too).

    Under torchrun rank 0 writes. With `every_rank=True` every process must call this at the
    same point (CheckpointCB does): each captures, the loss sums and accumulated gradients are
    combined over processes and each rank's RNG states go into the file. With False (as
    `learn.save`), rank 0 alone captures its own state, with no collective, so
    `if is_main_process(): learn.save(path)` is safe anywhere; other ranks do nothing.

    An FSDP2 model (see `DistributedCB(strategy="fsdp")`) is written as a sharded checkpoint
    folder at `path` instead, by every process, which must all call this at once
    (`learnloop.sharded.save_sharded`).
    """
    if is_sharded(unwrap_model(learn.model)):
        from .sharded import save_sharded

        return save_sharded(learn, path, None, epochs_done)
    if every_rank and is_distributed():
        with capture_on_every_rank():
            if not is_main_process():
                capture(learn)  # its part of the collectives; rank 0 writes
                return Path(path)
            return atomic_save(checkpoint_state(learn, epochs_done), path)
    if not is_main_process():
        return Path(path)
    return atomic_save(checkpoint_state(learn, epochs_done), path)


# ---------------------------------------------------------------- reading and checking
def read_checkpoint(path: PathLike) -> dict[str, Any]:
    """Load a learnloop checkpoint with `weights_only=True`; raise ValueError for corrupt or foreign files."""
    path = checkpoint_path(path)
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except UnpicklingError as e:
        # `from None`: torch's message advises weights_only=False, which would run the objects.
        what = _pickled_objects(str(e))
        if what is not None:
            raise ValueError(
                f"{path} holds pickled objects that could run code ({what}); learnloop will not "
                "load it. learnloop checkpoints hold only tensors, numbers, strings and lists, "
                "tuples and dicts of them: this file was not written by learn.save or "
                "CheckpointCB, or was changed since."
            ) from None
        raise ValueError(
            f"{path} is corrupt or not a torch file ({_first_line(e)}); use an older checkpoint."
        ) from None
    except Exception as e:
        raise ValueError(
            f"{path} is corrupt or truncated ({type(e).__name__}: {_first_line(e)}); use an older checkpoint."
        ) from e
    if not isinstance(ck, dict) or ck.get("format") != FORMAT:
        what = (
            f"a dict with keys {sorted(map(str, ck))[:8]}"
            if isinstance(ck, dict)
            else type(ck).__name__
        )
        raise ValueError(
            f"{path} is not a learnloop checkpoint (it holds {what}). For bare weights use "
            "model.load_state_dict(torch.load(path, weights_only=True)); checkpoints come from learn.save."
        )
    if not isinstance(ck.get("version"), int) or ck["version"] > VERSION:
        raise ValueError(
            f"{path} is checkpoint format version {ck.get('version')!r}; this learnloop reads "
            f"versions up to {VERSION}: upgrade learnloop."
        )
    missing = [
        k
        for k in ("model", "optimizer", "callbacks", "epochs_done", "rng")
        if k not in ck
    ]
    if missing:
        raise ValueError(
            f"{path} is an incomplete learnloop checkpoint: it lacks {missing}."
        )
    return ck


# What torch's weights_only unpickler says when a file holds objects other than plain values.
_OBJECT_REFUSALS = (
    r"GLOBAL (\S+) was not an allowed global",
    r"unsupported GLOBAL (\S+) whose module",
    r"Trying to call reduce for unrecognized function (.+?)(?: which belongs|$)",
    r"Can only (?:create new object|build) .* got (.+)$",
    r"(\S+) must be imported to load",
)


def _pickled_objects(message: str) -> str | None:
    """The object a weights_only refusal names (`functools.partial`, ...); None for other errors."""
    for pattern in _OBJECT_REFUSALS:
        found = re.search(pattern, message, re.MULTILINE)
        if found:
            return found[1].strip("<>")
    return None


def _first_line(e: BaseException) -> str:
    """The line of `e` that tells what is wrong, without torch's advice about weights_only."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    telling = [
        line
        for line in lines
        if "weights_only" not in line.lower() and "Weights only" not in line
    ]
    return (telling or [type(e).__name__])[0][:200]


def load_checkpoint(learn: Learner, path: PathLike) -> dict[str, Any]:
    """Restore `learn` from the checkpoint at `path` (file or CheckpointCB folder); returns the checkpoint.

    Everything is checked before anything changes: a corrupt, foreign or mismatched file raises
    ValueError and leaves `learn` as it was. Creates the optimizer if the learner has none yet.
    """
    file = checkpoint_path(path)
    if file.is_dir():
        from .sharded import load_sharded

        return load_sharded(learn, file)
    ck = read_checked(file, learn)
    check_model(file, unwrap_model(learn.model), ck["model"])
    fit_to_this_run(file, ck, learn)
    if ck["optimizer"] is not None:
        check_optimizer(learn, file, ck["optimizer"])
    try:
        restore(learn, ck)
    except ValueError as e:  # a callback refused its state: nothing was changed
        raise ValueError(f"{file}: {e}") from e.__cause__
    return ck


def read_checked(
    file: Path, learn: Learner, source: Path | None = None
) -> dict[str, Any]:
    """The checkpoint at `source` (default `file`), its counters, callbacks and RNG states checked
    against `learn`; ValueError naming `file` if they would not load."""
    ck = read_checkpoint(source or file)
    try:
        check_state(ck, learn.dls.train)
    except ValueError as e:
        raise ValueError(
            f"{file} is damaged, nothing was loaded: {e} Use an older checkpoint."
        ) from e.__cause__
    return ck


def fit_to_this_run(file: Path, ck: dict[str, Any], learn: Learner) -> None:
    """Settle a mid-epoch position for this run's loader and give this process its own RNG states."""
    if ck.get("position") is not None:
        settle_position(file, ck, learn.dls.train)
    use_own_rng(ck, rank(), world_size())


def settle_position(file: Path, ck: dict[str, Any], train_dl: Any) -> None:
    """Refuse a mid-epoch checkpoint from other data; make it resume at the next epoch where exactness is impossible."""
    position = ck["position"]
    epoch, done = position["epoch"], position["batches"]
    diffs, world_only = signature_differences(
        position["loader"], loader_signature(train_dl, world_size())
    )
    if diffs and not world_only:
        raise ValueError(
            f"{file} was written inside epoch {epoch} ({done} training batches done) with another "
            f"training loader: {'; '.join(diffs)}. It can continue only the same batch order: "
            "resume with the data, batch size and shuffling it was written with, or start a "
            "fresh fit. Nothing was loaded."
        )
    if world_only:
        why = f"the number of processes changed ({diffs[0]}), which changes every shard's batches"
    elif not can_skip(train_dl):
        why = (
            f"the training loader is a {type(train_dl).__name__} over "
            f"{type(getattr(train_dl, 'dataset', None)).__name__}, which cannot be continued "
            "at a batch without replaying the ones before (a DataLoader over a map-style "
            "dataset can)"
        )
    else:
        return
    warnings.warn(
        f"{file} was written inside epoch {epoch} ({done} training batches done), but {why}: "
        f"the fit resumes at the start of epoch {epoch + 1}, and the rest of epoch {epoch} is "
        "not trained.",
        stacklevel=5,  # the user's load or fit call
    )
    ck["epochs_done"] = ck["epoch"] = epoch + 1
    ck.pop("grads", None)
    ck["position"] = None
