"""FSDP2 glue: which modules to shard, sharding a model, and whole state dicts in and out of it.

Nothing home-made: the sharding is torch's `fully_shard` (parameters become DTensors, each
process holding 1/N of every tensor), mixed precision is its `MixedPrecisionPolicy`, and state
dicts go through `torch.distributed.checkpoint.state_dict` (`get_state_dict`/`set_state_dict`).
This module adds what a training loop needs around them: resolving `shard=` (a module class, a
predicate, or a list of them) to the blocks it names, with an error listing the model's module
classes when it names none; moving an optimizer's state across the sharding; a sharded model's
whole state gathered on rank 0, and whole (plain) states loaded into the shards. torch.distributed
.fsdp is imported on first use, so `import learnloop` does not pay for it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

__all__ = [
    "ShardSpec",
    "check_shard",
    "full_model_state",
    "holds_shards",
    "is_sharded",
    "like_param",
    "load_whole_model",
    "load_whole_optimizer",
    "matching_modules",
    "optimizer_to_fqn",
    "shard_model",
]

# What `DistributedCB(shard=...)` takes: a module class, a predicate on modules, or a list of them.
ShardSpec = type | Callable[[nn.Module], bool] | Sequence[Any]


def is_sharded(model: nn.Module) -> bool:
    """True when `model` was sharded by `fully_shard` (it is an FSDPModule)."""
    cls = type(model)
    if "torch.distributed.fsdp" not in cls.__module__ and not any(
        "torch.distributed.fsdp" in c.__module__ for c in cls.__mro__
    ):
        return False
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def _predicates(shard: ShardSpec) -> list[Callable[[nn.Module], bool]]:
    items = list(shard) if isinstance(shard, (list, tuple)) else [shard]
    out: list[Callable[[nn.Module], bool]] = []
    for item in items:
        if isinstance(item, type) and issubclass(item, nn.Module):
            out.append(lambda m, cls=item: isinstance(m, cls))
        elif callable(item) and not isinstance(item, type):
            out.append(item)
        else:
            raise TypeError(
                f"shard= takes module classes or predicates (module -> bool), or a list of them; "
                f"got {item!r}: e.g. shard=TransformerBlock or shard=lambda m: m in model.layers."
            )
    return out


def check_shard(shard: ShardSpec | None) -> None:
    """TypeError unless `shard` is None, a module class, a predicate, or a list of them."""
    if shard is not None:
        _predicates(shard)


def matching_modules(model: nn.Module, shard: ShardSpec | None) -> list[nn.Module]:
    """The submodules of `model` that `shard` names (the root excluded), parents before children.

    ValueError when `shard` names none, listing the model's module classes to choose from.
    `shard=None` names none (only the root is sharded then).
    """
    if shard is None:
        return []
    tests = _predicates(shard)
    found = [m for m in model.modules() if m is not model and any(t(m) for t in tests)]
    if not found:
        classes = sorted({type(m).__name__ for m in model.modules() if m is not model})
        raise ValueError(
            f"DistributedCB(shard={_describe(shard)}) matches no module of "
            f"{type(model).__name__}; its module classes are {classes}. Pass the class of the "
            "repeated block (a transformer layer, say), e.g. shard=nn.TransformerEncoderLayer, "
            "or shard=None to shard the model as one unit."
        )
    return found


def _describe(shard: ShardSpec) -> str:
    items = list(shard) if isinstance(shard, (list, tuple)) else [shard]
    names = [getattr(i, "__name__", repr(i)) for i in items]
    return names[0] if len(names) == 1 else f"[{', '.join(names)}]"


def shard_model(
    model: nn.Module,
    shard: ShardSpec | None,
    device: torch.device,
    param_dtype: torch.dtype | None = None,
    reshard_after_forward: bool = True,
) -> list[nn.Module]:
    """Shard `model` in place with `fully_shard`: each block `shard` names (innermost first), then the root.

    Every process of the running process group must call it with the same model. `param_dtype`
    (bfloat16, say) makes FSDP2 compute in that dtype and reduce gradients in float32, keeping
    float32 parameters (its `MixedPrecisionPolicy`). Returns the blocks sharded, root last.
    """
    from torch.distributed.device_mesh import init_device_mesh

    try:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    except ImportError as e:  # FSDP2 became public in torch 2.6
        raise RuntimeError(
            f"DistributedCB(strategy='fsdp') needs FSDP2 (torch.distributed.fsdp.fully_shard, "
            f"torch >= 2.6); this is torch {torch.__version__}: upgrade torch, or use "
            "strategy='ddp'."
        ) from e

    from .dist import world_size

    blocks = matching_modules(model, shard)
    mesh = init_device_mesh(device.type, (world_size(),))
    policy = MixedPrecisionPolicy(
        param_dtype=param_dtype,
        reduce_dtype=torch.float32 if param_dtype is not None else None,
    )
    # Innermost first: fully_shard on a parent takes the parameters its sharded children left.
    done = []
    for block in reversed(blocks):
        if not is_sharded(block):
            fully_shard(
                block,
                mesh=mesh,
                mp_policy=policy,
                reshard_after_forward=reshard_after_forward,
            )
            done.append(block)
    fully_shard(
        model, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward
    )
    return [*done, model]


def full_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole state dict of a sharded `model` on the CPU, on rank 0 (other ranks get {}).

    Every process must call it (it all-gathers each tensor). For an unsharded model, its own
    state dict on the CPU.
    """
    if not is_sharded(model):
        return {k: v.detach().cpu() for k, v in model.state_dict().items()}
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
    )

    return get_model_state_dict(
        model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
    )


def optimizer_to_fqn(
    model: nn.Module, opt: torch.optim.Optimizer, state: dict[str, Any]
) -> dict[str, Any]:
    """A plain `opt.state_dict()` (keyed by parameter index) keyed by parameter names instead.

    The names are those of `model.named_parameters()` for the parameters `opt` holds, in its
    groups' order: what `set_optimizer_state_dict` needs to load a plain checkpoint's optimizer
    into a sharded model.
    """
    names = {id(p): n for n, p in model.named_parameters()}
    index_to_name: dict[int, str] = {}
    i = 0
    for group in opt.param_groups:
        for p in group["params"]:
            index_to_name[i] = names[id(p)]
            i += 1
    return {
        "state": {index_to_name[int(k)]: v for k, v in state["state"].items()},
        "param_groups": [
            {**g, "params": [index_to_name[int(k)] for k in g["params"]]}
            for g in state["param_groups"]
        ],
    }


def holds_shards(tree: Any) -> bool:
    """True when the first tensor found in `tree` (a state dict) is a DTensor: a sharded state."""
    found = _first_tensor(tree)
    return found is not None and type(found).__name__ == "DTensor"


def _first_tensor(tree: Any) -> torch.Tensor | None:
    if isinstance(tree, torch.Tensor):
        return tree
    if isinstance(tree, (dict, list, tuple)):
        for v in tree.values() if isinstance(tree, dict) else tree:
            found = _first_tensor(v)
            if found is not None:
                return found
    return None


def like_param(value: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """A copy of the whole tensor `value` laid out as `param`: its device and dtype, and its shard."""
    value = value.to(param.device, param.dtype).clone()
    mesh = getattr(param, "device_mesh", None)
    if mesh is None:
        return value
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(value, mesh, param.placements)


def load_whole_model(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load a whole (unsharded) state dict into the sharded `model`: each process keeps its shard."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
    )

    set_model_state_dict(
        model, state, options=StateDictOptions(full_state_dict=True, strict=False)
    )


def load_whole_optimizer(
    model: nn.Module, opt: torch.optim.Optimizer, state: dict[str, Any]
) -> None:
    """Load a plain `opt.state_dict()` of the unsharded model into `opt` over the sharded `model`."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_optimizer_state_dict,
    )

    set_optimizer_state_dict(
        model,
        opt,
        optimizer_to_fqn(model, opt, state),
        options=StateDictOptions(full_state_dict=True),
    )
