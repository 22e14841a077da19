"""Checkpoints: everything a fit needs to continue exactly, written atomically and loaded safely.

A checkpoint is one `torch.save` file holding only tensors and plain Python values, so it loads
with `torch.load(weights_only=True)` and no pickled code ever runs. It holds the model and
optimizer states, the state of every attached callback that has `state_dict()` and
`load_state_dict(state)` (schedulers, grad scalers, early stopping, ...), the epoch counters and
the random number generators (python, numpy, torch, cuda, and the train loader's own
generators). The generators are what make a resumed fit reproduce the uninterrupted one bit for bit.

Writes go to a temporary file in the target's folder, which is flushed, fsynced and renamed over
the target, so a crash mid-write leaves the previous file intact. Loading checks the whole file
against the learner before it changes anything. Under torchrun every rank holds the same state,
so `save_checkpoint` writes on rank 0 only, and every rank loads.

The callback protocol: `state_dict()` returns tensors and plain values; `load_state_dict(state)` is
called by `load_checkpoint`, before `before_fit` of a resumed fit. A callback that builds its object
in `before_fit` (a scheduler, say) keeps the loaded state and applies it there; at `before_fit`,
`learn.epoch > 0` tells a resumed fit from a fresh one.
"""

from __future__ import annotations

import copy
import logging
import os
import random
import uuid
from pathlib import Path
from pickle import UnpicklingError
from typing import Any

import torch
from torch import nn

__all__ = [
    "atomic_save",
    "checkpoint_path",
    "checkpoint_state",
    "load_checkpoint",
    "loader_generators",
    "read_checkpoint",
    "save_checkpoint",
    "stateful_callbacks",
    "unwrap_model",
]

log = logging.getLogger(__name__)

FORMAT = "learnloop.checkpoint"
VERSION = 1
PathLike = str | os.PathLike[str]


def atomic_save(obj: Any, path: PathLike) -> Path:
    """`torch.save(obj)` to `path` so that a crash at any point leaves the old `path` untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "xb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)  # make the rename itself survive a power cut
    return path


def _fsync_dir(folder: Path) -> None:
    # Windows cannot open a folder; its rename is already durable enough.
    if os.name != "posix":
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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


# ---------------------------------------------------------------- what is saved
def unwrap_model(model: nn.Module) -> nn.Module:
    """The user's module inside DDP/DataParallel and torch.compile wrappers (their keys carry prefixes)."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model


def stateful_callbacks(cbs: list[Any]) -> dict[str, Any]:
    """Attached callbacks with `state_dict`/`load_state_dict`, keyed by class name (`Name_1` for a second one)."""
    out: dict[str, Any] = {}
    for cb in cbs:
        if callable(getattr(cb, "state_dict", None)) and callable(
            getattr(cb, "load_state_dict", None)
        ):
            name = key = type(cb).__name__
            i = 1
            while key in out:
                key, i = f"{name}_{i}", i + 1
            out[key] = cb
    return out


def loader_generators(dl: Any) -> list[torch.Generator]:
    """The torch Generators a loader draws from: its own, its sampler's, its batch sampler's (deduplicated)."""
    found: list[torch.Generator] = []

    def visit(obj: Any, depth: int) -> None:
        if obj is None or depth > 3:
            return
        if isinstance(obj, torch.Generator):
            if not any(obj is g for g in found):
                found.append(obj)
            return
        for attr in ("generator", "sampler", "batch_sampler"):
            visit(getattr(obj, attr, None), depth + 1)

    visit(dl, 0)
    return found


def _rng_state(learn: Any) -> dict[str, Any]:
    version, state, gauss = random.getstate()
    rng: dict[str, Any] = {
        "python": {
            "version": version,
            "state": torch.tensor(state, dtype=torch.int64),
            "gauss": gauss,
        },
        "torch": torch.get_rng_state(),
        "loaders": [g.get_state() for g in loader_generators(learn.dls.train)],
    }
    try:
        import numpy as np
    except ImportError:  # pragma: no cover - numpy comes with torch in practice
        np = None
    if np is not None:
        kind, keys, pos, has_gauss, cached = np.random.get_state()
        rng["numpy"] = {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached": float(cached),
        }
    # Untested here: no GPU in CI.
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    return rng


def _set_rng_state(learn: Any, rng: dict[str, Any]) -> None:
    py = rng["python"]
    random.setstate((py["version"], tuple(py["state"].tolist()), py["gauss"]))
    torch.set_rng_state(rng["torch"])
    if "numpy" in rng:
        import numpy as np

        n = rng["numpy"]
        np.random.set_state(
            (
                n["kind"],
                n["keys"].numpy().astype(np.uint32),
                n["pos"],
                n["has_gauss"],
                n["cached"],
            )
        )
    if "cuda" in rng and torch.cuda.is_available():  # untested here: no GPU in CI
        if len(rng["cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(rng["cuda"])
        else:
            log.warning(
                "Checkpoint has CUDA RNG states for %d devices, this machine has %d: not restored.",
                len(rng["cuda"]),
                torch.cuda.device_count(),
            )
    gens = loader_generators(learn.dls.train)
    if len(gens) != len(rng["loaders"]):
        log.warning(
            "The checkpoint saved %d train-loader generator(s), this train loader has %d: "
            "shuffling order not restored.",
            len(rng["loaders"]),
            len(gens),
        )
        return
    for g, state in zip(gens, rng["loaders"]):
        g.set_state(state)


def checkpoint_state(learn: Any, epochs_done: int | None = None) -> dict[str, Any]:
    """The checkpoint of `learn` as a dict; `epochs_done` defaults to `learn.epochs_done`."""
    return {
        "format": FORMAT,
        "version": VERSION,
        # TorchVersion is not a weights_only type.
        "torch_version": str(torch.__version__),
        "model": unwrap_model(learn.model).state_dict(),
        "optimizer": learn.opt.state_dict() if learn.opt is not None else None,
        "callbacks": {
            k: cb.state_dict() for k, cb in stateful_callbacks(learn.cbs).items()
        },
        "epochs_done": learn.epochs_done if epochs_done is None else epochs_done,
        "epoch": learn.epoch,
        "iter": learn.iter,
        "n_epochs": learn.n_epochs,
        "lr": learn.lr,
        "rng": _rng_state(learn),
    }


def save_checkpoint(learn: Any, path: PathLike, epochs_done: int | None = None) -> Path:
    """Write the checkpoint of `learn` to `path` atomically; returns the path.

    `epochs_done` is the epoch a resumed fit starts from; it defaults to `learn.epochs_done`, the
    epochs finished so far (an epoch counts once its phases ran, so from `after_epoch` too).
    """
    from .callbacks.distributed import is_main_process

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


def _trial_optimizer(
    learn: Any, path: Path, saved: dict[str, Any]
) -> torch.optim.Optimizer:
    """A new optimizer (`learn.opt_func`) with the saved state loaded, or a ValueError; `learn` unchanged."""
    trial = learn.opt_func(learn.model.parameters(), lr=learn.lr)
    _check_optimizer(path, learn.opt if learn.opt is not None else trial, saved)
    try:
        trial.load_state_dict(copy.deepcopy(saved))
    except Exception as e:
        raise ValueError(
            f"{path}'s optimizer state does not load into {type(trial).__name__} "
            f"({type(e).__name__}: {e}); use the same opt_func as the saved fit."
        ) from e
    return trial


def _load_callbacks(path: Path, cbs: dict[str, Any], saved: dict[str, Any]) -> None:
    """Load each callback's state; if one fails, give the ones already loaded their old state back, then raise."""
    for key in saved.keys() - cbs.keys():
        log.warning(
            "%s has state for callback %s, which is not attached: ignored.", path, key
        )
    for key in cbs.keys() - saved.keys():
        log.info(
            "%s has no state for callback %s: it keeps its current state.", path, key
        )
    done: list[tuple[Any, Any]] = []
    for key, cb in cbs.items():
        if key not in saved:
            continue
        before = copy.deepcopy(cb.state_dict())
        try:
            cb.load_state_dict(saved[key])
        except Exception as e:
            for other, state in reversed(done):
                other.load_state_dict(state)
            raise ValueError(
                f"{path}: {key}.load_state_dict failed ({type(e).__name__}: {e}); nothing was loaded."
            ) from e
        done.append((cb, before))


def load_checkpoint(learn: Any, path: PathLike) -> dict[str, Any]:
    """Restore `learn` from the checkpoint at `path` (file or CheckpointCB folder); returns the checkpoint.

    Everything is checked before anything changes: a corrupt, foreign or mismatched file raises
    ValueError and leaves `learn` as it was. Creates the optimizer if the learner has none yet.
    """
    file = checkpoint_path(path)
    ck = read_checkpoint(file)
    model = unwrap_model(learn.model)
    _check_model(file, model, ck["model"])
    trial = None
    if ck["optimizer"] is not None:
        trial = _trial_optimizer(learn, file, ck["optimizer"])
    _load_callbacks(file, stateful_callbacks(learn.cbs), ck["callbacks"])
    # Nothing below can fail on the file's content: every part was checked above.
    model.load_state_dict(ck["model"])
    if trial is not None:
        if learn.opt is None:
            learn.opt = trial
        else:
            learn.opt.load_state_dict(ck["optimizer"])
    learn.epochs_done = ck["epochs_done"]
    learn.epoch, learn.iter = ck.get("epoch", 0), ck.get("iter", 0)
    learn.lr = ck.get("lr", learn.lr)
    _set_rng_state(learn, ck["rng"])
    return ck
