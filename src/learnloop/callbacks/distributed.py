"""`DistributedCB`: the same script under `torchrun`, with PyTorch's DDP or FSDP2.

The process group, DDP, `fully_shard` and DistributedSampler are torch's own; the rank helpers,
reductions and loader sharding this callback uses live in `learnloop.dist`, the sharding glue in
`learnloop.fsdp`.
"""

from __future__ import annotations

import atexit
import logging
import os
import time
import warnings
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from ..dist import (
    distributed_sampler,
    has_process_group,
    is_distributed,
    rank,
    set_sampler_epoch,
    shard_loader,
    world_size,
)
from ..fsdp import (
    ShardSpec,
    check_shard,
    is_sharded,
    load_whole_optimizer,
    shard_model,
)
from .core import ORDERS, Callback
from .device import DeviceCB, to_device

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
        # Let gloo's worker threads release the last collectives first, while Python still
        # runs: a finished work item they free drops a Python object, which needs the GIL, and
        # a thread taking the GIL while Python finalizes aborts the process ("terminate called
        # without an active exception", exit code -6). After FSDP those threads outlive
        # destroy_process_group (torch still holds the group); with torch 2.13 on CPU, 7 runs
        # in 48 aborted so at exit, none in 48 with this pause.
        time.sleep(0.05)
        dist.destroy_process_group()


class DistributedCB(Callback):
    """Data-parallel training under `torchrun`: DDP or FSDP2 for the model, a shard of each loader per process.

    Attached automatically when `WORLD_SIZE > 1` (with DDP). It starts the process group if none
    is running (nccl for a model on CUDA, gloo on CPU; one it started is destroyed when the
    process exits), shards `learn.dls` for the fit and any loader given to `validate` or
    `get_preds`, and calls `set_epoch` every epoch. The model's device is DeviceCB's, which under
    torchrun defaults to `cuda:LOCAL_RANK`; this callback runs after DeviceCB (order -10).

    `strategy="ddp"` (the default) wraps the model in DistributedDataParallel for the training
    phases (`learn.model` is your module everywhere else): every process holds the whole model,
    its gradients and optimizer state. `strategy="fsdp"` shards them instead, with FSDP2's
    `fully_shard`: each block `shard` names (a module class, a predicate or a list of them; None:
    the model as one unit), then the root, so each process holds 1/N of every parameter,
    gradient and optimizer state, for a model too big for one device. The model is sharded in
    place before the optimizer is built (an optimizer with state is carried over), once, at the
    first fit, `load`, `validate`, `get_preds` or `lr_find`, and stays sharded: `learn.model`
    then holds DTensor parameters. With a MixedPrecisionCB attached, FSDP2 computes in its dtype
    and reduces gradients in float32 (`MixedPrecisionPolicy`). Checkpoints become sharded
    folders (see `learnloop.sharded`). Outside a process group (one process) `strategy="fsdp"`
    trains the model unsharded, with a one-line note.

    Args:
        backend: process-group backend; None picks nccl for a model on CUDA, else gloo.
        strategy: "ddp" or "fsdp".
        shard: with "fsdp", the blocks to shard one by one (e.g. your transformer layer class).
        reshard_after_forward: with "fsdp", free each block's gathered parameters after its
            forward (less memory, one more all-gather in backward); FSDP2's option.
        **ddp_kwargs: passed to DistributedDataParallel (e.g. `find_unused_parameters=True`).

    Example:
        >>> learn = Learner(model, dls, cbs=[DistributedCB(find_unused_parameters=True)])  # doctest: +SKIP
        >>> learn = Learner(model, dls, cbs=[DistributedCB(strategy="fsdp", shard=Block)])  # doctest: +SKIP
    """

    unique = True  # a DistributedCB passed to the Learner or to fit replaces the attached one

    order = ORDERS["DistributedCB"]

    def __init__(
        self,
        backend: str | None = None,
        strategy: str = "ddp",
        shard: ShardSpec | None = None,
        reshard_after_forward: bool = True,
        **ddp_kwargs: Any,
    ) -> None:
        if strategy not in ("ddp", "fsdp"):
            raise ValueError(
                f"DistributedCB(strategy={strategy!r}): choose 'ddp' (a whole model per "
                "process) or 'fsdp' (the model sharded across processes)."
            )
        if strategy == "ddp" and shard is not None:
            raise ValueError(
                "DistributedCB(shard=...) names the blocks FSDP shards: pass strategy='fsdp' "
                "with it, or drop shard= for DDP."
            )
        if strategy == "fsdp" and ddp_kwargs:
            raise ValueError(
                f"DistributedCB(strategy='fsdp') got DDP options {sorted(ddp_kwargs)}: they "
                "apply to strategy='ddp' only."
            )
        check_shard(shard)
        self.backend, self.strategy, self.shard = backend, strategy, shard
        self.reshard_after_forward, self.ddp_kwargs = reshard_after_forward, ddp_kwargs
        self.ddp: DistributedDataParallel | None = None
        self._dls: Any = None
        self._seed: int | None = None
        self._shards: dict[int, tuple[Any, DataLoader]] = {}
        self._noted = False
        self._forwards = 0  # validation forwards of this phase (FSDP)
        self._most = 0  # the most validation batches any process has this phase (FSDP)
        # The phase's last inputs, for the forwards the other processes still run (FSDP).
        self._xb: Any = None

    def _alone(self) -> bool:
        """True for strategy 'fsdp' in one process without a process group: it trains unsharded."""
        return self.strategy == "fsdp" and not has_process_group() and world_size() <= 1

    @property
    def fsdp(self) -> bool:
        """True when the model is sharded with FSDP2 (strategy 'fsdp' in a process group)."""
        return self.strategy == "fsdp" and is_distributed()

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

    def prepare(self, learn: Learner) -> None:
        """Shard `learn.model` with FSDP2 and rebuild the optimizer on the shards (once; strategy 'fsdp').

        Every process calls it at the same point (the Learner does, before a fit, a load or an
        evaluation). The model is first placed on DeviceCB's device; an optimizer's state and
        hyperparameters are carried over to the new optimizer.
        """
        if self.strategy != "fsdp" or is_sharded(learn.model):
            return
        if self._alone():
            if not self._noted and rank() == 0:
                log.warning(
                    "DistributedCB(strategy='fsdp') runs in a single process (no process group, "
                    "WORLD_SIZE 1): the model is trained unsharded."
                )
            self._noted = True
            return
        for cb in learn.cbs:
            if isinstance(cb, DeviceCB):
                cb.place_model(learn)
        device = self._setup_process_group(learn)
        old = learn.opt
        carried = old.state_dict() if old is not None else None
        shard_model(
            learn.model,
            self.shard,
            device,
            param_dtype=_mixed_precision_dtype(learn, device),
            reshard_after_forward=self.reshard_after_forward,
        )
        if carried is not None:
            # The same parameters by name, now shards: a new optimizer takes the old one's state.
            learn.opt = learn.opt_func(learn.model.parameters(), lr=learn.lr)
            load_whole_optimizer(learn.model, learn.opt, carried)

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
        self.prepare(learn)
        if self._alone():
            return
        device = self._setup_process_group(learn)
        if self.strategy == "ddp":
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
        # Validation runs the bare module: no gradients to sync, and uneven shards then need no
        # collective (under FSDP, see after_validate).
        self.prepare(learn)
        self._forwards, self._xb, self._most = 0, None, 0
        if self._alone():
            return
        self._setup_process_group(learn)
        if distributed_sampler(learn.dl) is None:
            learn.dl = self._shard(learn.dl, training=False)
            # A shorter count set by an earlier callback (LimitBatchesCB) still holds.
            learn.n_iter = min(len(learn.dl), learn.n_iter or len(learn.dl))
        set_sampler_epoch(learn.dl, epoch)
        if self.fsdp and is_sharded(learn.model):
            # Agreed now, while every process is here: after the batches, one still in its
            # last forward's all-gather could not join another collective.
            most = torch.tensor([learn.n_iter or 0])
            dist.all_reduce(most, op=dist.ReduceOp.MAX)
            self._most = int(most.item())

    def after_pred(self, learn: Learner, *args: Any, **kwargs: Any) -> None:
        if not learn.training:
            self._forwards += 1
            self._xb = learn.xb

    def after_validate(self, learn: Learner, *args: Any, **kwargs: Any) -> None:
        # Under FSDP every forward all-gathers parameters with every process, but validation
        # shards may differ by a batch: a process with fewer batches runs the model on its last
        # inputs (outputs dropped) until it has run as many forwards as the busiest one.
        xb, self._xb = self._xb, None
        missing = self._most - self._forwards
        if missing > 0:
            if xb is None:
                xb = self._any_inputs(learn)
            with torch.no_grad():
                for _ in range(missing):
                    learn.model(*xb) if learn.n_inp > 1 else learn.model(xb)

    def _any_inputs(self, learn: Learner) -> Any:
        """Inputs of one batch of the loader this process's empty validation shard came from."""
        source = next(
            (whole for whole, shard in self._shards.values() if shard is learn.dl),
            learn.dl,
        )
        batch = next(iter(source))
        xb, _ = learn.split_batch(batch)
        first = next(learn.model.parameters())
        return to_device(xb, first.device)

    def after_fit(self, learn: Learner, *args: Any, **kwargs: Any) -> None:
        if self.ddp is not None:
            learn.model = self.ddp.module
            self.ddp = None
        if self._dls is not None:
            learn.dls, self._dls = self._dls, None
        self._shards.clear()

    def __repr__(self) -> str:
        extra = (
            f", strategy='fsdp', shard={self.shard!r}"
            if self.strategy == "fsdp"
            else ""
        )
        return f"DistributedCB(backend={self.backend!r}{extra})"


def _mixed_precision_dtype(learn: Learner, device: torch.device) -> torch.dtype | None:
    """The dtype an attached MixedPrecisionCB computes in (its auto choice resolved), else None."""
    from .training import MixedPrecisionCB

    for cb in learn.cbs:
        if isinstance(cb, MixedPrecisionCB):
            if cb.dtype is not None:
                return cb.dtype
            return torch.float16 if device.type == "cuda" else torch.bfloat16
    return None
