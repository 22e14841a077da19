"""Capture and restore of a learner's state, shared by checkpoints and the lr finder.

`capture(learn)` returns everything a fit needs to continue exactly, as tensors and plain Python
values only (so a checkpoint of it loads with `torch.load(weights_only=True)`): the model and
optimizer states, the state of every attached callback that has `state_dict()` and
`load_state_dict(state)`, the counters, and the random number generators (python, numpy, torch,
cuda, and the train loader's own generators, which fix its shuffling order).
`restore(learn, state)` puts all of it back. Checking that a state fits the learner (a file from
another model, say) is the caller's job: `checkpoint.load_checkpoint` does it before restoring.
"""

from __future__ import annotations

import copy
import logging
import random
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

if TYPE_CHECKING:
    from .callbacks.core import Callback
    from .learner import Learner

__all__ = [
    "capture",
    "loader_generators",
    "restore",
    "rng_state",
    "set_rng_state",
    "stateful_callbacks",
    "unwrap_model",
]

log = logging.getLogger(__name__)

COUNTERS = ("epochs_done", "epoch", "iter", "n_epochs", "lr")


def unwrap_model(model: nn.Module) -> nn.Module:
    """The user's module inside DDP/DataParallel and torch.compile wrappers (their keys carry prefixes)."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model


def stateful_callbacks(cbs: list[Callback]) -> dict[str, Callback]:
    """Callbacks with `state_dict`/`load_state_dict`, keyed by class name (`Name_1` for a second one)."""
    out: dict[str, Callback] = {}
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


# ---------------------------------------------------------------- random number generators
def rng_state(train_dl: Any = None) -> dict[str, Any]:
    """Every RNG a fit draws from, as tensors and plain values: python, numpy, torch, cuda, `train_dl`'s."""
    version, state, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    rng: dict[str, Any] = {
        "python": {
            "version": version,
            "state": torch.tensor(state, dtype=torch.int64),
            "gauss": gauss,
        },
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached": float(cached),
        },
        "torch": torch.get_rng_state(),
        "loaders": [g.get_state() for g in loader_generators(train_dl)],
    }
    # Untested here: no GPU in CI.
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    return rng


def set_rng_state(rng: dict[str, Any], train_dl: Any = None) -> None:
    """Restore what `rng_state` captured; CUDA and loader states only where the devices and generators match."""
    py = rng["python"]
    random.setstate((py["version"], tuple(py["state"].tolist()), py["gauss"]))
    if "numpy" in rng:
        n = rng["numpy"]
        keys = n["keys"].numpy().astype(np.uint32)
        np.random.set_state((n["kind"], keys, n["pos"], n["has_gauss"], n["cached"]))
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():  # untested here: no GPU in CI
        if len(rng["cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(rng["cuda"])
        else:
            log.warning(
                "Saved CUDA RNG states for %d devices, this machine has %d: not restored.",
                len(rng["cuda"]),
                torch.cuda.device_count(),
            )
    gens = loader_generators(train_dl)
    if len(gens) != len(rng["loaders"]):
        log.warning(
            "Saved %d train-loader generator(s), this train loader has %d: "
            "shuffling order not restored.",
            len(rng["loaders"]),
            len(gens),
        )
        return
    for g, state in zip(gens, rng["loaders"]):
        g.set_state(state)


# ---------------------------------------------------------------- the whole learner
def capture(learn: Learner, clone: bool = False) -> dict[str, Any]:
    """The state of `learn`: model, optimizer, callbacks, counters (`COUNTERS`) and RNGs.

    The model and optimizer entries share storage with the live tensors unless `clone`, which
    deep-copies everything (for a snapshot the learner will go on changing, as lr_find's).
    """
    uninitialized = nn.parameter.UninitializedTensorMixin
    model = {
        k: v
        for k, v in unwrap_model(learn.model).state_dict().items()
        if not isinstance(v, uninitialized)  # a lazy module before its first forward
    }
    state: dict[str, Any] = {
        "model": model,
        "optimizer": learn.opt.state_dict() if learn.opt is not None else None,
        "callbacks": {
            k: cb.state_dict() for k, cb in stateful_callbacks(learn.cbs).items()
        },
        **{name: getattr(learn, name) for name in COUNTERS},
        "rng": rng_state(learn.dls.train),
    }
    return copy.deepcopy(state) if clone else state


def restore(learn: Learner, state: dict[str, Any]) -> None:
    """Put `learn` back into `state` (from `capture`, or a checked checkpoint); all or nothing.

    Callback states load first, the one step that can fail on content the caller could not
    check: if one raises, those already loaded get their old state back and a ValueError says
    which. Everything after it only copies values.
    """
    _load_callbacks(stateful_callbacks(learn.cbs), state["callbacks"])
    # Keys were checked by the caller or come from this very model; lazy parameters that were
    # still uninitialized at capture are absent and keep their values.
    unwrap_model(learn.model).load_state_dict(state["model"], strict=False)
    if state["optimizer"] is None:
        learn.opt = None
    else:
        if learn.opt is None:
            learn.opt = learn.opt_func(learn.model.parameters(), lr=learn.lr)
        learn.opt.load_state_dict(state["optimizer"])
    for name in COUNTERS:
        if name in state:
            setattr(learn, name, state[name])
    set_rng_state(state["rng"], learn.dls.train)


def _load_callbacks(cbs: dict[str, Callback], saved: dict[str, Any]) -> None:
    """Load each callback's saved state; if one fails, give the ones already loaded their old state back."""
    for key in saved.keys() - cbs.keys():
        log.warning("Saved state for callback %s, which is not attached: ignored.", key)
    for key in cbs.keys() - saved.keys():
        log.info("No saved state for callback %s: it keeps its current state.", key)
    done: list[tuple[Any, Any]] = []
    for key, cb in cbs.items():
        if key not in saved:
            continue
        before = copy.deepcopy(cb.state_dict())
        try:
            cb.load_state_dict(saved[key])
        except Exception as e:
            for other, old in reversed(done):
                other.load_state_dict(old)
            raise ValueError(
                f"{key}.load_state_dict failed ({type(e).__name__}: {e}); nothing was loaded."
            ) from e
        done.append((cb, before))
