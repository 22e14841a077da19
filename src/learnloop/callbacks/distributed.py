"""`DistributedCB`: the same script under `torchrun`, with PyTorch's DistributedDataParallel.

The process group, DDP and DistributedSampler are torch's own; the rank helpers, reductions and
loader sharding this callback uses live in `learnloop.dist`.
"""

from __future__ import annotations

import atexit
import logging
import os
import warnings
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from ..dist import (
    distributed_sampler,
    has_process_group,
    rank,
    set_sampler_epoch,
    shard_loader,
    world_size,
)
from .core import ORDERS, Callback

if TYPE_CHECKING:
    from ..learner import Learner

__all__ = ["DistributedCB"]

log = logging.getLogger(__name__)


def check_restart_store() -> None:
    """Warn (rank 0) when torchrun restarts workers over the agent's shared store (pytorch#135712).

    torchrun sets TORCHELASTIC_USE_AGENT_STORE and TORCHELASTIC_MAX_RESTARTS for its workers. With
    restarts allowed and the store shared, a restarted attempt can read the dead attempt's store
    address and fail ("Gloo connectFullMesh failed ... Connection refused") or hang; measured here,
    6 restarts in 10. The variable that avoids it is read by torchrun itself, before any worker
    starts, so learnloop cannot set it: the launcher's environment must.
    """
    restarts = os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0")
    shared = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    if shared and restarts.isdigit() and int(restarts) > 0 and rank() == 0:
        warnings.warn(
            f"torchrun may restart these workers (--max-restarts={restarts}) over its shared "
            "store, and a restart then often fails with 'Gloo connectFullMesh failed' or hangs "
            "(pytorch/pytorch#135712). Launch with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 in the "
            "environment: TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 torchrun ... .",
            stacklevel=2,
        )


def _destroy_process_group() -> None:
    if has_process_group():
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

    order = ORDERS["DistributedCB"]

    def __init__(self, backend: str | None = None, **ddp_kwargs: Any) -> None:
        self.backend, self.ddp_kwargs = backend, ddp_kwargs
        self.ddp: DistributedDataParallel | None = None
        self._dls: Any = None
        self._seed: int | None = None
        self._shards: dict[int, tuple[Any, DataLoader]] = {}

    def _setup_process_group(self, learn: Learner) -> torch.device:
        """Start the process group unless one runs; return the model's device (placed by DeviceCB)."""
        first = next(learn.model.parameters(), None)
        device = first.device if first is not None else torch.device("cpu")
        if device.type == "cuda":
            # Collectives and `cuda` without an index now mean this GPU.
            torch.cuda.set_device(device)
        if has_process_group():
            return device
        if "WORLD_SIZE" not in os.environ or "MASTER_ADDR" not in os.environ:
            raise RuntimeError(
                "DistributedCB needs a process group: launch the script with "
                "`torchrun --nproc_per_node=N script.py`, "
                "or call torch.distributed.init_process_group() first."
            )
        backend = self.backend or ("nccl" if device.type == "cuda" else "gloo")
        check_restart_store()
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
        if dl is None or distributed_sampler(dl) is not None:
            return dl
        cached = self._shards.get(id(dl))
        # Reuse: persistent workers survive across epochs.
        if cached is None or cached[0] is not dl:
            cached = (dl, shard_loader(dl, training, self._shared_seed()))
            self._shards[id(dl)] = cached
        return cached[1]

    def before_fit(self, learn: Learner, *args: Any, **kwargs: Any) -> None:
        device = self._setup_process_group(learn)
        ids = [device.index] if device.type == "cuda" else None
        self.ddp = DistributedDataParallel(
            learn.model, device_ids=ids, **self.ddp_kwargs
        )
        self._dls = learn.dls
        learn.dls = type(learn.dls)(
            self._shard(learn.dls.train, True), self._shard(learn.dls.valid, False)
        )

    def before_train(self, learn: Learner, epoch: int, **kwargs: Any) -> None:
        if self.ddp is not None:
            learn.model = self.ddp
        set_sampler_epoch(learn.dl, epoch)

    def after_train(self, learn: Learner, *args: Any, **kwargs: Any) -> None:
        if self.ddp is not None:
            learn.model = self.ddp.module

    def before_validate(self, learn: Learner, epoch: int, **kwargs: Any) -> None:
        # Validation runs the bare module: no gradients to sync, and uneven shards then need no collective.
        self._setup_process_group(learn)
        if distributed_sampler(learn.dl) is None:
            learn.dl = self._shard(learn.dl, training=False)
            # A shorter count set by an earlier callback (LimitBatchesCB) still holds.
            learn.n_iter = min(len(learn.dl), learn.n_iter or len(learn.dl))
        set_sampler_epoch(learn.dl, epoch)

    def after_fit(self, learn: Learner, *args: Any, **kwargs: Any) -> None:
        if self.ddp is not None:
            learn.model = self.ddp.module
            self.ddp = None
        if self._dls is not None:
            learn.dls, self._dls = self._dls, None
        self._shards.clear()

    def __repr__(self) -> str:
        return f"DistributedCB(backend={self.backend!r})"
