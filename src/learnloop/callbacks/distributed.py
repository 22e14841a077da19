"""`DistributedCB`: the same script under `torchrun`, with PyTorch's DistributedDataParallel.

Nothing home-made: the process group, DDP and DistributedSampler are torch's own. This module
adds only the glue a training loop needs: each loader sharded across processes (keeping its
settings), losses and metrics reduced as sums and counts, predictions gathered back into dataset
order, and one-line rank checks (`is_main_process()`) for code that prints or writes files.

Training shards are padded, as DistributedSampler does, because every process must take the same
number of optimizer steps; evaluation shards are not, so no sample is counted twice in validation.
"""

from __future__ import annotations

import atexit
import inspect
import logging
import os
from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    DistributedSampler,
    RandomSampler,
    SequentialSampler,
)

from .core import Callback

__all__ = [
    "DistributedCB",
    "gather_in_order",
    "is_distributed",
    "is_main_process",
    "local_rank",
    "rank",
    "shard_loader",
    "sum_across_processes",
    "world_size",
]

log = logging.getLogger(__name__)


def _initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    """Number of processes: the process group's size, else `WORLD_SIZE` (set by torchrun), else 1."""
    return (
        dist.get_world_size()
        if _initialized()
        else int(os.environ.get("WORLD_SIZE", "1"))
    )


def rank() -> int:
    """This process's global rank: the process group's, else `RANK` (set by torchrun), else 0."""
    return dist.get_rank() if _initialized() else int(os.environ.get("RANK", "0"))


def local_rank() -> int:
    """This process's rank on its machine (`LOCAL_RANK`, set by torchrun), else 0: its GPU index."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main_process() -> bool:
    """True on rank 0 (and in any single-process run): the one process that prints and writes files."""
    return rank() == 0


def is_distributed() -> bool:
    """True when a process group with more than one process is running."""
    return _initialized() and dist.get_world_size() > 1


def _collective_device() -> torch.device:
    """Where tensors must be for collectives: this process's GPU under nccl, else the CPU."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


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


def _distributed_sampler(dl: Any) -> DistributedSampler | None:
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
    if _distributed_sampler(dl) is not None:
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


def _set_epoch(dl: Any, epoch: int) -> None:
    sampler = _distributed_sampler(dl)
    if sampler is not None:
        sampler.set_epoch(epoch)


# ------------------------------------------------------------------------------ get_preds
def _sample_indices(dl: Any, n: int) -> list[int] | None:
    """The dataset indices of the first `n` samples `dl` yields (its sampler is deterministic per epoch)."""
    if _distributed_sampler(dl) is None:
        return None
    # Honours drop_last; None when fed whole batches.
    batches = getattr(dl, "batch_sampler", None)
    flat: list[int] = []
    for item in batches if batches is not None else dl.sampler:
        flat.extend(item if isinstance(item, Iterable) else [item])
    return [int(i) for i in flat[:n]]


def _cat(parts: list[Any]) -> Any:
    """Concatenate tensors, or tuples of tensors element by element (several targets)."""
    if isinstance(parts[0], tuple):
        return tuple(torch.cat(list(p)) for p in zip(*parts))
    return torch.cat(parts)


def _take(x: Any, index: Tensor) -> Any:
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


# ------------------------------------------------------------------------------ the callback
def _destroy_process_group() -> None:
    if _initialized():
        dist.destroy_process_group()


class DistributedCB(Callback):
    """Data-parallel training under `torchrun`: DDP for the model, a shard of each loader per process.

    Attached automatically when `WORLD_SIZE > 1`. It starts the process group if none is running
    (nccl for a model on CUDA, gloo on CPU; one it started is destroyed when the process exits),
    wraps the model in DistributedDataParallel for the training phases (`learn.model` is your
    module everywhere else), shards `learn.dls` for the fit and any loader given to `validate` or
    `get_preds`, and calls `set_epoch` every epoch. The model's device is DeviceCB's, which under
    torchrun defaults to `cuda:LOCAL_RANK`; this callback runs after DeviceCB (order -10).

    Args:
        backend: process-group backend; None picks nccl for a model on CUDA, else gloo.
        **ddp_kwargs: passed to DistributedDataParallel (e.g. `find_unused_parameters=True`).

    Example:
        >>> learn = Learner(model, dls, cbs=[DistributedCB(find_unused_parameters=True)])  # doctest: +SKIP
    """

    unique = True  # a DistributedCB passed to the Learner or to fit replaces the attached one

    order = -10

    def __init__(self, backend: str | None = None, **ddp_kwargs: Any) -> None:
        self.backend, self.ddp_kwargs = backend, ddp_kwargs
        self.ddp: DistributedDataParallel | None = None
        self._dls: Any = None
        self._seed: int | None = None
        self._shards: dict[int, tuple[Any, DataLoader]] = {}

    def _setup_process_group(self, learn: Any) -> torch.device:
        """Start the process group unless one runs; return the model's device (placed by DeviceCB)."""
        first = next(learn.model.parameters(), None)
        device = first.device if first is not None else torch.device("cpu")
        if device.type == "cuda":
            # Collectives and `cuda` without an index now mean this GPU.
            torch.cuda.set_device(device)
        if _initialized():
            return device
        if "WORLD_SIZE" not in os.environ or "MASTER_ADDR" not in os.environ:
            raise RuntimeError(
                "DistributedCB needs a process group: launch the script with "
                "`torchrun --nproc_per_node=N script.py`, "
                "or call torch.distributed.init_process_group() first."
            )
        backend = self.backend or ("nccl" if device.type == "cuda" else "gloo")
        dist.init_process_group(backend)
        atexit.register(_destroy_process_group)
        log.info(
            "DistributedCB started a %s process group: rank %d of %d.",
            backend,
            rank(),
            world_size(),
        )
        return device

    def _shared_seed(self) -> int:
        """One shuffle seed for all ranks (rank 0's torch seed), so their shards never overlap."""
        if self._seed is None:
            box = [torch.initial_seed() % 2**31]
            dist.broadcast_object_list(box, src=0)
            self._seed = int(box[0])
        return self._seed

    def _shard(self, dl: Any, training: bool) -> Any:
        if dl is None or _distributed_sampler(dl) is not None:
            return dl
        cached = self._shards.get(id(dl))
        # Reuse: persistent workers survive across epochs.
        if cached is None or cached[0] is not dl:
            cached = (dl, shard_loader(dl, training, self._shared_seed()))
            self._shards[id(dl)] = cached
        return cached[1]

    def before_fit(self, learn: Any, *args: Any, **kwargs: Any) -> None:
        device = self._setup_process_group(learn)
        ids = [device.index] if device.type == "cuda" else None
        self.ddp = DistributedDataParallel(
            learn.model, device_ids=ids, **self.ddp_kwargs
        )
        self._dls = learn.dls
        learn.dls = type(learn.dls)(
            self._shard(learn.dls.train, True), self._shard(learn.dls.valid, False)
        )

    def before_train(self, learn: Any, epoch: int, **kwargs: Any) -> None:
        if self.ddp is not None:
            learn.model = self.ddp
        _set_epoch(learn.dl, epoch)

    def after_train(self, learn: Any, *args: Any, **kwargs: Any) -> None:
        if self.ddp is not None:
            learn.model = self.ddp.module

    def before_validate(self, learn: Any, epoch: int, **kwargs: Any) -> None:
        # Validation runs the bare module: no gradients to sync, and uneven shards then need no collective.
        self._setup_process_group(learn)
        if _distributed_sampler(learn.dl) is None:
            learn.dl = self._shard(learn.dl, training=False)
            # A shorter count set by an earlier callback (LimitBatchesCB) still holds.
            learn.n_iter = min(len(learn.dl), learn.n_iter or len(learn.dl))
        _set_epoch(learn.dl, epoch)

    def after_fit(self, learn: Any, *args: Any, **kwargs: Any) -> None:
        if self.ddp is not None:
            learn.model = self.ddp.module
            self.ddp = None
        if self._dls is not None:
            learn.dls, self._dls = self._dls, None
        self._shards.clear()

    def __repr__(self) -> str:
        return f"DistributedCB(backend={self.backend!r})"
