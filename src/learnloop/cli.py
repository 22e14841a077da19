"""The `learnloop` command. `learnloop train` trains a model end to end, offline by default.

By default it trains a small CNN on the embedded handwritten digits; `--data` takes a local
parquet/arrow/image folder or a hub name instead. It shows progress and the per-epoch table,
prints the final validation accuracy, and writes `loss.png` and `model.pt` to `--out`.
`--resume auto` keeps checkpoints in `--out`/checkpoints and continues from its `last.pt` when
there is one, so the same command starts a run and restarts it after a preemption (SIGTERM or
SIGUSR1: the run saves at the next batch and exits with status 143 or 138).
It runs unchanged under `torchrun --nproc_per_node=N` (DDP; `--bs` is then per process), where
only rank 0 prints and writes files.
"""

from __future__ import annotations

import argparse
import math
import signal
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import torch
from torch import nn

from .dist import is_main_process
from .preempt import Preempted

if TYPE_CHECKING:
    from .learner import Learner

__all__ = ["build", "check_out", "checkpoints", "main", "run", "train"]


def _columns(ds: Any) -> tuple[str, str]:
    """The image column (Image or array feature) and the label column (ClassLabel) of `ds`."""
    from datasets import Array2D, Array3D, ClassLabel, Image

    image = next(
        (k for k, f in ds.features.items() if isinstance(f, (Image, Array2D, Array3D))),
        None,
    )
    label = next((k for k, f in ds.features.items() if isinstance(f, ClassLabel)), None)
    if image is None or label is None:
        raise ValueError(
            f"Need an image column and a ClassLabel column; the dataset has {dict(ds.features)}."
        )
    return image, label


def _channels_first(x: torch.Tensor) -> torch.Tensor:
    """Images as (N, C, H, W): add the channel axis of (N, H, W), move a trailing one of (N, H, W, C)."""
    if x.dim() == 3:
        return x.unsqueeze(1)
    if x.shape[-1] in (1, 3) and x.shape[1] not in (1, 3):
        return x.permute(0, 3, 1, 2)
    return x


class _ToXY:
    """Batch transform: the image column as normalised (N, C, H, W) floats, then the labels."""

    def __init__(self, image: str, label: str, norm: Any) -> None:
        self.image, self.label, self.norm = image, label, norm

    def __call__(self, b: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {
            "x": self.norm({"image": _channels_first(b[self.image])})["image"],
            "y": b[self.label],
        }


def build(
    data: str = "digits",
    model: str = "cnn",
    lr: float = 3e-3,
    bs: int = 64,
    strategy: str = "ddp",
) -> tuple[Learner, nn.Module]:
    """Load `data`, make its batched DataLoaders and `model`; return the Learner and the model.

    Under torchrun the model is trained with DDP, or sharded with FSDP2 for `strategy="fsdp"`.
    """
    from .callbacks.metrics import Accuracy, MetricsCB
    from .data.loaders import DataLoaders
    from .data.sources import load_data
    from .data.transforms import Normalize
    from .learner import Learner
    from .models import MODELS

    if model not in MODELS:
        raise ValueError(f"Unknown model {model!r}; choose one of {', '.join(MODELS)}.")
    dd = load_data(data)
    if "train" not in dd:
        raise ValueError(f"{data!r} needs a 'train' split; it has splits {list(dd)}.")
    image, label = _columns(dd["train"])
    # The batched path: images decoded once (cached), then whole batches indexed from tensors.
    dls = DataLoaders.from_dd(dd.select_columns([image, label]), bs, batched=True)
    x_train = _channels_first(dls.train.dataset.columns[image])
    to_xy = _ToXY(image, label, Normalize.from_tensor(x_train))
    for dl in (dls.train, dls.valid):
        dl.dataset.tfms.append(to_xy)
    n_classes = dd["train"].features[label].num_classes
    c, h, w = x_train.shape[1:]
    net = MODELS[model](n_in=c if model == "cnn" else c * h * w, n_out=n_classes)
    cbs: list[Any] = [MetricsCB(Accuracy())]
    if strategy == "fsdp":  # in one process it notes that it trains unsharded
        from .callbacks.distributed import DistributedCB

        cbs.append(DistributedCB(strategy="fsdp"))
    learn = Learner(net, dls, lr=lr, opt_func=torch.optim.AdamW, cbs=cbs)
    return learn, net


def run(
    learn: Learner,
    net: nn.Module,
    epochs: int,
    out: str,
    resume: str | Path | None = None,
) -> dict[str, Any]:
    """Fit for `epochs` (continuing from `resume`, see `Learner.fit`); on rank 0 print the accuracy
    and write `loss.png` and `model.pt` to `out`.

    A learner that `checkpoints` loaded with all `epochs` done (a restart after the run's end) is
    only validated, and the files written again.
    """
    if resume is not None and learn.epochs_done >= epochs:
        row = learn.validate()
        if is_main_process():
            print(
                f"nothing left to train: the checkpoint holds {learn.epochs_done} epochs "
                f"(--epochs {epochs})"
            )
    else:
        learn.fit(epochs, resume=resume)
        # Empty if the fit had no epoch left to run (it warned).
        row = dict(learn.epoch_log) or learn.validate()
    from .fsdp import full_model_state

    weights = full_model_state(
        net
    )  # sharded (FSDP): every process sends rank 0 its part
    if not is_main_process():  # under torchrun, rank 0 reports and writes the files
        return row
    print(f"final validation accuracy: {row['accuracy']:.4f}")
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    learn.recorder.plot_loss().savefig(out_dir / "loss.png", dpi=100)
    torch.save(weights, out_dir / "model.pt")
    print(f"wrote {out_dir / 'loss.png'} and {out_dir / 'model.pt'}")
    return row


def checkpoints(
    learn: Learner,
    out: str,
    resume: str | None = None,
    save_every_steps: int | None = None,
) -> str | Path | None:
    """Attach CheckpointCB(`out`/checkpoints) when `resume` or `save_every_steps` asks for checkpoints;
    return what `run` resumes from (None: a fresh start).

    `resume` is 'auto' (that folder's last.pt if there is one, else a fresh start) or a checkpoint
    file or CheckpointCB folder. The checkpoint is loaded now, so that a bad one fails before any
    training: FileNotFoundError, ValueError (see `Learner.load`), or FileExistsError for a fresh
    start over an earlier run's checkpoints.
    """
    if resume is None and save_every_steps is None:
        return None
    from .callbacks.tracking import CheckpointCB
    from .checkpoint import latest_checkpoint
    from .runs import earlier_checkpoints

    folder = Path(out) / "checkpoints"
    learn.add_cbs(CheckpointCB(folder, every_steps=save_every_steps))
    if resume == "auto":
        file = latest_checkpoint(folder)
    elif resume is not None:
        file = _resume_file(resume)
    else:
        file = None
    if file is None:
        found = earlier_checkpoints(folder, set())
        if found:
            fix = (
                "pass --resume auto to continue it, or another --out"
                if resume is None
                else "remove it or pass another --out"
            )
            raise FileExistsError(
                f"{folder} holds an earlier run ({found}) that a fresh start would overwrite: "
                f"{fix}"
            )
        return None
    learn.load(file)
    # The fit decides again (under torchrun, rank 0 for all) and loads it once more.
    return "auto" if resume == "auto" else file


def check_out(out: str) -> Path:
    """Make the folder `out` and prove it takes files, before any training is spent on it.

    Raises NotADirectoryError (a file is in the way) or PermissionError/OSError (cannot write).
    """
    folder = Path(out)
    if folder.exists() and not folder.is_dir():
        raise NotADirectoryError(
            f"--out {out} is a file, not a folder: pass a folder for loss.png and model.pt."
        )
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise type(e)(
            e.errno,
            f"cannot write to --out {out} ({e.strerror}): pass a writable folder",
        ) from e
    return folder


def _resume_file(resume: str) -> Path:
    """The checkpoint file `--resume PATH` names (a CheckpointCB folder: its last.pt)."""
    from .checkpoint import checkpoint_path

    try:
        return checkpoint_path(resume)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"--resume {resume}: {e}") from None


def train(
    data: str = "digits",
    model: str = "cnn",
    epochs: int = 10,
    lr: float = 3e-3,
    bs: int = 64,
    out: str = "learnloop-run",
    threads: int | None = 1,
    seed: int = 0,
    resume: str | None = None,
    save_every_steps: int | None = None,
    strategy: str = "ddp",
) -> dict[str, Any]:
    """Train `model` on `data`; write `loss.png` and `model.pt` to `out`; return the last epoch's row.

    `resume`, `save_every_steps` and `strategy` are the command's `--resume`,
    `--save-every-steps` (see `checkpoints`) and `--strategy`; a preemption signal raises
    `Preempted`.
    """
    if is_main_process():  # the one process that writes there
        check_out(out)
    _setup(threads, seed)
    learn, net = build(data, model, lr, bs, strategy)
    start = checkpoints(learn, out, resume, save_every_steps)
    return run(learn, net, epochs, out, start)


def _setup(threads: int | None, seed: int) -> None:
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (`learnloop: error: ...`) and exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"learnloop: error: {message} (see {self.prog} --help)\n")


def _check_args(args: argparse.Namespace) -> str | None:
    """The first bad value among the numeric options, as a message; None if all are fine."""
    if args.epochs < 1:
        return f"--epochs must be at least 1, got {args.epochs}"
    if args.bs < 1:
        return f"--bs must be at least 1, got {args.bs}"
    if not (math.isfinite(args.lr) and args.lr > 0):
        return f"--lr must be a finite number > 0, got {args.lr}"
    if args.threads < 0:
        return f"--threads must be 0 (torch's default) or more, got {args.threads}"
    if args.save_every_steps is not None and args.save_every_steps < 1:
        return f"--save-every-steps must be at least 1, got {args.save_every_steps}"
    return None


def _stopped(e: Preempted, args: argparse.Namespace) -> str:
    """The one line that says a preemption signal stopped the run, and how to continue it."""
    name = signal.Signals(e.signum).name
    if e.checkpoint is None:
        return (
            f"learnloop: stopped by {name} at {e.where}; nothing was saved (--resume auto "
            f"keeps checkpoints in {Path(args.out) / 'checkpoints'})"
        )
    again = (
        "run the same command"
        if args.resume == "auto"
        else "run it again with --resume auto"
    )
    return f"learnloop: stopped by {name} at {e.where}; saved {e.checkpoint}: {again} to continue"


def export(checkpoint: str, out: str) -> int:
    """`learnloop export`: the model weights of `checkpoint` as one plain state dict at `out`."""
    from .sharded import export_model

    try:
        path = export_model(checkpoint, out)
    except (ValueError, OSError) as e:
        print(f"learnloop: error: {e}", file=sys.stderr)
        return 2
    weights = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    size = sum(t.numel() * t.element_size() for t in weights.values())
    print(
        f"wrote {path}: {len(weights)} tensors, {size / 2**20:.1f} MB; load it with "
        "model.load_state_dict(torch.load(path, weights_only=True))"
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `learnloop` command."""
    parser = _Parser(prog="learnloop", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    t = sub.add_parser("train", help="train a model end to end (offline by default)")
    t.add_argument(
        "--data",
        default="digits",
        help="'digits' (embedded), a local path, or a hub dataset name",
    )
    t.add_argument("--model", default="cnn", choices=["cnn", "mlp", "linear"])
    t.add_argument("--epochs", type=int, default=10)
    t.add_argument("--lr", type=float, default=3e-3)
    t.add_argument("--bs", type=int, default=64, help="batch size")
    t.add_argument(
        "--out", default="learnloop-run", help="folder for loss.png and model.pt"
    )
    t.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads (0: torch's default)"
    )
    t.add_argument("--seed", type=int, default=0)
    t.add_argument(
        "--resume",
        metavar="auto|PATH",
        help="'auto': keep checkpoints in OUT/checkpoints and continue from its last.pt if "
        "there is one (the same command starts and restarts a run); PATH: continue from that "
        "checkpoint file or folder",
    )
    t.add_argument(
        "--save-every-steps",
        type=int,
        metavar="N",
        help="write OUT/checkpoints/last.pt every N training batches too (checkpoints go "
        "there every epoch once this or --resume is given)",
    )
    t.add_argument(
        "--strategy",
        default="ddp",
        choices=["ddp", "fsdp"],
        help="under torchrun: a whole model per process (ddp) or the model sharded across "
        "processes (fsdp; checkpoints are then sharded folders)",
    )
    e = sub.add_parser(
        "export",
        help="write a checkpoint's model weights (a sharded folder or a file) as one model.pt",
    )
    e.add_argument(
        "checkpoint", help="a checkpoint file, sharded folder, or CheckpointCB folder"
    )
    e.add_argument(
        "out", nargs="?", default="model.pt", help="the file to write (model.pt)"
    )
    args = parser.parse_args(argv)
    if args.command == "export":
        return export(args.checkpoint, args.out)
    problem = _check_args(args)
    if problem:
        t.error(problem)
    # Bad input gets one line; an error inside the fit keeps its traceback and notes.
    try:
        if (
            is_main_process()
        ):  # before the data is loaded, long before the files are written
            check_out(args.out)
        if args.resume not in (None, "auto"):
            _resume_file(args.resume)  # before the data is loaded too
        _setup(args.threads or None, args.seed)
        learn, net = build(args.data, args.model, args.lr, args.bs, args.strategy)
        start = checkpoints(learn, args.out, args.resume, args.save_every_steps)
    except (ValueError, KeyError, OSError) as e:
        print(
            f"learnloop: error: {e.args[0] if isinstance(e, KeyError) else e}",
            file=sys.stderr,
        )
        return 2
    try:
        run(learn, net, args.epochs, args.out, start)
    except Preempted as e:
        if is_main_process():
            print(_stopped(e, args), file=sys.stderr)
        return int(e.code)  # 128 + the signal, as if it had ended the process
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
