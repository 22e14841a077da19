"""Checkpoints: everything a fit needs to continue exactly, written atomically and loaded safely.

A checkpoint is one `torch.save` file of `state.capture(learn)` plus a format tag: only tensors
and plain Python values, so it loads with `torch.load(weights_only=True)` and no pickled code ever
runs. It holds the model and optimizer states, the state of every attached callback that has
`state_dict()` and `load_state_dict(state)` (schedulers, grad scalers, early stopping, ...), the
epoch counters and the random number generators, which make a resumed fit reproduce the
uninterrupted one bit for bit (see `learnloop.state`).

Writes go through `atomic.atomic_save`: a temporary file in the target's folder, flushed, fsynced
and renamed over the target, so a crash, a full disk or a Ctrl-C mid-write leaves the previous
file intact. Loading checks the whole file
against the learner before it changes anything. Under torchrun every rank holds the same state,
so `save_checkpoint` writes on rank 0 only, and every rank loads.

The callback protocol: `state_dict()` returns tensors and plain values; `load_state_dict(state)` is
called by `load_checkpoint`, before `before_fit` of a resumed fit. A callback that builds its object
in `before_fit` (a scheduler, say) keeps the loaded state and applies it there; at `before_fit`,
`learn.epoch > 0` tells a resumed fit from a fresh one.
"""

from __future__ import annotations

import copy
from pathlib import Path
from pickle import UnpicklingError
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .atomic import atomic_save
from .dist import is_main_process
from .state import capture, restore, unwrap_model
from .types import PathLike

if TYPE_CHECKING:
    from .learner import Learner

__all__ = [
    "atomic_save",
    "checkpoint_path",
    "checkpoint_state",
    "load_checkpoint",
    "read_checkpoint",
    "save_checkpoint",
]

FORMAT = "learnloop.checkpoint"
VERSION = 1


def checkpoint_path(path: PathLike) -> Path:
    """`path` itself for a file, `path/last.pt` for a CheckpointCB folder."""
    path = Path(path)
    if path.is_dir():
        last = path / "last.pt"
        if not last.is_file():
            raise FileNotFoundError(
                f"{path} is a folder without last.pt: pass a checkpoint file or a CheckpointCB folder."
            )
        return last
    if not path.is_file():
        raise FileNotFoundError(
            f"No checkpoint at {path}: pass a file written by learn.save or a CheckpointCB folder."
        )
    return path


def checkpoint_state(learn: Learner, epochs_done: int | None = None) -> dict[str, Any]:
    """The checkpoint of `learn` as a dict; `epochs_done` defaults to `learn.epochs_done`."""
    state = capture(learn)
    if epochs_done is not None:
        state["epochs_done"] = epochs_done
    # TorchVersion is not a weights_only type.
    return {
        "format": FORMAT,
        "version": VERSION,
        "torch_version": str(torch.__version__),
        **state,
    }


def save_checkpoint(
    learn: Learner, path: PathLike, epochs_done: int | None = None
) -> Path:
    """Write the checkpoint of `learn` to `path` atomically; returns the path.

    `epochs_done` is the epoch a resumed fit starts from; it defaults to `learn.epochs_done`, the
    epochs finished so far (an epoch counts once its phases ran, so from `after_epoch` too).
    """
    # Under torchrun every rank holds the same state: rank 0 writes it.
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
        if "Unsupported global" in str(e) or "not an allowed global" in str(e):
            raise ValueError(
                f"{path} holds pickled Python objects that weights_only loading refuses to run "
                f"({_first_line(e)}). learnloop checkpoints hold only tensors and plain values; load "
                "this file with torch.load(weights_only=False) only if you trust where it came from."
            ) from e
        raise ValueError(
            f"{path} is corrupt or not a torch file ({_first_line(e)}); use an older checkpoint."
        ) from e
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


def _first_line(e: BaseException) -> str:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    telling = [line for line in lines if "Unsupported global" in line]
    return (telling or lines or [type(e).__name__])[0][:200]


def _check_model(path: Path, model: nn.Module, saved: dict[str, Any]) -> None:
    own = model.state_dict()
    missing = [k for k in own if k not in saved]
    extra = [k for k in saved if k not in own]
    shapes = [
        f"{k}: file {tuple(saved[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in saved and hasattr(saved[k], "shape") and saved[k].shape != own[k].shape
    ]
    if missing or extra or shapes:
        parts = [
            f"{name} {items[:5]}"
            for name, items in (
                ("missing from the file:", missing),
                ("unexpected in the file:", extra),
                ("shape mismatch:", shapes),
            )
            if items
        ]
        raise ValueError(
            f"{path} does not fit {type(model).__name__}: {'; '.join(parts)}. "
            "Build the same model as the one that was saved."
        )


def _check_optimizer(
    path: Path, opt: torch.optim.Optimizer, saved: dict[str, Any]
) -> None:
    own = [len(g["params"]) for g in opt.param_groups]
    theirs = [len(g["params"]) for g in saved.get("param_groups", [])]
    if own != theirs:
        raise ValueError(
            f"{path}'s optimizer has parameter groups of sizes {theirs}, this optimizer {own}: "
            "use the same opt_func and parameter groups as the saved fit."
        )
    # Settings this optimizer needs that the file's groups lack: saved by another optimizer.
    missing = set(opt.defaults) - set(saved["param_groups"][0]) if theirs else set()
    if missing:
        raise ValueError(
            f"{path} was saved by another kind of optimizer: its parameter groups lack "
            f"{sorted(missing)}, which {type(opt).__name__} needs. Use the same opt_func as "
            "the saved fit."
        )


def _trial_optimizer(learn: Learner, path: Path, saved: dict[str, Any]) -> None:
    """Load the saved state into a new optimizer (`learn.opt_func`): a ValueError if it does not fit."""
    trial = learn.opt_func(learn.model.parameters(), lr=learn.lr)
    _check_optimizer(path, learn.opt if learn.opt is not None else trial, saved)
    try:
        trial.load_state_dict(copy.deepcopy(saved))
    except Exception as e:
        raise ValueError(
            f"{path}'s optimizer state does not load into {type(trial).__name__} "
            f"({type(e).__name__}: {e}); use the same opt_func as the saved fit."
        ) from e


def load_checkpoint(learn: Learner, path: PathLike) -> dict[str, Any]:
    """Restore `learn` from the checkpoint at `path` (file or CheckpointCB folder); returns the checkpoint.

    Everything is checked before anything changes: a corrupt, foreign or mismatched file raises
    ValueError and leaves `learn` as it was. Creates the optimizer if the learner has none yet.
    """
    file = checkpoint_path(path)
    ck = read_checkpoint(file)
    _check_model(file, unwrap_model(learn.model), ck["model"])
    if ck["optimizer"] is not None:
        _trial_optimizer(learn, file, ck["optimizer"])
    try:
        restore(learn, ck)
    except ValueError as e:  # a callback refused its state: nothing was changed
        raise ValueError(f"{file}: {e}") from e.__cause__
    return ck
