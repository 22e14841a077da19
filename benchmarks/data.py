"""Time one epoch of loading 28x28 images, per path, and print a table (no model: loading only).

    python benchmarks/data.py --data /work/shared/data/fashion_mnist

Paths: per-item PIL transform (`with_transform`), per-item torch format (`with_format('torch')`),
the batched path (`DataLoaders.from_dd(..., batched=True)`: its first epoch pays the one-time
decode; a second run loads the decoded cache), and in-memory tensors: a `TensorDataset` in a
DataLoader (the usual plain-PyTorch way), and a hand-written loop slicing batches (the floor).
The first run decodes into a fresh temporary cache, so it never profits from an earlier run.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

from learnloop.data import DataLoaders, collate_dict, inplace, load_local

DEFAULT = (
    Path(__file__).resolve().parents[1].parent / "shared" / "data" / "fashion_mnist"
)


def epoch_time(dl: Iterable[Any]) -> float:
    """Seconds to iterate `dl` once."""
    start = time.perf_counter()
    for _ in dl:
        pass
    return time.perf_counter() - start


def manual_epoch(x: torch.Tensor, y: torch.Tensor, bs: int) -> float:
    """Seconds for a hand-written shuffled pass: a permutation, then index_select per batch."""
    start = time.perf_counter()
    perm = torch.randperm(len(x))
    for i in range(0, len(x), bs):
        idx = perm[i : i + bs]
        x.index_select(0, idx), y.index_select(0, idx)
    return time.perf_counter() - start


def timed(f: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    out = f()
    return time.perf_counter() - start, out


@inplace
def pil_to_tensor(b: dict[str, list[Any]]) -> None:
    """The per-item PIL path: decode each PNG with PIL, then to a (1, H, W) uint8 tensor."""
    b["image"] = [
        torch.from_numpy(np.array(im, dtype=np.uint8))[None] for im in b["image"]
    ]


def run(
    data: str, bs: int, epochs: int, num_proc: int | None, limit: int | None
) -> tuple[list[tuple[str, float]], int]:
    """Seconds per epoch (or per step) of each path, as (name, seconds) rows, and the train size."""
    with tempfile.TemporaryDirectory() as cache:
        dd = load_local(data, cache_dir=cache)
        if limit:
            dd = type(dd)(
                {
                    k: v.select(range(min(limit, len(v)))).flatten_indices()
                    for k, v in dd.items()
                }
            )
        train = dd["train"]
        rows = []
        pil = train.with_transform(pil_to_tensor)
        rows.append(
            (
                "per-item PIL transform",
                epoch_time(
                    DataLoader(pil, bs, shuffle=True, collate_fn=collate_dict(train))
                ),
            )
        )
        fmt = train.with_format("torch")
        rows.append(
            (
                "per-item torch format",
                epoch_time(
                    DataLoader(fmt, bs, shuffle=True, collate_fn=collate_dict(train))
                ),
            )
        )
        decode, dls = timed(
            lambda: DataLoaders.from_dd(dd, bs, batched=True, num_proc=num_proc)
        )
        first = epoch_time(dls.train)
        rows.append(
            (
                f"batched: one-time decode of train+test (num_proc={num_proc or 1})",
                decode,
            )
        )
        rows.append(("batched: first epoch incl. decode", decode + first))
        reload, dls = timed(lambda: DataLoaders.from_dd(dd, bs, batched=True))
        rows.append(("batched: second run, load decoded cache", reload))
        rows.append(
            ("batched: later epochs", min(epoch_time(dls.train) for _ in range(epochs)))
        )
        x, y = dls.train.dataset.columns.values()
        tensors = DataLoader(TensorDataset(x, y), bs, shuffle=True)
        rows.append(
            (
                "in-memory tensors (TensorDataset)",
                min(epoch_time(tensors) for _ in range(epochs)),
            )
        )
        rows.append(
            (
                "in-memory tensors, hand-written batch slicing",
                min(manual_epoch(x, y, bs) for _ in range(epochs)),
            )
        )
        return rows, len(train)


def table(rows: list[tuple[str, float]], n: int) -> str:
    """The rows as a Markdown table, with ratios against in-memory tensors and per-item PIL."""
    times = dict(rows)
    base, pil = (
        times["in-memory tensors (TensorDataset)"],
        times["per-item PIL transform"],
    )
    lines = [
        f"| path ({n:,} images) | seconds | images/s | vs in-memory | PIL / this |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, t in rows:
        per_epoch = (
            "epoch" in name
            or "per-item" in name
            or "in-memory" in name
            or "hand-written" in name
        )
        rest = (
            f"{n / t:,.0f} | {t / base:.2f}x | {pil / t:.1f}x"
            if per_epoch
            else "- | - | -"
        )
        lines.append(f"| {name} | {t:.2f} | {rest} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--data",
        default=str(DEFAULT),
        help="Fashion-MNIST parquet folder (or any image dataset)",
    )
    parser.add_argument("--bs", type=int, default=64)
    parser.add_argument(
        "--epochs",
        type=int,
        default=3,
        help="epochs timed for the steady paths (best kept)",
    )
    parser.add_argument(
        "--num-proc", type=int, default=None, help="processes for the one-time decode"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (as in DataLoader workers)",
    )
    parser.add_argument(
        "--limit",
        type=int,
        default=None,
        help="use only the first N rows of each split",
    )
    args = parser.parse_args(argv)
    if not Path(args.data).exists():
        parser.error(
            f"--data {args.data} does not exist; pass the Fashion-MNIST parquet folder"
        )
    torch.set_num_threads(args.threads)
    rows, n = run(args.data, args.bs, args.epochs, args.num_proc, args.limit)
    print(table(rows, n))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
