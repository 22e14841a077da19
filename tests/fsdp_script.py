"""Run by test_fsdp_dist.py under torchrun: `torchrun --nproc_per_node=2 fsdp_script.py OUT --mode M`.

`--mode fsdp` trains, each time on a fresh model, with `DistributedCB(strategy="fsdp",
shard=Block)`: a plain fit followed by validate and get_preds (the validation set's shards
differ by one batch), get_preds as a learner's first call, lr_find then fit_one_cycle,
GradClipCB, GradAccumCB(2) and MixedPrecisionCB(bfloat16), a profile; it records how the parameters and
the optimizer state are sharded. `--mode ddp` runs the plain fit under DDP. Each rank writes
its pid to OUT/pid<rank>; rank 0 writes what it saw to OUT/<mode>.pt (values each rank sees
for itself are gathered there, one per rank). `make_learner` and the constants are imported
by the test for the single-process runs, which take batches twice as large.
"""

from __future__ import annotations

import argparse
import os
from functools import partial
from pathlib import Path
from typing import Any

import torch
from helpers import make_data
from torch import nn
from torch.utils.data import DataLoader

from learnloop import (
    Callback,
    DataLoaders,
    DistributedCB,
    GradAccumCB,
    GradClipCB,
    Learner,
    MetricsCB,
    MixedPrecisionCB,
    ProgressCB,
)
from learnloop.dist import gather_objects, rank
from learnloop.fsdp import full_model_state

PER_RANK_BS = 8  # 2 processes: a global batch of 16
N_TRAIN = 96  # 6 batches of 8 on each process
N_VALID = 49  # 25 and 24 rows: 4 validation batches on rank 0, 3 on rank 1
MAX_NORM = 0.5  # GradClipCB's, below most of the norms, so clipping changes the steps


class Block(nn.Module):
    """A residual block: the unit FSDP shards."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.lin = nn.Linear(n, n)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.relu(self.lin(x))


def make_learner(
    bs: int, cbs: tuple[Callback, ...] = (), opt: str = "adamw"
) -> Learner:
    """The same seeded model (odd sizes: 3 output rows split 2/1), data and optimizer in each process."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), Block(16), Block(16), nn.Linear(16, 3))
    dls = DataLoaders(
        DataLoader(make_data(N_TRAIN), batch_size=bs),
        DataLoader(make_data(N_VALID, seed=1), batch_size=bs),
    )
    opt_func = (
        partial(torch.optim.AdamW, weight_decay=0.01)
        if opt == "adamw"
        else partial(torch.optim.SGD, momentum=0.9)
    )
    return Learner(
        model,
        dls,
        lr=0.01 if opt == "adamw" else 0.1,
        opt_func=opt_func,
        cbs=[ProgressCB(bar=False), *cbs],
    )


def history(learn: Learner) -> list[dict[str, Any]]:
    """The MetricsCB's rows: one per epoch with train_loss and valid_loss."""
    (metrics,) = [cb for cb in learn.cbs if isinstance(cb, MetricsCB)]
    return [dict(row) for row in metrics.history]


def fsdp(
    extra: tuple[Callback, ...] = (), bs: int = PER_RANK_BS, opt: str = "adamw"
) -> Learner:
    """A learner whose model DistributedCB shards block by block."""
    return make_learner(bs, (DistributedCB(strategy="fsdp", shard=Block), *extra), opt)


def held(t: torch.Tensor) -> dict[str, Any]:
    """What this process holds of `t`: its type, its local elements (a DTensor's shard) and dtype."""
    local = t.to_local() if hasattr(t, "to_local") else t
    return {
        "type": type(t).__name__,
        "local": local.numel(),
        "total": t.numel(),
        "dtype": str(local.dtype),
    }


def sharding(learn: Learner) -> dict[str, Any]:
    """What this process holds of each parameter and of each optimizer state tensor (AdamW's step left out)."""
    names = {id(p): n for n, p in learn.model.named_parameters()}
    state = {
        f"{names[id(p)]}.{k}": held(v)
        for p, s in learn.opt.state.items()
        for k, v in s.items()
        if isinstance(v, torch.Tensor) and v.dim() > 0
    }
    params = {n: held(p) for n, p in learn.model.named_parameters()}
    return {"params": params, "optimizer": state}


class Dtypes(Callback):
    """Hooks the Linear inside each Block: the dtypes of its input, its output and its weight in forward."""

    def __init__(self) -> None:
        self.seen: set[tuple[str, str, str]] = set()

    def before_fit(self, learn: Learner, *args: Any, **kwargs: Any) -> None:
        for m in learn.model.modules():
            if isinstance(m, Block):
                m.lin.register_forward_hook(self._hook)

    def _hook(self, module: nn.Linear, args: tuple, out: torch.Tensor) -> None:
        # Inside the block's forward FSDP has gathered its parameters: a plain tensor here.
        self.seen.add((str(args[0].dtype), str(out.dtype), str(module.weight.dtype)))


class ValidBatches(Callback):
    """Counts the validation batches this process runs."""

    def __init__(self) -> None:
        self.n = 0

    def after_batch(self, learn: Learner, *args: Any, **kwargs: Any) -> None:
        if not learn.training:
            self.n += 1


def run_fsdp() -> dict[str, Any]:
    """Every FSDP check, each on a fresh model; see the module docstring."""
    out: dict[str, Any] = {}

    # A plain fit (AdamW) whose validation shards are uneven; then validate and get_preds.
    learn = fsdp()
    learn.fit(2)
    counted = ValidBatches()
    out["fit"] = {
        "weights": full_model_state(learn.model),
        "history": history(learn),
        "validate": learn.validate(),
        "preds": learn.get_preds(cbs=[counted]),
        "valid_batches": gather_objects(counted.n),
        "sharding": gather_objects(sharding(learn)),
    }
    # A profile limited to 3 validation batches of rank 0's 4 and rank 1's 3: every process runs
    # as many forwards (all-gathers), none waits for another.
    before = full_model_state(learn.model)
    report = learn.profile(n_batches=1, warmup=2)
    after = full_model_state(learn.model)
    out["profile"] = {
        "counted": gather_objects((report.train.n_batches, report.valid.n_batches)),
        "kept": all(torch.equal(before[k], after[k]) for k in before),
    }
    # get_preds as a fresh learner's first call: the model is sharded there.
    first = fsdp()
    out["first_preds"] = first.get_preds()
    out["first_sharded"] = gather_objects(type(next(first.model.parameters())).__name__)

    # lr_find as the first call (it shards the model), then fit_one_cycle on the same learner.
    learn = fsdp(opt="sgd")
    before = full_model_state(learn.model)
    lr = learn.lr_find()
    out["lr_find"] = {
        "lr": gather_objects((isinstance(lr, float), float(lr))),
        "losses": lr.losses,
        "before": before,
        "after": full_model_state(learn.model),
        "sharded": gather_objects(type(next(learn.model.parameters())).__name__),
        "no_optimizer": learn.opt is None,
    }
    learn.fit_one_cycle(2, lr_max=0.05)
    out["one_cycle"] = {
        "weights": full_model_state(learn.model),
        "history": history(learn),
    }

    clip = GradClipCB(MAX_NORM)
    learn = fsdp((clip,), opt="sgd")
    learn.fit(2)
    out["clip"] = {"weights": full_model_state(learn.model), "norms": clip.norms}

    # Two batches of 4 per process and step: the global batch of 16.
    learn = fsdp((GradAccumCB(2),), bs=PER_RANK_BS // 2, opt="sgd")
    learn.fit(2)
    out["accum"] = {"weights": full_model_state(learn.model), "history": history(learn)}

    dtypes = Dtypes()
    learn = fsdp((MixedPrecisionCB(torch.bfloat16), dtypes), opt="sgd")
    start = learn.validate()["valid_loss"]
    learn.fit(2)
    out["mixed"] = {
        "start": start,
        "history": history(learn),
        "dtypes": gather_objects(sorted(dtypes.seen)),
        "sharding": gather_objects(sharding(learn)),
    }
    return out


def run_ddp() -> dict[str, Any]:
    """The plain fit under DDP."""
    learn = make_learner(PER_RANK_BS, (DistributedCB(),))
    learn.fit(2)
    return {
        "fit": {"weights": full_model_state(learn.model), "history": history(learn)}
    }


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("out", type=Path)
    p.add_argument("--mode", choices=["fsdp", "ddp"], required=True)
    args = p.parse_args()
    torch.set_num_threads(1)
    (args.out / f"pid{rank()}").write_text(str(os.getpid()))
    result = run_fsdp() if args.mode == "fsdp" else run_ddp()
    if rank() == 0:
        torch.save(result, args.out / f"{args.mode}.pt")


if __name__ == "__main__":
    main()
