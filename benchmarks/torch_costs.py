"""What the Learner's loop pays that a hand-written loop does not, one piece at a time, in µs a call.

    python benchmarks/torch_costs.py            # each piece, and how often a fit of overhead.py pays it
    python benchmarks/torch_costs.py --number 20000

benchmarks/overhead.py measures the whole gap; this names its pieces. Some are torch's cost of a
pattern the loop must follow (grad mode and train/eval mode set per phase, a second `detach` of
the loss for the Recorder), some are ours (an event fired, the RNG states kept for a mid-epoch
checkpoint), some tqdm's (a bar redrawn). Each is timed in isolation (`timeit`, the best of
`--repeat` runs), so caches are warm: inside a loop of torch ops each costs more.
"""

from __future__ import annotations

import argparse
import os
import timeit
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from learnloop import Callback, DataLoaders, Learner
from learnloop.models import linear
from learnloop.rng import RngSnapshot


class _Listener(Callback):
    def after_loss(self, learn: Any, *args: Any, **kwargs: Any) -> None:
        pass


def pieces(
    n_train: int, n_valid: int, bar: Any
) -> list[tuple[str, str, str, dict[str, Any]]]:
    """(what, how often a fit pays it, the statement, its globals)."""
    model: nn.Module = linear(784, 10)
    x, y = torch.randn(64, 784), torch.randint(0, 10, (64,))
    w = torch.randn(10, 784, requires_grad=True)
    loss = nn.functional.cross_entropy(x @ w.t(), y)
    learn = Learner(
        model, DataLoaders([(x, y)], [(x, y)]), cbs=[_Listener()], default_cbs=False
    )
    n = n_train + n_valid

    def grad_mode() -> None:
        with torch.set_grad_enabled(True):
            pass

    g = {
        "grad_mode": grad_mode,
        "model": model,
        "loss": loss,
        "learn": learn,
        "bar": bar,
        "RngSnapshot": RngSnapshot,
        "train": [(x, y)],
    }
    return [
        (
            "torch: set_grad_enabled(True) entered and left",
            "2 a fit (1 more than by hand)",
            "grad_mode()",
            g,
        ),
        (
            "torch: model.train(True), Linear(784, 10)",
            "5 a fit (2 more than by hand)",
            "model.train(True)",
            g,
        ),
        (
            "torch: loss.detach()",
            f"{n_train + n} a fit ({n} more)",
            "loss.detach()",
            g,
        ),
        (
            "ours: an event nobody listens to",
            f"{4 * n_train + n} a fit",
            "'after_pred' in learn._table",  # the batch loop's test before it fires
            g,
        ),
        (
            "ours: an event with one (empty) hook",
            f"{3 * n} a fit",
            "learn._fire('after_loss', loss=loss)",
            g,
        ),
        (
            "ours: RNG states kept at the epoch's start",
            "1 an epoch",
            "RngSnapshot(train)",
            g,
        ),
        ("tqdm: a bar redrawn to a null stream", "about 9 a fit", "bar.refresh()", g),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--number", type=int, default=5000, help="calls per timing")
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(
        f"torch {torch.__version__}, 1 thread; best of {args.repeat} x {args.number} calls"
    )
    print(
        f"{'piece':<48} {'µs a call':>10}  paid (overhead.py's Linear fit: 200 + 40 batches)"
    )
    with open(os.devnull, "w") as null:
        bar = tqdm(total=200, file=null, mininterval=0.2, dynamic_ncols=True)
        for what, often, stmt, g in pieces(200, 40, bar):
            best = min(
                timeit.repeat(stmt, globals=g, number=args.number, repeat=args.repeat)
            )
            print(f"{what:<48} {best / args.number * 1e6:>10.2f}  {often}")
        bar.close()


if __name__ == "__main__":
    main()
