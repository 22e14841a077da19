"""The `learnloop` command. `learnloop train` trains a model end to end, offline by default.

By default it trains a small CNN on the embedded handwritten digits; `--data` takes a local
parquet/arrow/image folder or a hub name instead. It shows progress and the per-epoch table,
prints the final validation accuracy, and writes `loss.png` and `model.pt` to `--out`.
It runs unchanged under `torchrun --nproc_per_node=N` (DDP; `--bs` is then per process), where
only rank 0 prints and writes files.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

__all__ = ["main", "train"]


def _columns(ds: Any) -> tuple[str, str]:
    """The image column (Image or array feature) and the label column (ClassLabel) of `ds`."""
    from datasets import Array2D, Array3D, ClassLabel, Image

    image = next((k for k, f in ds.features.items() if isinstance(f, (Image, Array2D, Array3D))), None)
    label = next((k for k, f in ds.features.items() if isinstance(f, ClassLabel)), None)
    if image is None or label is None:
        raise ValueError(
            f"Need an image column and a ClassLabel column; the dataset has {dict(ds.features)}."
        )
    return image, label


def _tensors(ds: Any) -> tuple[torch.Tensor, torch.Tensor]:
    image, label = _columns(ds)
    cols = ds.with_format("torch", columns=[image, label])[:]
    x = cols[image]
    if x.dim() == 3:  # (N, H, W) -> (N, 1, H, W)
        x = x.unsqueeze(1)
    if x.shape[-1] in (1, 3) and x.shape[1] not in (1, 3):  # channels last -> first
        x = x.permute(0, 3, 1, 2)
    return x.float(), cols[label].long()


def train(
    data: str = "digits", model: str = "cnn", epochs: int = 10, lr: float = 3e-3, bs: int = 64,
    out: str = "learnloop-run", threads: int | None = 1, seed: int = 0,
) -> dict[str, Any]:
    """Train `model` on `data`; write `loss.png` and `model.pt` to `out`; return the last epoch's row."""
    from torch.utils.data import DataLoader, TensorDataset

    from .callbacks.distributed import is_main_process
    from .callbacks.metrics import Accuracy, MetricsCB
    from .data.loaders import DataLoaders
    from .data.sources import load_data
    from .learner import Learner
    from .models import MODELS

    if model not in MODELS:
        raise ValueError(f"Unknown model {model!r}; choose one of {', '.join(MODELS)}.")
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    dd = load_data(data)
    valid_name = next((s for s in ("validation", "valid", "test") if s in dd), None)
    if "train" not in dd or valid_name is None:
        raise ValueError(f"{data!r} needs a 'train' split and a 'validation' or 'test' split; it has {list(dd)}.")
    x_train, y_train = _tensors(dd["train"])
    x_valid, y_valid = _tensors(dd[valid_name])
    scale = 16.0 if float(x_train.max()) <= 16 else 255.0
    mean, std = (x_train / scale).mean(), (x_train / scale).std()
    x_train, x_valid = (x_train / scale - mean) / std, (x_valid / scale - mean) / std
    n_classes = dd["train"].features[_columns(dd["train"])[1]].num_classes
    c, h, w = x_train.shape[1:]
    net = MODELS[model](n_in=c if model == "cnn" else c * h * w, n_out=n_classes)
    dls = DataLoaders(
        DataLoader(TensorDataset(x_train, y_train), batch_size=bs, shuffle=True),
        DataLoader(TensorDataset(x_valid, y_valid), batch_size=bs * 2),
    )
    learn = Learner(net, dls, lr=lr, opt_func=torch.optim.AdamW, cbs=[MetricsCB(Accuracy())])
    learn.fit(epochs)
    row = dict(learn.epoch_log)
    if not is_main_process():  # under torchrun, rank 0 reports and writes the files
        return row
    print(f"final validation accuracy: {row['accuracy']:.4f}")
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    learn.recorder.plot_loss().savefig(out_dir / "loss.png", dpi=100)
    torch.save(net.state_dict(), out_dir / "model.pt")
    print(f"wrote {out_dir / 'loss.png'} and {out_dir / 'model.pt'}")
    return row


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `learnloop` command."""
    parser = argparse.ArgumentParser(prog="learnloop", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train a model end to end (offline by default)")
    t.add_argument("--data", default="digits", help="'digits' (embedded), a local path, or a hub dataset name")
    t.add_argument("--model", default="cnn", choices=["cnn", "mlp", "linear"])
    t.add_argument("--epochs", type=int, default=10)
    t.add_argument("--lr", type=float, default=3e-3)
    t.add_argument("--bs", type=int, default=64, help="batch size")
    t.add_argument("--out", default="learnloop-run", help="folder for loss.png and model.pt")
    t.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: torch's default)")
    t.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.epochs < 1 or args.bs < 1 or args.lr <= 0:
        parser.error("--epochs and --bs must be at least 1 and --lr positive")
    try:
        train(args.data, args.model, args.epochs, args.lr, args.bs, args.out, args.threads or None, args.seed)
    except (ValueError, FileNotFoundError) as e:
        print(f"learnloop: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
