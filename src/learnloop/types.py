"""Type aliases shared across the package."""

from __future__ import annotations

import os

__all__ = ["PathLike"]

#: A file or folder path: a `str` or any `os.PathLike` (e.g. `pathlib.Path`).
PathLike = str | os.PathLike[str]
