"""Rank helpers, reductions, loader sharding and gathering for `torch.distributed`; no callbacks.

Nothing home-made: the process group and DistributedSampler are torch's own. This module adds
only the glue a training loop needs: one-line rank checks (`is_main_process()`) for code that
prints or writes files, sums across processes for losses and metrics, each loader sharded across
processes (keeping its settings), and predictions gathered back into dataset order.
Outside a process group every helper is a no-op: one process, rank 0, values returned as they are.

Training shards are padded, as DistributedSampler does, because every process must take the same
number of optimizer steps; evaluation shards are not, so no sample is counted twice in validation.
"""

from __future__ import annotations

import inspect
import logging
import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    DistributedSampler,
    RandomSampler,
    SequentialSampler,
)

__all__ = [
    "agree_any",
    "any_process",
    "barrier",
    "capturing_on_every_rank",
    "distributed_sampler",
    "every_rank",
    "gather_in_order",
    "gather_objects",
    "has_process_group",
    "is_distributed",
    "is_main_process",
    "local_rank",
    "rank",
    "set_sampler_epoch",
    "shard_loader",
    "sum_across_processes",
    "world_size",
]

log = logging.getLogger(__name__)


def has_process_group() -> bool:
    """True when a torch.distributed process group is running (of any size)."""
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    """Number of processes: the process group's size, else `WORLD_SIZE` (set by torchrun), else 1."""
    return (
        dist.get_world_size()
        if has_process_group()
        else int(os.environ.get("WORLD_SIZE", "1"))
    )


def rank() -> int:
    """This process's global rank: the process group's, else `RANK` (set by torchrun), else 0."""
    return dist.get_rank() if has_process_group() else int(os.environ.get("RANK", "0"))


def local_rank() -> int:
    """This process's rank on its machine (`LOCAL_RANK`, set by torchrun), else 0: its GPU index."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main_process() -> bool:
    """True on rank 0 (and in any single-process run): the one process that prints and writes files."""
    return rank() == 0


def is_distributed() -> bool:
    """True when a process group with more than one process is running."""
    return has_process_group() and dist.get_world_size() > 1


def _collective_device() -> torch.device:
    """Where tensors must be for collectives: this process's GPU under nccl, else the CPU."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def barrier() -> None:
    """Wait for every process of the running process group (a no-op without one)."""
    if has_process_group():
        dist.barrier()


def sum_across_processes(value: Tensor | float) -> Tensor:
    """`value` summed over every process (itself outside a process group); every rank must call it."""
    t = torch.as_tensor(value)
    if not is_distributed():
        return t
    out = t.detach().to(
        _collective_device(), torch.float64 if t.is_floating_point() else torch.int64
    )
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out.to(t.device, t.dtype)


def any_process(flag: bool) -> bool:
    """True if `flag` is True on any process (`flag` itself outside a process group); every rank must call it.

    For a decision that one rank makes (rank 0 checks its files) and every rank must act on: a
    refusal raised on rank 0 alone would leave the others waiting in a collective.
    """
    return bool(sum_across_processes(torch.tensor(int(flag))) > 0)


# A gloo group beside an nccl default group, for host-side flags (keyed by the default group).
_HOST_GROUPS: dict[int, Any] = {}


def _host_group() -> Any:
    """The group for host-side collectives: None (the default group) under gloo, else a gloo group made once."""
    if dist.get_backend() == "gloo":
        return None
    key = id(dist.group.WORLD)  # untested here: no GPU in CI
    if key not in _HOST_GROUPS:
        _HOST_GROUPS[key] = dist.new_group(backend="gloo")
    return _HOST_GROUPS[key]


def agree_any(flag: bool) -> bool:
    """`any_process(flag)` for a flag checked at every step: reduced on the host, never on a GPU.

    Under nccl a one-value all-reduce on the GPU would make the host wait for the step's kernels
    (a sync per step); this one goes through a gloo group made once beside the default group.
    """
    if not is_distributed():
        return flag
    t = torch.tensor([int(flag)])
    dist.all_reduce(t, group=_host_group())
    return bool(t.item())


def gather_objects(obj: Any) -> list[Any]:
    """`obj` of every process, in rank order, on every rank (`[obj]` outside a process group); every rank must call it.

    For small host-side values (RNG states): they travel pickled through a gloo group, never a GPU.
    """
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj, group=_host_group())
    return out


# Set by `every_rank()`: the capture under way is made by every process at the same point.
_EVERY_RANK: ContextVar[bool] = ContextVar("learnloop_every_rank", default=False)


@contextmanager
def every_rank() -> Iterator[None]:
    """Mark what runs inside as a capture that every process makes at the same point (a batch boundary).

    Only inside it may a capture use collectives: MetricsCB sums its loss over processes, the
    accumulated gradients are averaged, and each rank's RNG states are gathered to rank 0. A
    capture outside it (`learn.save` on rank 0 alone, say) stays local to its process and
    cannot wait for the others.
    """
    token = _EVERY_RANK.set(True)
    try:
        yield
    finally:
        _EVERY_RANK.reset(token)


def capturing_on_every_rank() -> bool:
    """True inside `every_rank()` while a process group of more than one process runs."""
    return _EVERY_RANK.get() and is_distributed()


# ------------------------------------------------------------------------------ sharded loaders
class _UnpaddedSampler(DistributedSampler):
    """A DistributedSampler that does not pad: shards may differ by one sample, none is repeated."""

    def __iter__(self) -> Any:
        n = len(self.dataset)  # type: ignore[arg-type]
        if self.shuffle:
            # The same order on every rank.
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(n, generator=g).tolist()
        else:
            order = list(range(n))
        return iter(order[self.rank :: self.num_replicas])

    def __len__(self) -> int:
        return len(range(self.rank, len(self.dataset), self.num_replicas))  # type: ignore[arg-type]


_REBUILT = ("dataset", "batch_size", "shuffle", "sampler", "batch_sampler", "drop_last")


def distributed_sampler(dl: Any) -> DistributedSampler | None:
    """The DistributedSampler that drives `dl`, if any (directly, or inside a batch sampler)."""
    for s in (getattr(dl, "sampler", None), getattr(dl, "batch_sampler", None)):
        for candidate in (s, getattr(s, "sampler", None)):
            if isinstance(candidate, DistributedSampler):
                return candidate
    return None


def shard_loader(
    dl: DataLoader,
    training: bool,
    seed: int = 0,
    num_replicas: int | None = None,
    rank: int | None = None,
) -> DataLoader:
    """A copy of `dl` that reads only this process's shard, with the same shuffle, batch size and workers.

    Training shards are padded to equal length (DistributedSampler's default); evaluation shards
    are not. A loader already driven by a DistributedSampler is returned as it is. `num_replicas`
    and `rank` default to the process group's.
    """
    if distributed_sampler(dl) is not None:
        return dl
    fix = "give the loader a DistributedSampler yourself, and DistributedCB will use it as it is."
    if not isinstance(dl, DataLoader) or not hasattr(dl.dataset, "__len__"):
        raise TypeError(
            f"DistributedCB can shard only a torch DataLoader over a map-style dataset, got "
            f"{type(dl).__name__} over {type(getattr(dl, 'dataset', None)).__name__}: {fix}"
        )
    # Whole batches per __getitem__.
    fast = dl.batch_size is None and isinstance(dl.sampler, BatchSampler)
    if dl.batch_size is None and dl.batch_sampler is not None:
        name = type(dl.batch_sampler).__name__
        raise TypeError(
            f"DistributedCB cannot shard a custom batch_sampler ({name}): {fix}"
        )
    inner = dl.sampler.sampler if fast else dl.sampler  # type: ignore[attr-defined]
    if type(inner) not in (RandomSampler, SequentialSampler):
        raise TypeError(
            f"DistributedCB cannot shard a loader whose sampler is {type(inner).__name__}: {fix}"
        )
    cls = DistributedSampler if training else _UnpaddedSampler
    shuffle = isinstance(inner, RandomSampler)
    sampler: Any = cls(dl.dataset, num_replicas, rank, shuffle=shuffle, seed=seed)  # type: ignore[arg-type]
    kept = {
        k: getattr(dl, k)
        for k in _loader_args()
        if k not in _REBUILT and hasattr(dl, k)
    }
    if fast:
        whole: Any = dl.sampler
        sampler = BatchSampler(sampler, whole.batch_size, whole.drop_last)
        return DataLoader(dl.dataset, batch_size=None, sampler=sampler, **kept)
    return DataLoader(
        dl.dataset,
        batch_size=dl.batch_size,
        sampler=sampler,
        drop_last=dl.drop_last,
        **kept,
    )


def _loader_args() -> list[str]:
    return list(inspect.signature(DataLoader.__init__).parameters)[1:]


def set_sampler_epoch(dl: Any, epoch: int) -> None:
    """Call `set_epoch(epoch)` on the DistributedSampler driving `dl`, if there is one."""
    sampler = distributed_sampler(dl)
    if sampler is not None:
        sampler.set_epoch(epoch)


# ------------------------------------------------------------------------------ get_preds
def _sample_indices(dl: Any, n: int) -> list[int] | None:
    """The dataset indices of the first `n` samples `dl` yields (its sampler is deterministic per epoch)."""
    if distributed_sampler(dl) is None:
        return None
    # Honours drop_last; None when fed whole batches.
    batches = getattr(dl, "batch_sampler", None)
    flat: list[int] = []
    for item in batches if batches is not None else dl.sampler:
        flat.extend(item if isinstance(item, Iterable) else [item])
    return [int(i) for i in flat[:n]]


def _cat(parts: list[Any]) -> Any:
    """Concatenate tensors, or tuples of tensors element by element (several targets); None stays None."""
    if parts[0] is None:  # batches without targets
        return None
    if isinstance(parts[0], tuple):
        return tuple(torch.cat(list(p)) for p in zip(*parts))
    return torch.cat(parts)


def _take(x: Any, index: Tensor) -> Any:
    if x is None:
        return None
    return tuple(t[index] for t in x) if isinstance(x, tuple) else x[index]


def gather_in_order(
    preds: list[Tensor], targets: list[Any], dl: Any
) -> tuple[list[Tensor], list[Any]]:
    """Every process's batches of `preds` and `targets`, in dataset order, on every rank.

    Outside a process group this returns its inputs. Samples a padded sampler repeated are kept
    once. A batch's targets may be a tensor or a tuple of tensors.
    """
    if not is_distributed():
        return preds, targets
    local = (
        torch.cat(preds) if preds else None,
        _cat(targets) if targets else None,
    )
    n = 0 if local[0] is None else local[0].shape[0]
    everything: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(everything, (*local, _sample_indices(dl, n)))
    parts = [p for p in everything if p[0] is not None]
    if not parts:
        return [], []
    all_preds, all_targets = _cat([p[0] for p in parts]), _cat([p[1] for p in parts])
    if any(p[2] is None for p in parts):
        log.warning(
            "get_preds: the loader has no DistributedSampler; predictions are in rank order."
        )
        return [all_preds], [all_targets]
    idx = torch.tensor([i for p in parts for i in p[2]])
    order = torch.argsort(idx, stable=True)
    first = torch.ones(len(order), dtype=torch.bool)
    first[1:] = idx[order][1:] != idx[order][:-1]
    order = order[first]
    return [all_preds[order]], [_take(all_targets, order)]
