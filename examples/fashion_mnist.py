"""Fashion-MNIST with a small CNN: the fast.ai course's classic run, a few minutes on 2 CPU cores.

    python examples/fashion_mnist.py --data ../shared/data/fashion_mnist   # a local parquet copy
    python examples/fashion_mnist.py                                       # from the hub (online)

Images are decoded once into the Hugging Face cache and served a batch at a time
(`DataLoaders.from_dd(..., batched=True)`); training follows the one-cycle schedule. Prints the
per-epoch table and the final accuracy, and writes the loss plot to `--out`.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import torch

from learnloop import Accuracy, Learner, MetricsCB, ProgressCB, is_main_process
from learnloop.data import DataLoaders, Normalize, load_data
from learnloop.models import simple_cnn


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--data",
        default="zalando-datasets/fashion_mnist",
        help="hub name or local folder",
    )
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--bs", type=int, default=128, help="batch size")
    parser.add_argument("--lr", type=float, default=1e-2, help="peak learning rate")
    parser.add_argument(
        "--limit",
        type=int,
        default=None,
        help="use only the first N rows of each split",
    )
    parser.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: torch's)"
    )
    parser.add_argument(
        "--out", default="fashion_mnist_loss.png", help="where to write the loss plot"
    )
    parser.add_argument("--seed", type=int, default=42)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> float:
    """Train and return the final validation accuracy."""
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    dd = load_data(args.data)
    if args.limit:
        dd = type(dd)(
            {
                name: split.select(range(min(args.limit, len(split))))
                for name, split in dd.items()
            }
        )
    # Decoded once (cached); normalised with the per-channel stats of the uint8 training images.
    dls = DataLoaders.from_dd(dd, args.bs, batched=True)
    images = dls.train.dataset.columns["image"]
    norm = Normalize.from_tensor(images)
    for dl in (dls.train, dls.valid):
        dl.dataset.tfms.append(norm)
    n_classes = dd["train"].features["label"].num_classes
    model = simple_cnn(n_in=images.shape[1], n_out=n_classes, widths=(8, 16, 32, 64))
    learn = Learner(
        model,
        dls,
        opt_func=torch.optim.AdamW,
        cbs=[MetricsCB(Accuracy()), ProgressCB()],
    )
    learn.fit_one_cycle(args.epochs, lr_max=args.lr)
    accuracy = learn.epoch_log["accuracy"]
    if is_main_process():  # under torchrun, rank 0 alone reports and writes
        print(f"final validation accuracy: {accuracy:.4f}")
        learn.recorder.plot_loss().savefig(args.out, dpi=80)
        print(f"wrote {args.out}")
    return accuracy


if __name__ == "__main__":
    main()
