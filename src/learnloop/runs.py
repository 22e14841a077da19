"""Earlier runs: what a checkpoint folder or a CSV history already holds, so a fresh fit refuses
to overwrite it.

A fresh fit that wrote into the folder of an earlier run would silently replace its `best.pt`,
`last.pt` and history (8 epochs replaced by 1 is how it was found). CheckpointCB and CSVLoggerCB
ask `earlier_checkpoints` / `earlier_rows` at `before_fit` and refuse through `refuse_earlier_run`,
which every process calls, so that under torchrun all ranks stop together.
"""

from __future__ import annotations

import csv
import datetime
from pathlib import Path

import torch

from .dist import any_process
from .sharded import LEARNER_FILE, sharded_folders

__all__ = ["earlier_checkpoints", "earlier_rows", "refuse_earlier_run"]


def _when(path: Path) -> str:
    stamp = datetime.datetime.fromtimestamp(path.stat().st_mtime)
    return stamp.strftime("%Y-%m-%d %H:%M")


def _checkpoint_summary(path: Path) -> str:
    """'8 epochs done, best valid_loss 0.231' from the file, read lazily (mmap: no tensor is read)."""
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        done = f"{int(ck['epochs_done'])} epochs done"
        best = (ck.get("callbacks") or {}).get("CheckpointCB", {}).get("best")
    # A damaged file still belongs to someone: it is described, not skipped.
    except (OSError, RuntimeError, EOFError, KeyError, TypeError, ValueError) as e:
        return f"unreadable ({type(e).__name__})"
    return done if best is None else f"{done}, best value {float(best):.6g}"


def earlier_checkpoints(folder: Path, own: set[Path]) -> str | None:
    """What `folder` holds of CheckpointCB's files that were not written by this callback (`own`), or None."""
    files = [folder / name for name in ("last.pt", "best.pt")]
    files = [p for p in files if p.is_file()]
    # FSDP's sharded checkpoints: folders, described by the learner state inside them.
    folders = (
        sharded_folders(folder, "last")[-1:] + sharded_folders(folder, "best")[-1:]
    )
    found = [
        f"{p.name} ({_checkpoint_summary(p)}, written {_when(p)})"
        for p in files
        if p.resolve() not in own
    ] + [
        f"{p.name} ({_checkpoint_summary(p / LEARNER_FILE)}, written {_when(p)})"
        for p in folders
        if p.resolve() not in own
    ]
    return "; ".join(found) or None


def earlier_rows(path: Path, own: set[Path]) -> str | None:
    """What the CSV history at `path` holds, if it was not written by this logger (`own`), or None."""
    if not path.is_file() or path.resolve() in own:
        return None
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return None  # an empty file or a bare header: nothing to lose
    epochs = [r.get("epoch", "") for r in rows]
    return (
        f"{len(rows)} rows (epochs {epochs[0]} to {epochs[-1]}), written {_when(path)}"
    )


def refuse_earlier_run(who: str, where: Path, found: str | None, ways: str) -> None:
    """Raise FileExistsError on every process if `found` (an earlier run at `where`) is set on any."""
    if not any_process(found is not None):
        return
    if found is None:  # another rank found it; its message says what
        raise FileExistsError(
            f"{who}: another process found an earlier run at its {where}; its error says "
            "what is there."
        )
    raise FileExistsError(
        f"{who}: {where} already holds an earlier run: {found}. This fresh fit would "
        f"overwrite it. {ways}"
    )
