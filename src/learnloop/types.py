"""Type aliases shared across the package."""

from __future__ import annotations

import os
from typing import Any

__all__ = ["PathLike", "length"]

#: A file or folder path: a `str` or any `os.PathLike` (e.g. `pathlib.Path`).
PathLike = str | os.PathLike[str]


def length(obj: Any) -> int | None:
    """`len(obj)`, or None when it has no length.

    A DataLoader always has `__len__`, but over an IterableDataset without one (a streaming
    Hugging Face dataset, say) calling it raises TypeError.
    """
    try:
        return len(obj)
    except TypeError:
        return None
