"""What a checkpoint may hold, checked both ways: on save, that it will load back; on load, that it fits.

Saving: `torch.load(weights_only=True)` rebuilds only tensors (and Parameters), None, bool, int,
float, complex, str, bytes, bytearray, torch.Size, dtype, device, layout and qscheme, and dict,
OrderedDict, Counter, list, tuple and set of those (exact types: no subclasses; see torch's
`_weights_only_unpickler.py`). `weights_only_safe` walks a checkpoint before it is written:
numpy scalars become Python numbers and numpy arrays tensors; anything else raises TypeError
naming its owner (a callback, a model entry, the optimizer), the key path and the type. It copies
only the containers on the way to a converted value, never a tensor, so saving a big model costs
one type check per entry.

Loading: `check_model` and `check_optimizer` compare those sections with the learner before
anything changes (the counters, RNG and callback sections: `state.check_state`).
"""

from __future__ import annotations

import copy
import enum
from collections import Counter, OrderedDict, deque
from pathlib import Path, PurePath
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

if TYPE_CHECKING:
    from .learner import Learner

__all__ = ["check_model", "check_optimizer", "weights_only_safe"]

_PLAIN = frozenset(
    {type(None), bool, int, float, complex, str, bytes, bytearray, torch.Size}
    | {torch.dtype, torch.device, torch.layout, torch.qscheme}
)
_TENSORS = frozenset({torch.Tensor, nn.Parameter})
_MAPPINGS = frozenset({dict, OrderedDict, Counter})
_COLLECTIONS = frozenset({list, tuple, set})
_EXTRA_STATE = "_extra_state"  # torch's suffix for get_extra_state() entries


class _Refused(Exception):
    def __init__(self, path: tuple[Any, ...], value: Any) -> None:
        self.path, self.value = path, value


# A step of a path: a key (`['a']`, `[0]`), the key itself, or a tensor's/dict's attributes.
_KEY, _AS_KEY, _ATTRS = "key", "as key", "attrs"


def _format(path: tuple[tuple[str, Any], ...]) -> str:
    texts = {_KEY: "[{!r}]", _AS_KEY: " (the key {!r} itself)", _ATTRS: ".__dict__"}
    return "".join(texts[step].format(k) for step, k in path)


# ---------------------------------------------------------------- saving
def weights_only_safe(ck: dict[str, Any]) -> dict[str, Any]:
    """`ck` with numpy values converted; TypeError for a value `torch.load(weights_only=True)` refuses."""
    out = dict(ck)
    for section, value in ck.items():
        if section == "callbacks" and type(value) is dict:
            out[section] = {
                name: _checked(state, f"callback {name}'s state_dict()", "state_dict()")
                for name, state in value.items()
            }
        elif section == "model":
            out[section] = _checked(
                value, "the model's state_dict()", "state_dict()", True
            )
        elif section == "optimizer":
            out[section] = _checked(
                value, "the optimizer's state_dict()", "the optimizer's state"
            )
        else:
            out[section] = _checked(
                value, f"the checkpoint's {section!r}", "the learner"
            )
    return out


def _checked(value: Any, owner: str, source: str, model: bool = False) -> Any:
    """`_plain(value)`, or a TypeError naming `owner` (for the `model`, the entry) and the key path."""
    try:
        return _plain(value, (), True, set())
    except _Refused as refused:
        path, bad = refused.path, refused.value
        if model and path and path[0][0] == _KEY:
            entry = path[0][1]
            owner = f"the model's state_dict() entry {entry!r}"
            if str(entry).endswith(_EXTRA_STATE):
                owner += " (what a module's get_extra_state() returned)"
                source = "get_extra_state()"
            path = path[1:]
        kind = type(bad).__qualname__
        if type(bad).__module__ != "builtins":
            kind = f"{type(bad).__module__}.{kind}"
        where = f"holds a {kind} at {_format(path)}" if path else f"is a {kind}"
        raise TypeError(
            f"Cannot save the checkpoint: {owner} {where}, which torch.load(weights_only=True) "
            f"cannot load back. {_hint(bad)}Return tensors, numbers, strings, None, and "
            f"lists, tuples and dicts of them from {source}."
        ) from None


def _plain(x: Any, path: tuple[Any, ...], convert: bool, busy: set[int]) -> Any:
    """`x` itself if weights_only loads it, a converted copy if `convert` can make it so, else _Refused."""
    kind = type(x)
    if kind in _PLAIN:
        return x
    if kind in _TENSORS:
        if x.__dict__:  # attributes set on a tensor are pickled with it
            _plain(x.__dict__, (*path, (_ATTRS, None)), False, busy)
        return x
    if convert and isinstance(x, (np.generic, np.ndarray)):
        converted = _from_numpy(x)
        if converted is not None:
            return converted
    if kind not in _MAPPINGS and kind not in _COLLECTIONS:
        raise _Refused(path, x)
    if id(x) in busy:  # a container that holds itself: already being checked
        return x
    busy.add(id(x))
    try:
        if kind in _COLLECTIONS:
            items = [
                _plain(v, (*path, (_KEY, i)), convert, busy) for i, v in enumerate(x)
            ]
            if all(a is b for a, b in zip(items, x)):
                return x
            return kind(items)
        pairs = [
            (
                _plain(k, (*path, (_AS_KEY, k)), convert, busy),
                _plain(v, (*path, (_KEY, k)), convert, busy),
            )
            for k, v in x.items()
        ]
        attrs = getattr(x, "__dict__", None)  # a state_dict's _metadata, say
        new_attrs = (
            _plain(attrs, (*path, (_ATTRS, None)), convert, busy) if attrs else attrs
        )
        if new_attrs is attrs and all(
            a is k and b is v for (a, b), (k, v) in zip(pairs, x.items())
        ):
            return x
        out = kind()
        for k, v in pairs:
            out[k] = v  # (Counter(pairs) would count the pairs)
        if new_attrs:
            out.__dict__.update(new_attrs)
        return out
    finally:
        busy.discard(id(x))


def _from_numpy(x: np.generic | np.ndarray) -> Any:
    """A numpy scalar as a Python number, an array as a tensor; None where there is no such thing."""
    if isinstance(x, np.ndarray):
        try:
            return torch.tensor(x)  # a copy: the array may be changed after the save
        except (TypeError, RuntimeError, ValueError):
            return None
    value = x.item()
    return value if type(value) in _PLAIN else None


def _hint(x: Any) -> str:
    fixes = [
        (deque, "convert it with list(...)"),
        (PurePath, "convert it with str(...)"),
        (enum.Enum, "store its .value"),
        (frozenset, "convert it with set(...)"),
        (np.ndarray, "convert it to numbers, or to a tensor of a torch dtype"),
        (torch.Tensor, "convert it with .as_subclass(torch.Tensor)"),
        (dict, "convert it with dict(...)"),
        (tuple, "convert it with tuple(...) or ._asdict()"),
        (list, "convert it with list(...)"),
    ]
    for cls, fix in fixes:
        if isinstance(x, cls):
            return f"Here: {fix}. "
    return ""


# ---------------------------------------------------------------- loading
def check_model(path: Path, model: nn.Module, saved: Any) -> None:
    """ValueError unless `saved` (a checkpoint's model section) loads into `model`."""
    if not isinstance(saved, dict) or not all(isinstance(k, str) for k in saved):
        raise ValueError(
            f"{path}'s 'model' section is not a state dict (a dict keyed by parameter names; it "
            f"holds a {type(saved).__name__}): the file is damaged. Use an older checkpoint."
        )
    own = model.state_dict()
    missing = [k for k in own if k not in saved]
    extra = [k for k in saved if k not in own]
    shapes = [
        f"{k}: file {tuple(saved[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in saved and hasattr(saved[k], "shape") and saved[k].shape != own[k].shape
    ]
    kinds = [
        f"{k}: file {type(saved[k]).__name__}"
        for k in own
        if k in saved
        and isinstance(own[k], torch.Tensor)
        and not isinstance(saved[k], torch.Tensor)
    ]
    if missing or extra or shapes or kinds:
        parts = [
            f"{name} {items[:5]}"
            for name, items in (
                ("missing from the file:", missing),
                ("unexpected in the file:", extra),
                ("shape mismatch:", shapes),
                ("not a tensor:", kinds),
            )
            if items
        ]
        raise ValueError(
            f"{path} does not fit {type(model).__name__}: {'; '.join(parts)}. "
            "Build the same model as the one that was saved."
        )


def check_optimizer(learn: Learner, path: Path, saved: Any) -> None:
    """Load `saved` into a new optimizer (`learn.opt_func`): a ValueError if it does not fit."""
    groups = saved.get("param_groups") if isinstance(saved, dict) else None
    if (
        not isinstance(groups, list)
        or not all(
            isinstance(g, dict) and isinstance(g.get("params"), list) for g in groups
        )
        or not isinstance(saved.get("state"), dict)
    ):
        raise ValueError(
            f"{path}'s 'optimizer' section is not an optimizer state_dict (a dict with 'state' "
            "and 'param_groups', each group with its 'params'): the file is damaged. Use an "
            "older checkpoint."
        )
    trial = learn.opt_func(learn.model.parameters(), lr=learn.lr)
    _check_groups(path, learn.opt if learn.opt is not None else trial, groups)
    # The containers are copied (load_state_dict may change them), the tensors shared: torch
    # never changes them in place, and a copy would double the memory of Adam's moments (0.4 s
    # and 800 MB for 100M parameters).
    tensors = {id(t): t for t in _tensors(saved["state"])}
    try:
        trial.load_state_dict(copy.deepcopy(saved, tensors))
    except Exception as e:
        raise ValueError(
            f"{path}'s optimizer state does not load into {type(trial).__name__} "
            f"({type(e).__name__}: {e}); use the same opt_func as the saved fit."
        ) from e


def _tensors(value: Any) -> list[torch.Tensor]:
    """The tensors in nested dicts, lists and tuples."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors(v)]
    return []


def _check_groups(path: Path, opt: torch.optim.Optimizer, groups: list[dict]) -> None:
    own = [len(g["params"]) for g in opt.param_groups]
    theirs = [len(g["params"]) for g in groups]
    if own != theirs:
        raise ValueError(
            f"{path}'s optimizer has parameter groups of sizes {theirs}, this optimizer {own}: "
            "use the same opt_func and parameter groups as the saved fit."
        )
    # Settings this optimizer needs that the file's groups lack: saved by another optimizer.
    missing = set(opt.defaults) - set(groups[0]) if groups else set()
    if missing:
        raise ValueError(
            f"{path} was saved by another kind of optimizer: its parameter groups lack "
            f"{sorted(missing)}, which {type(opt).__name__} needs. Use the same opt_func as "
            "the saved fit."
        )
