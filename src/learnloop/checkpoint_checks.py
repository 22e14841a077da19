"""Checks of a checkpoint's model and optimizer sections against the learner, before loading.

`check_model` and `check_optimizer` compare those sections with the learner before anything
changes (the counters, RNG and callback sections: `state.check_state`).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from .learner import Learner

__all__ = ["check_model", "check_optimizer"]


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
    try:
        trial.load_state_dict(copy.deepcopy(saved))
    except Exception as e:
        raise ValueError(
            f"{path}'s optimizer state does not load into {type(trial).__name__} "
            f"({type(e).__name__}: {e}); use the same opt_func as the saved fit."
        ) from e


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
