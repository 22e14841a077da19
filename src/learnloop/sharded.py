"""Sharded checkpoints for an FSDP2 model: one folder per checkpoint, written by every process.

A sharded checkpoint is a folder written with `torch.distributed.checkpoint` (DCP): each process
writes its own shards of the model and optimizer states (`__<rank>_0.distcp`), rank 0 the DCP
index (`.metadata`) and `learner.pt`, an ordinary learnloop checkpoint without the weights
(callback states, counters, RNG states of every rank, the mid-epoch position), loaded with
`weights_only=True`. Nothing is gathered to one process, so saving costs each process its own
shards only.

Atomic as a whole: the folder is written under a hidden temporary name and renamed into place
once every process has finished (a directory rename is atomic), so a half-written folder is
never taken for a checkpoint. CheckpointCB names its folders `last-000012`, `best-000003` (a
number that grows with each write) and, once a new one is in place, removes the older ones of
its kind; `checkpoint.checkpoint_path` takes the newest complete one.

Loading (`load_sharded`) checks the file's keys and shapes against the model before anything
changes (another model is a ValueError naming the differences), reads into fresh tensors, and
only then sets the model and optimizer. DCP reshards on load, so the number of processes may
differ from the save's; without a process group (one process, an unsharded model) the folder
loads whole. `export_model` turns either kind of checkpoint into one plain `model.pt`.
"""

from __future__ import annotations

import os
import re
import shutil
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from .atomic import atomic_save
from .checkpoint import (
    checkpoint_state,
    fit_to_this_run,
    read_checked,
    read_checkpoint,
)
from .dist import (
    barrier,
    every_rank,
    has_process_group,
    is_main_process,
    world_size,
)
from .state import restore, unwrap_model
from .types import PathLike

if TYPE_CHECKING:
    from .learner import Learner

__all__ = [
    "LEARNER_FILE",
    "export_model",
    "is_sharded_checkpoint",
    "load_sharded",
    "save_sharded",
    "sharded_folders",
]

LEARNER_FILE = "learner.pt"
_NUMBERED = re.compile(r"^(?P<kind>[a-z]+)-(?P<n>\d+)$")


def is_sharded_checkpoint(path: PathLike) -> bool:
    """True when `path` is a complete sharded checkpoint folder (DCP index and learner.pt present)."""
    path = Path(path)
    return (path / LEARNER_FILE).is_file() and (path / ".metadata").is_file()


def sharded_folders(folder: PathLike, kind: str) -> list[Path]:
    """CheckpointCB's complete sharded checkpoints of `kind` ('last', 'best') in `folder`, oldest first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = []
    for p in folder.iterdir():
        m = _NUMBERED.match(p.name)
        if m and m["kind"] == kind and is_sharded_checkpoint(p):
            found.append((int(m["n"]), p))
    return [p for _, p in sorted(found)]


def _broadcast(value: Any) -> Any:
    box = [value]
    if has_process_group():
        dist.broadcast_object_list(box, src=0)
    return box[0]


def save_sharded(
    learn: Learner,
    path: PathLike,
    kind: str | None = None,
    epochs_done: int | None = None,
) -> Path:
    """Write a sharded checkpoint of `learn` (an FSDP2 model); every process must call it at once.

    With `kind` ('last', 'best'), `path` is CheckpointCB's folder and the checkpoint goes to the
    next numbered folder `path/<kind>-NNNNNN`, the older ones of that kind being removed once it
    is in place; without, to the folder `path` itself (replacing one there). Returns the folder.
    """
    path = Path(path)
    from torch.distributed.checkpoint import CheckpointException
    from torch.distributed.checkpoint import save as dcp_save
    from torch.distributed.checkpoint.state_dict import get_state_dict

    with every_rank():
        state = checkpoint_state(learn, epochs_done, weights=False)
    state["sharded"] = {"world_size": world_size()}
    model_sd, optim_sd = get_state_dict(unwrap_model(learn.model), learn.opt or [])
    final = None
    if is_main_process():
        final = path
        if kind is not None:
            olds = sharded_folders(path, kind)
            n = int(_NUMBERED.match(olds[-1].name)["n"]) + 1 if olds else 1  # type: ignore[index]
            final = path / f"{kind}-{n:06d}"
    final = Path(_broadcast(None if final is None else str(final)))
    tmp = final.parent / f".{final.name}.tmp"
    if is_main_process():
        shutil.rmtree(tmp, ignore_errors=True)  # a killed writer's
        tmp.mkdir(parents=True)
    barrier()
    tensors = {"model": model_sd}
    if learn.opt is not None:
        tensors["optimizer"] = optim_sd
    try:
        dcp_save(tensors, checkpoint_id=tmp)
    except CheckpointException as e:  # a BaseException: `except Exception` misses it
        failures = getattr(e, "failures", None) or {0: (e,)}
        first = next(iter(failures.values()))[0]
        error = OSError if isinstance(first, OSError) else RuntimeError
        raise error(
            f"Writing the sharded checkpoint {final} failed ({_failure(e)}); the checkpoints "
            "written before are intact."
        ) from e
    if is_main_process():
        atomic_save(state, tmp / LEARNER_FILE)
    barrier()  # every process's shards are on disk
    if is_main_process():
        _put_in_place(tmp, final)
        if kind is not None:
            for old in sharded_folders(path, kind)[:-1]:
                shutil.rmtree(old, ignore_errors=True)
    barrier()  # no process reads the folder before it is in place
    return final


def _put_in_place(tmp: Path, final: Path) -> None:
    """Rename the finished folder `tmp` to `final` (a folder already there is replaced)."""
    old = None
    if final.exists():
        old = final.parent / f".{final.name}.old"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    fd = os.open(final.parent, os.O_RDONLY)
    try:
        os.fsync(fd)  # the rename itself reaches the disk
    finally:
        os.close(fd)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# ---------------------------------------------------------------- loading
def _metadata(path: Path) -> dict[str, Any]:
    from torch.distributed.checkpoint import FileSystemReader

    try:
        return FileSystemReader(str(path)).read_metadata().state_dict_metadata
    except Exception as e:
        raise ValueError(
            f"{path} is a damaged sharded checkpoint: its index (.metadata) cannot be read "
            f"({type(e).__name__}: {e}). Use an older checkpoint."
        ) from e


def _check_model(path: Path, own: dict[str, Any], saved: dict[str, Any]) -> None:
    """ValueError unless the file's model tensors are the model's, key by key and shape by shape."""
    file_shapes = {
        k[len("model.") :]: tuple(getattr(v, "size", ()))
        for k, v in saved.items()
        if k.startswith("model.")
    }
    missing = [k for k in own if k not in file_shapes]
    extra = [k for k in file_shapes if k not in own]
    shapes = [
        f"{k}: file {file_shapes[k]} vs model {tuple(v.shape)}"
        for k, v in own.items()
        if k in file_shapes and file_shapes[k] != tuple(v.shape)
    ]
    if missing or extra or shapes:
        parts = []
        if missing:
            parts.append(f"missing from the file: {missing[:5]}")
        if extra:
            parts.append(f"not in the model: {extra[:5]}")
        if shapes:
            parts.append(f"shapes differ: {shapes[:5]}")
        raise ValueError(
            f"{path} was written for another model ({'; '.join(parts)}); nothing was loaded. "
            "Load it into the model it was trained with."
        )


def _fresh(tree: Any) -> Any:
    """`tree` with every tensor replaced by an empty one like it (DTensors stay DTensors)."""
    if isinstance(tree, torch.Tensor):
        return torch.empty_like(tree)
    if isinstance(tree, dict):
        return {k: _fresh(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_fresh(v) for v in tree]
    return tree


def load_sharded(learn: Learner, path: Path) -> dict[str, Any]:
    """Restore `learn` from the sharded checkpoint folder `path`; every process must call it.

    Everything is checked and read before anything of the learner changes: a damaged folder or
    one from another model raises ValueError and loads nothing. Returns the learner.pt section.
    """
    from torch.distributed.checkpoint import CheckpointException
    from torch.distributed.checkpoint import load as dcp_load
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    ck = read_checked(path, learn, path / LEARNER_FILE)
    saved = _metadata(path)
    model = unwrap_model(learn.model)
    own = get_model_state_dict(model)
    _check_model(path, own, saved)
    has_optimizer = any(k.startswith("optimizer.") for k in saved)
    fit_to_this_run(path, ck, learn)
    opt = learn.opt
    if has_optimizer and opt is None:
        opt = learn.opt_func(model.parameters(), lr=learn.lr)
    had_state = opt is not None and bool(opt.state)
    try:
        tensors: dict[str, Any] = {"model": _fresh(own)}
        if has_optimizer:
            tensors["optimizer"] = _fresh(get_optimizer_state_dict(model, opt))
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*single process.*")
            warnings.filterwarnings(
                "ignore", message=".*torch.distributed is disabled.*"
            )
            dcp_load(tensors, checkpoint_id=path)
        restore(learn, ck, weights=False)
    except ValueError as e:  # a callback refused its state: nothing was changed
        _undo_zero_state(opt, had_state)
        raise ValueError(f"{path}: {e}") from e.__cause__
    except (Exception, CheckpointException) as e:  # DCP's is a BaseException
        _undo_zero_state(opt, had_state)
        raise ValueError(
            f"{path} could not be read into this learner ({_failure(e)}); nothing was loaded. Was it written with "
            "another optimizer, or is a shard file damaged? Use the learner it was written "
            "with, or an older checkpoint."
        ) from e
    set_model_state_dict(model, tensors["model"])
    learn.opt = opt if has_optimizer else None
    if has_optimizer:
        set_optimizer_state_dict(model, opt, tensors["optimizer"])
    return ck


def _failure(e: BaseException) -> str:
    """'Type: first line' of the error behind a DCP CheckpointException (the first failing rank's)."""
    failures = getattr(e, "failures", None)
    cause = next(iter(failures.values()))[0] if failures else e
    lines = str(cause).splitlines()
    return (
        f"{type(cause).__name__}: {lines[0][:300]}" if lines else type(cause).__name__
    )


def _undo_zero_state(opt: torch.optim.Optimizer | None, had_state: bool) -> None:
    if opt is not None and not had_state:
        opt.state.clear()  # get_optimizer_state_dict made a zero state to read into


# ---------------------------------------------------------------- export
def export_model(checkpoint: PathLike, out: PathLike) -> Path:
    """Write the model weights of a checkpoint (sharded folder or file) as one plain `model.pt`.

    Runs in one process, with no process group: the shards are read whole. The result loads
    with `model.load_state_dict(torch.load(out, weights_only=True))` for inference on one device.
    """
    from .checkpoint import checkpoint_path

    source = checkpoint_path(checkpoint)
    if not source.is_dir():
        ck = read_checkpoint(source)
        return atomic_save(ck["model"], out)
    from torch.distributed.checkpoint import CheckpointException
    from torch.distributed.checkpoint import load as dcp_load

    saved = _metadata(source)
    weights = {}
    for key, meta in saved.items():
        if key.startswith("model.") and hasattr(meta, "size"):
            props = meta.properties
            weights[key[len("model.") :]] = torch.empty(
                tuple(meta.size), dtype=props.dtype
            )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*single process.*")
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
        try:
            dcp_load({"model": weights}, checkpoint_id=source, no_dist=True)
        except (Exception, CheckpointException) as e:  # DCP's is a BaseException
            raise ValueError(
                f"{source} could not be read ({_failure(e)}): a shard file is damaged or missing. "
                "Use an older checkpoint."
            ) from e
    return atomic_save(weights, out)
