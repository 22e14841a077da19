"""Run by test_distributed.py under torchrun: `torchrun --nproc_per_node=2 ddp_script.py OUT`.

Each rank fits a linear model for one epoch, validates, predicts, and trains on shuffled index
data; it saves what it saw to OUT/rank<r>.pt for the test to compare with a single-process run.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from helpers import make_data
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from learnloop import (
    Accuracy,
    Callback,
    CheckpointCB,
    CSVLoggerCB,
    DataLoaders,
    GradAccumCB,
    Learner,
    MetricsCB,
)
from learnloop.dist import rank, world_size

PER_RANK_BS = 8  # 2 processes: a global batch of 16
N_TRAIN, N_VALID = 96, 45  # 45 rows split 23/22: padding would count one row twice


class SeenIndices(Callback):
    """Records the inputs (here: dataset indices) of each training batch, per epoch."""

    def __init__(self) -> None:
        self.epochs: list[list[int]] = []

    def before_train(self, learn, *args, **kwargs):
        self.epochs.append([])

    def before_batch(self, learn, *args, **kwargs):
        if learn.training:
            self.epochs[-1] += learn.batch[0].flatten().long().tolist()


class SyncFlags(Callback):
    """Records, for each training batch, whether DDP will all-reduce its gradients."""

    def __init__(self, seen: list[bool]) -> None:
        self.seen = seen

    def after_pred(self, learn, *args, **kwargs):
        if learn.training:
            self.seen.append(learn.model.require_backward_grad_sync)


def first_prob(preds, targets):
    """A function metric whose batch values differ: the mean probability of class 0."""
    return preds.softmax(-1)[:, 0].mean()


def accuracy(inp, targ):
    """fastai's accuracy, as a function metric."""
    return (inp.argmax(dim=-1) == targ).float().mean()


def main(out: Path) -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    train, valid = make_data(N_TRAIN), make_data(N_VALID, seed=1)
    dls = DataLoaders(
        DataLoader(train, batch_size=PER_RANK_BS),
        DataLoader(valid, batch_size=PER_RANK_BS),
    )
    files = [
        CheckpointCB(out / "ck"),
        CSVLoggerCB(out / "history.csv"),
    ]  # rank 0 writes, alone
    learn = Learner(model, dls, lr=0.5, cbs=[MetricsCB(Accuracy()), *files])
    learn.fit(1)
    # A profile of 1 + 1 batches a phase (of 6 and 3 on each rank) leaves everything as it was.
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    report = learn.profile(n_batches=1, warmup=1)
    profile = {
        "counted": (report.train.n_batches, report.valid.n_batches),
        "kept": all(torch.equal(weights[k], v) for k, v in model.state_dict().items()),
        "skipped": report.skipped,
    }
    restored = learn.model is model and learn.dls is dls
    # validate/get_preds below overwrite learn.epoch_log.
    epoch_log = dict(learn.epoch_log)
    preds, targets = learn.get_preds()
    # 4/3 rows per rank, not part of the fit.
    odd = DataLoader(make_data(7, seed=2), batch_size=2)
    odd_preds, _ = learn.get_preds(odd)
    shuffled_odd_preds, _ = learn.get_preds(
        DataLoader(odd.dataset, batch_size=2, shuffle=True)
    )

    index = TensorDataset(
        torch.arange(40.0)[:, None], torch.zeros(40, dtype=torch.long)
    )
    seen = SeenIndices()
    index_dls = DataLoaders(DataLoader(index, batch_size=4, shuffle=True))
    shuffled = Learner(nn.Linear(1, 2), index_dls, cbs=[seen])
    shuffled.fit(2, valid=False)

    resumed = Learner(nn.Linear(4, 3), dls, lr=0.5, cbs=[MetricsCB(Accuracy())])
    resumed.fit(2, resume=out / "ck")  # every rank loads rank 0's checkpoint

    # Several targets per batch: (x, y, w); w is the row's index, so its order is checkable.
    x3, y3 = make_data(7, seed=3).tensors
    rows = TensorDataset(x3, y3, torch.arange(7.0))
    weighted = Learner(
        nn.Linear(4, 3),
        DataLoaders(DataLoader(rows, batch_size=2)),
        loss_func=lambda p, y, w: p.sum(),
    )
    _, (_, row_index) = weighted.get_preds(DataLoader(rows, batch_size=2))

    # Accumulation: 2 batches of 4 per rank and step = one global batch of 16; the batches that
    # do not step skip DDP's all-reduce (its flag is read in the forward pass).
    synced: list[bool] = []
    torch.manual_seed(0)
    acc_model = nn.Linear(4, 3)
    acc_dls = DataLoaders(DataLoader(train, batch_size=PER_RANK_BS // 2))
    Learner(acc_model, acc_dls, lr=0.5, cbs=[GradAccumCB(2), SyncFlags(synced)]).fit(
        1, valid=False
    )

    # An earlier run that rank 0 alone sees (as in folders that are not shared): every rank
    # refuses, rather than rank 0 alone while the others wait for it in a collective.
    alone = out / f"alone{rank()}"
    learn.save(alone / "last.pt")  # written by rank 0 only
    try:
        Learner(nn.Linear(4, 3), dls, cbs=[CheckpointCB(alone)]).fit(1)
        refused = ""
    except FileExistsError as e:
        refused = str(e)

    result = {
        "profile": profile,
        "refused": refused,
        "acc_state": acc_model.state_dict(),
        "acc_synced": synced,
        "row_index": row_index,
        "resumed_epochs_done": resumed.epochs_done,
        "resumed_state": resumed.model.state_dict(),
        "world_size": world_size(),
        "state": model.state_dict(),
        "epoch_log": epoch_log,
        "validate": learn.validate(),
        # Function metrics on shards of 8+8+7 and 8+8+6 rows, summed over both processes.
        "fn_validate": learn.validate(
            cbs=[MetricsCB(Accuracy(), accuracy, first_prob)]
        ),
        "preds": preds,
        "targets": targets,
        "odd_preds": odd_preds,
        "shuffled_odd_preds": shuffled_odd_preds,
        "restored": restored,
        "seen": seen.epochs,
    }
    torch.save(result, out / f"rank{rank()}.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
