"""Where the time goes: `learn.profile()` on Fashion-MNIST, the per-item loader against the batched one.

    python examples/profile_loaders.py --data ../shared/data/fashion_mnist   # a local parquet copy
    python examples/profile_loaders.py --workers 2 --batches 100              # per item, in 2 workers

Profiles the same small CNN twice: with rows decoded from PNG one at a time (`from_dd` with a
per-item transform), then with images decoded once and served a batch at a time
(`from_dd(..., batched=True)`). Prints both reports, each ending with the line to act on, and
writes their stacked bars to `--out` (`per_item_` and `batched_` in front of the file name).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from learnloop import Learner, ProfileReport
from learnloop.data import DataLoaders, inplace, load_data
from learnloop.models import simple_cnn


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--data",
        default="zalando-datasets/fashion_mnist",
        help="hub name or local folder",
    )
    parser.add_argument("--bs", type=int, default=128, help="batch size")
    parser.add_argument(
        "--batches", type=int, default=50, help="batches profiled per phase"
    )
    parser.add_argument(
        "--workers", type=int, default=0, help="per-item loader workers"
    )
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--out", default="profile.png", help="where to write the plots")
    return parser.parse_args(argv)


@inplace
def to_tensor(batch: dict) -> None:
    """Per item: the PNG-decoded image as a float (1, H, W) tensor in [0, 1]."""
    batch["image"] = [
        torch.from_numpy(np.asarray(im, dtype=np.float32) / 255)[None]
        for im in batch["image"]
    ]


def profiled(dls: DataLoaders, args: argparse.Namespace, name: str) -> ProfileReport:
    """Profile a fresh small CNN on `dls`; print the report and save its plot."""
    torch.manual_seed(0)
    learn = Learner(
        simple_cnn(1, 10, widths=(8, 16, 32, 64)), dls, opt_func=torch.optim.AdamW
    )
    report = learn.profile(n_batches=args.batches)
    print(f"--- {name}\n{report}\n")
    out = Path(args.out)
    report.plot().savefig(out.with_name(f"{name}_{out.name}"), dpi=80)
    return report


def main(argv: Sequence[str] | None = None) -> dict[str, ProfileReport]:
    """Profile both loaders; return their reports by name."""
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    dd = load_data(args.data)
    per_item = DataLoaders.from_dd(
        dd.with_transform(to_tensor), args.bs, num_workers=args.workers
    )
    batched = DataLoaders.from_dd(dd, args.bs, batched=True)
    for dl in (
        batched.train,
        batched.valid,
    ):  # the same [0, 1] floats as the per-item path
        dl.dataset.tfms.append(lambda b: {**b, "image": b["image"].float() / 255})
    return {
        "per_item": profiled(per_item, args, "per_item"),
        "batched": profiled(batched, args, "batched"),
    }


if __name__ == "__main__":
    main()
