"""Capture and restore of a learner's state, shared by checkpoints and the lr finder.

`capture(learn)` returns everything a fit needs to continue exactly, as tensors and plain Python
values only (so a checkpoint of it loads with `torch.load(weights_only=True)`): the model and
optimizer states, the state of every attached callback that has `state_dict()` and
`load_state_dict(state)`, the counters, and the random number generators (python, numpy, torch,
cuda, and the train loader's own generators, which fix its shuffling order). Inside an epoch it
adds the fit's `position` (see `learnloop.midepoch`) and the gradients accumulated so far. Under
torchrun a capture is local to its process unless made inside `dist.every_rank()` (every rank at
the same point): then the gradients are averaged over processes and every rank's RNG states are
gathered as `rng_ranks`, which `use_own_rng` hands back to each rank on loading.
`restore(learn, state)` puts all of it back, or changes nothing: it first checks the counters (ints
>= 0, a finite positive lr), the callbacks section (a dict keyed by str) and every RNG state (its
structure and sizes, by applying it to a fresh generator of the same kind, the global ones
untouched), with `check_state`; a callback that refuses its state gets the others' old states
back. Checking that the model and optimizer states fit the learner (a file from another model,
say) is the caller's job: `checkpoint.load_checkpoint` does it before restoring.
"""

from __future__ import annotations

import copy
import logging
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .dist import (
    capturing_on_every_rank,
    gather_objects,
    sum_across_processes,
    world_size,
)
from .errors import check_lr
from .fsdp import (
    holds_shards,
    is_sharded,
    like_param,
    load_whole_model,
    load_whole_optimizer,
)
from .midepoch import loader_signature
from .rng import check_rng_state, rng_state, set_rng_state

if TYPE_CHECKING:
    from .callbacks.core import Callback
    from .learner import Learner

__all__ = [
    "capture",
    "check_state",
    "restore",
    "stateful_callbacks",
    "unwrap_model",
    "use_own_rng",
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


# ---------------------------------------------------------------- the whole learner
def capture(
    learn: Learner, clone: bool = False, weights: bool = True
) -> dict[str, Any]:
    """The state of `learn`: model, optimizer, callbacks, counters (`COUNTERS`) and RNGs.

    The model and optimizer entries share storage with the live tensors unless `clone`, which
    deep-copies everything (for a snapshot the learner will go on changing, as lr_find's).
    `weights=False` leaves them (and accumulated gradients) out, as None: a sharded checkpoint
    writes those itself (see `learnloop.sharded`).
    """
    uninitialized = nn.parameter.UninitializedTensorMixin
    model = (
        {
            k: v
            for k, v in unwrap_model(learn.model).state_dict().items()
            if not isinstance(
                v, uninitialized
            )  # a lazy module before its first forward
        }
        if weights
        else None
    )
    state: dict[str, Any] = {
        "model": model,
        "optimizer": learn.opt.state_dict()
        if learn.opt is not None and weights
        else None,
        "callbacks": {
            k: cb.state_dict() for k, cb in stateful_callbacks(learn.cbs).items()
        },
        **{name: getattr(learn, name) for name in COUNTERS},
        "rng": rng_state(learn.dls.train),
    }
    position = learn._position() if hasattr(learn, "_position") else None
    rng_ranks = None
    if capturing_on_every_rank():
        # Each process draws from its own generators (a script may seed each rank its own way):
        # all of them go into the checkpoint, for every rank to get its own back.
        in_epoch = position is not None
        rng_ranks = gather_objects(
            {
                "rng": state["rng"],
                "epoch_rng": position["rng"] if in_epoch else None,
                "valid_rng": position["valid_rng"] if in_epoch else None,
            }
        )
    if position is not None:
        _add_position(learn, state, position, weights)
    if rng_ranks is not None:
        state["rng_ranks"] = rng_ranks
    return copy.deepcopy(state) if clone else state


def _add_position(
    learn: Learner, state: dict[str, Any], position: dict[str, Any], weights: bool
) -> None:
    """A mid-epoch state: the position, the loader's signature, gradients accumulated so far."""
    position = dict(position)
    valid_rng = position.pop("valid_rng")
    # Validation runs again on resume, from its starting RNG state (see Learner._one_epoch).
    if valid_rng is not None:
        state["rng"] = valid_rng
    position["loader"] = loader_signature(learn.dls.train, world_size())
    state["position"] = position
    if not weights:
        return
    # Gradients accumulated without a step yet (GradAccumCB mid-group); in a capture every rank
    # makes, averaged over processes, which the next step's all-reduce would have done; else this
    # process's own.
    params = unwrap_model(learn.model).named_parameters()
    grads = {n: p.grad.detach() for n, p in params if p.grad is not None}
    if capturing_on_every_rank():
        n = world_size()
        grads = {k: sum_across_processes(g).to(g.dtype) / n for k, g in grads.items()}
    if grads:
        state["grads"] = grads


def check_state(state: dict[str, Any], train_dl: Any = None) -> None:
    """ValueError unless `restore` can apply the counters, callbacks and RNG states of `state` whole.

    The message names the entry (`'epochs_done'`, `rng['python']`, ...) and what it should be.
    """
    for name in COUNTERS:
        if name not in state:
            continue
        value = state[name]
        if name == "lr":
            ok = _positive_number(value)
            expected = "a finite number > 0"
        else:
            ok = isinstance(value, int) and not isinstance(value, bool) and value >= 0
            expected = "an int >= 0"
        if not ok:
            raise ValueError(
                f"{name!r} is {value!r} ({type(value).__name__}), expected {expected}."
            )
    cbs = state.get("callbacks", {})
    keys = list(cbs) if isinstance(cbs, dict) else []
    if not isinstance(cbs, dict) or not all(isinstance(k, str) for k in keys):
        got = (
            f"a dict with keys {keys[:5]}"
            if isinstance(cbs, dict)
            else f"a {type(cbs).__name__}"
        )
        raise ValueError(
            f"'callbacks' is {got}, expected a dict of callback states keyed by class name."
        )
    check_rng_state(state.get("rng"), train_dl)
    if state.get("position") is not None:
        _check_position(state["position"], state.get("epochs_done"), train_dl)
    if "rng_ranks" in state:
        _check_rng_ranks(state["rng_ranks"], state.get("position"), train_dl)


def _check_position(position: Any, epochs_done: Any, train_dl: Any) -> None:
    """ValueError unless `position` is a mid-epoch position a resumed fit can start from."""
    problem = None
    if not isinstance(position, dict):
        problem = f"it is a {type(position).__name__}, expected a dict"
    elif position.get("phase") not in ("train", "valid"):
        problem = f"'phase' is {position.get('phase')!r}, expected 'train' or 'valid'"
    elif position.get("epoch") != epochs_done:
        problem = f"'epoch' is {position.get('epoch')!r}, but 'epochs_done' is {epochs_done!r}"
    elif not (type(position.get("batches")) is int and position["batches"] >= 0):
        problem = f"'batches' is {position.get('batches')!r}, expected an int >= 0"
    elif not isinstance(position.get("fresh"), bool) or not isinstance(
        position.get("loader"), dict
    ):
        problem = "'fresh' (a bool) or 'loader' (a dict) is missing"
    if problem is not None:
        raise ValueError(f"'position' does not apply: {problem}.")
    try:
        check_rng_state(position["rng"], train_dl)
    except ValueError as e:
        raise ValueError(f"'position': the epoch's {e}") from e


_RANK_KEYS = ("rng", "epoch_rng", "valid_rng")


def _check_rng_ranks(ranks: Any, position: Any, train_dl: Any) -> None:
    """ValueError unless `ranks` holds, for each process, the RNG states `use_own_rng` applies."""
    if not isinstance(ranks, list) or not ranks:
        got = (
            "an empty list" if isinstance(ranks, list) else f"a {type(ranks).__name__}"
        )
        raise ValueError(
            f"'rng_ranks' is {got}, expected a list with one dict of RNG states per process."
        )
    phase = position["phase"] if position is not None else None
    # Which states an entry holds: the epoch's start inside an epoch, validation's in validation.
    needed = {
        "rng": True,
        "epoch_rng": phase is not None,
        "valid_rng": phase == "valid",
    }
    where_in = {
        None: "between epochs",
        "train": "in training",
        "valid": "in validation",
    }[phase]
    for i, entry in enumerate(ranks):
        where = f"'rng_ranks'[{i}]"
        if not isinstance(entry, dict) or sorted(entry) != sorted(_RANK_KEYS):
            got = (
                f"a dict with keys {sorted(map(str, entry))[:5]}"
                if isinstance(entry, dict)
                else f"a {type(entry).__name__}"
            )
            raise ValueError(
                f"{where} is {got}, expected a dict with 'rng', 'epoch_rng' and 'valid_rng'."
            )
        for key in _RANK_KEYS:
            if (entry[key] is not None) != needed[key]:
                expected = "RNG states" if needed[key] else "None"
                raise ValueError(
                    f"{where}[{key!r}] is {'None' if entry[key] is None else 'RNG states'}, "
                    f"expected {expected} for a checkpoint written {where_in}."
                )
            if entry[key] is not None:
                try:
                    check_rng_state(entry[key], train_dl)
                except ValueError as e:
                    raise ValueError(f"{where}[{key!r}]: {e}") from e


def use_own_rng(state: dict[str, Any], rank: int, world: int) -> None:
    """Put process `rank`'s RNG states from `state['rng_ranks']` in place of rank 0's (`rng`, the position's).

    Only where the checkpoint was written by `world` processes; else (or in a checkpoint without
    `rng_ranks`) every process keeps rank 0's. `state` must have passed `check_state`; its
    `rng_ranks` is removed (so a position dropped since, see `checkpoint.load_checkpoint`, does
    not leave entries that no longer match it).
    """
    ranks = state.pop("rng_ranks", None)
    if ranks is None or len(ranks) != world:
        return
    own = ranks[rank]
    state["rng"] = own["valid_rng"] if own["valid_rng"] is not None else own["rng"]
    if state.get("position") is not None:
        state["position"] = {**state["position"], "rng": own["epoch_rng"]}


def _positive_number(x: Any) -> bool:
    if isinstance(x, torch.Tensor):
        if x.numel() != 1 or x.is_complex() or x.dtype == torch.bool:
            return False
        x = x.item()
    try:
        check_lr(x)
    except (TypeError, ValueError):
        return False
    return True


def restore(learn: Learner, state: dict[str, Any], weights: bool = True) -> None:
    """Put `learn` back into `state` (from `capture`, or a checked checkpoint); all or nothing.

    `state` is checked first (`check_state`). Callback states load next, the one step that can
    fail on content that cannot be checked beforehand: if one raises, those already loaded get
    their old state back and a ValueError says which. Everything after it only copies values.
    `weights=False` leaves the model, optimizer and gradients alone (a sharded checkpoint loads
    them itself). Whole tensors load into an FSDP2-sharded model too (each process keeps its
    shard).
    """
    check_state(state, learn.dls.train)
    _load_callbacks(stateful_callbacks(learn.cbs), state["callbacks"])
    position = state.get("position")
    learn._resume_at = (
        None if position is None else {**position, "now_rng": state["rng"]}
    )
    learn.start_iter = 0 if position is None else position["batches"]
    if weights:
        _restore_weights(learn, state, position is not None)
    for name in COUNTERS:
        if name in state:
            setattr(learn, name, state[name])
    set_rng_state(state["rng"], learn.dls.train)


def _restore_weights(learn: Learner, state: dict[str, Any], in_epoch: bool) -> None:
    model = unwrap_model(learn.model)
    sharded = is_sharded(model)
    # Keys were checked by the caller or come from this very model; lazy parameters that were
    # still uninitialized at capture are absent and keep their values.
    if sharded and not holds_shards(state["model"]):
        load_whole_model(model, state["model"])
    else:
        model.load_state_dict(state["model"], strict=False)
    if state["optimizer"] is None:
        learn.opt = None
    else:
        if learn.opt is None:
            learn.opt = learn.opt_func(learn.model.parameters(), lr=learn.lr)
        if sharded and not holds_shards(state["optimizer"]):
            load_whole_optimizer(model, learn.opt, state["optimizer"])
        else:
            learn.opt.load_state_dict(state["optimizer"])
    if in_epoch:  # the gradients accumulated so far, or none
        grads = state.get("grads") or {}
        for name, p in model.named_parameters():
            g = grads.get(name)
            p.grad = None if g is None else like_param(g, p)


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
