"""Atomic `torch.save`: the target is the old file or the new one, whole, whatever happens meanwhile.

`atomic_save` writes a temporary file beside the target, flushes and fsyncs it, then renames it
over the target. What it guarantees:

- A crash, an error or a full disk mid-write leaves the target untouched and removes the
  temporary file. A full disk raises OSError (errno ENOSPC kept) naming the file, about how many
  bytes it needed and how many are free.
- Ctrl-C while writing (main thread) is held until the write is over; the half-written file is
  then removed, the target left as it was, and the signal delivered: the usual KeyboardInterrupt,
  not the RuntimeError torch's C++ writer makes of one raised inside its write callback.
- Temporary files that a killed process left behind are removed by the next write in that folder:
  they are named `.<target>.<pid>-<8 hex>.tmp`, and one goes once its writer's pid is gone from
  this machine and it was not modified for `STALE_AFTER_S` (files of a writer on another host
  sharing the folder keep changing while it writes). Older learnloop versions named them
  `.<target>.<8 hex>.tmp`, without the pid: those go after `STALE_AFTER_S` alone. No other file
  is touched.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import shutil
import signal
import time
import uuid
from pathlib import Path
from typing import Any, BinaryIO

import torch

from .signals import HeldSignals, defer_signals
from .types import PathLike

__all__ = ["STALE_AFTER_S", "atomic_save"]

log = logging.getLogger(__name__)

#: Seconds a dead writer's temporary file must sit unmodified before a later write removes it.
STALE_AFTER_S = 60.0
# Held while writing: Ctrl-C and the preemption signals (see `learnloop.preempt`).
_HELD_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)
_TEMP = re.compile(r"\.(?P<target>.+)\.(?P<pid>[1-9][0-9]{0,9})-[0-9a-f]{8}\.tmp")
# Names from before the pid was added; disjoint from _TEMP ('-' is not a hex digit).
_LEGACY_TEMP = re.compile(r"\.(?P<target>.+)\.[0-9a-f]{8}\.tmp")
_DISK_FULL = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}


class _Interrupted(BaseException):
    """A held signal arrived: stop writing a file that will be thrown away."""


def atomic_save(obj: Any, path: PathLike) -> Path:
    """`torch.save(obj)` to `path` so that a crash at any point leaves the old `path` untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(path.parent)
    with defer_signals(_HELD_SIGNALS) as held:
        written = _attempt(obj, path, held)
    if not written:
        # A held signal went to a handler that returned instead of raising: the program goes
        # on, and so does the save it asked for. Signals are held again, but this write is not
        # stopped by them (a stream of signals could stop every one).
        with defer_signals(_HELD_SIGNALS):
            _attempt(obj, path, None)
    _fsync_dir(path.parent)  # make the rename itself survive a power cut
    return path


def _temp_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")


def _open_temp(tmp: Path) -> BinaryIO:
    """Create the temporary file (a seam: tests point it at /dev/full)."""
    return open(tmp, "xb")


def _attempt(obj: Any, path: Path, held: HeldSignals | None) -> bool:
    """Write `obj` to a temporary file and rename it to `path`; False if a signal in `held` stopped it."""
    tmp = _temp_path(path)
    try:
        _write(obj, tmp, held)
        if held:
            raise _Interrupted
        os.replace(tmp, path)
    except _Interrupted:
        tmp.unlink(missing_ok=True)
        return False
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError) and e.errno in _DISK_FULL:
            raise _disk_full(e, obj, path) from e
        raise
    return True


def _write(obj: Any, tmp: Path, held: HeldSignals | None) -> None:
    f = _open_temp(tmp)
    try:
        out = _Watched(f, held)
        try:
            torch.save(obj, out)
        except BaseException:
            # torch's C++ writer turns an error of our write into a RuntimeError: raise the original.
            if out.error is not None:
                raise out.error from None
            raise
        f.flush()
        os.fsync(f.fileno())
    except BaseException:
        try:
            f.close()
        except OSError:
            pass  # its buffer could not be written either; the file is removed next
        raise
    f.close()


class _Watched:
    """The temporary file as torch.save sees it: keeps the first error, stops once a signal is held."""

    def __init__(self, f: BinaryIO, held: HeldSignals | None) -> None:
        self.f, self.held = f, held
        self.error: BaseException | None = None

    def write(self, data: Any) -> int:
        return self._call(self.f.write, data)

    def flush(self) -> None:
        self._call(self.f.flush)

    def _call(self, fn: Any, *args: Any) -> Any:
        try:
            if self.held:
                raise _Interrupted
            return fn(*args)
        except BaseException as e:
            if self.error is None:
                self.error = e
            raise


def _disk_full(e: OSError, obj: Any, path: Path) -> OSError:
    """The OSError for a full disk: what the file needs, what is free, and that the old file is intact."""
    try:
        free = f"{_size(shutil.disk_usage(path.parent).free)} free"
    except OSError:
        free = "free space unknown"
    before = (
        f"the previous {path.name} is intact"
        if path.exists()
        else f"no {path.name} was written"
    )
    return OSError(
        e.errno,
        f"Cannot write {path}: {os.strerror(e.errno or errno.ENOSPC)}. It needs about "
        f"{_size(_nbytes(obj))} and {path.parent} has {free}; {before}. Free some space or "
        "save elsewhere.",
    )


def _nbytes(obj: Any) -> int:
    """Bytes of the tensor storages in `obj` (each counted once): about what torch.save writes."""
    seen: set[tuple[str, int]] = set()
    total = 0
    stack = [obj]
    while stack:
        x = stack.pop()
        if isinstance(x, torch.Tensor):
            storage = x.untyped_storage()
            key = (str(x.device), storage.data_ptr())
            if key not in seen:
                seen.add(key)
                total += storage.nbytes()
        elif isinstance(x, dict):
            stack.extend(x.values())
        elif isinstance(x, (list, tuple, set)):
            stack.extend(x)
    return total


def _size(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} bytes"


def _fsync_dir(folder: Path) -> None:
    # Windows cannot open a folder; its rename is already durable enough.
    if os.name != "posix":
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ---------------------------------------------------------------- stale temporary files
def _remove_stale_temps(folder: Path) -> None:
    """Remove temporary files of dead writers in `folder` (see the module docstring)."""
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return
    now = time.time()
    for entry in entries:
        match = _TEMP.fullmatch(entry.name)
        if match is None and _LEGACY_TEMP.fullmatch(entry.name) is None:
            continue
        try:
            if not entry.is_file(follow_symlinks=False):
                continue
            idle = now - entry.stat(follow_symlinks=False).st_mtime
        except OSError:
            continue
        if idle < STALE_AFTER_S or (match and _pid_alive(int(match["pid"]))):
            continue
        try:
            os.unlink(entry.path)
        except OSError:  # another writer removed it first, or it is not ours to remove
            continue
        log.info(
            "Removed %s, a temporary file left by a learnloop process that ended mid-write.",
            entry.path,
        )


def _pid_alive(pid: int) -> bool:
    """Whether process `pid` runs on this machine; True when that cannot be told."""
    if os.name != "posix":
        return True  # os.kill would terminate it on Windows
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (OSError, OverflowError):
        return True  # someone else's process (EPERM), or no such pid to ask about
    return True
