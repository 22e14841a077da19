"""Loop overhead: the Learner (default callbacks on) against a hand-written loop doing the same work.

    python benchmarks/overhead.py            # all three workloads
    python benchmarks/overhead.py --rounds 9 --batches 200 --threads 1

Both loops train one epoch and validate on the same pre-batched Fashion-MNIST-shaped synthetic
tensors (the data path is measured in benchmarks/data.py), with SGD, tracking the batch-size-weighted
train and valid loss on the device and reading them once per epoch. The Learner runs with its
defaults: DeviceCB, MetricsCB, Recorder and ProgressCB, its bars forced on and written to a null
stream. Both train the same module with the same optimizer, alternating in one process (which
goes first alternates too); we report the medians and their ratio.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

from learnloop import DataLoaders, Learner, ProgressCB
from learnloop.models import linear, mlp, simple_cnn

WORKLOADS = {  # name: (model factory, batch size, input shape, share of --batches, target ratio)
    "linear-784-10-bs64": (lambda: linear(784, 10), 64, (784,), 1.0, 1.04),
    "mlp-784-50-10-bs256": (lambda: mlp(784, 10, 50), 256, (784,), 1.0, 1.02),
    # ~0.1 s a batch on one core.
    "cnn-bs256": (
        lambda: simple_cnn(1, 10),
        256,
        (1, 28, 28),
        0.1,
        1.05,
    ),
}


def batches(
    n: int, bs: int, shape: tuple[int, ...], seed: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(bs, *shape, generator=g), torch.randint(0, 10, (bs,), generator=g))
        for _ in range(n)
    ]


def _mean(losses: list[torch.Tensor], counts: list[int]) -> float:
    counts_t = torch.tensor(counts, dtype=torch.float32)
    # The epoch's one host sync.
    return float((torch.stack(losses) * counts_t).sum() / counts_t.sum())


def hand_epoch(
    model: nn.Module, opt: torch.optim.Optimizer, train: list, valid: list
) -> tuple[float, float]:
    """What a careful hand-written loop does: no per-batch .item(), one sync per phase."""
    model.train()
    losses, counts = [], []
    for x, y in train:
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.detach())
        counts.append(len(y))
    train_loss = _mean(losses, counts)
    model.eval()
    losses, counts = [], []
    with torch.no_grad():
        for x, y in valid:
            losses.append(F.cross_entropy(model(x), y))
            counts.append(len(y))
    model.train()
    return train_loss, _mean(losses, counts)


def run(name: str, rounds: int, n_batches: int) -> tuple[float, float, float]:
    factory, bs, shape, share, _ = WORKLOADS[name]
    n_batches = max(5, int(n_batches * share))
    train, valid = (
        batches(n_batches, bs, shape, 0),
        batches(max(1, n_batches // 5), bs, shape, 1),
    )
    torch.manual_seed(0)
    null = open(os.devnull, "w")  # noqa: SIM115 - closed below; the Learner writes to it across fits
    learn = Learner(
        factory(),
        DataLoaders(train, valid),
        lr=0.01,
        cbs=[ProgressCB(file=null, bar=True)],
    )
    learn.fit(1)  # warm-up; creates learn.opt
    # The hand-written loop trains the same module with the same optimizer, so both read and write
    # the same memory; which one goes first alternates from round to round.
    hand_times, learn_times = [], []
    for i in range(rounds):
        for which in ("hand", "learner") if i % 2 == 0 else ("learner", "hand"):
            t = time.perf_counter()
            if which == "hand":
                hand_epoch(learn.model, learn.opt, train, valid)
            else:
                learn.fit(1)
            (hand_times if which == "hand" else learn_times).append(
                time.perf_counter() - t
            )
    null.close()
    hand, lrn = statistics.median(hand_times), statistics.median(learn_times)
    return hand, lrn, lrn / hand


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument(
        "--batches",
        type=int,
        default=200,
        help="training batches per epoch (CNN: a tenth)",
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--only", choices=list(WORKLOADS), help="run one workload")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(
        f"torch {torch.__version__}, {args.threads} thread(s), {args.rounds} rounds, "
        f"{args.batches} train + {args.batches // 5} valid batches per epoch (CNN: a tenth)"
    )
    print(
        f"{'workload':<22} {'hand (s)':>9} {'learner (s)':>12} {'ratio':>7} {'target':>7}"
    )
    for name in [args.only] if args.only else WORKLOADS:
        hand, lrn, ratio = run(name, args.rounds, args.batches)
        target = WORKLOADS[name][4]
        flag = "ok" if ratio <= target else "OVER"
        print(
            f"{name:<22} {hand:>9.4f} {lrn:>12.4f} {ratio:>7.3f} {'<=' + str(target):>7} {flag}"
        )


if __name__ == "__main__":
    main()
