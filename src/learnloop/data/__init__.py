"""Data: DataLoaders, Hugging Face glue (per item and batched), local sources, image plots.

The plotting names (`show_image`, `subplots`, `get_grid`, `show_images`) are loaded with
matplotlib on first use (PEP 562's module `__getattr__`, for these four names alone): importing
matplotlib.pyplot costs about 0.5 s, a third of `import learnloop`, which every script and
every torchrun worker would pay. Type checkers and editors see them through the import below.
"""

from importlib import import_module
from typing import TYPE_CHECKING, Any

from .batched import BatchedDataset, batched_loader, decode_images
from .embedded import load_digits
from .hf import collate_dict, inplace
from .loaders import DataLoaders
from .sources import load_data, load_local
from .transforms import Normalize, RandomCrop, RandomFlip

if TYPE_CHECKING:
    from .plotting import get_grid, show_image, show_images, subplots

__all__ = [
    "BatchedDataset",
    "DataLoaders",
    "Normalize",
    "RandomCrop",
    "RandomFlip",
    "batched_loader",
    "collate_dict",
    "decode_images",
    "get_grid",
    "inplace",
    "load_data",
    "load_digits",
    "load_local",
    "show_image",
    "show_images",
    "subplots",
]

_PLOTTING = ("get_grid", "show_image", "show_images", "subplots")


def __getattr__(name: str) -> Any:
    """Load the plotting names (and matplotlib) on first access."""
    if name in _PLOTTING:
        return getattr(import_module(".plotting", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    """Module attributes, including the lazily loaded plotting names."""
    return sorted({*globals(), *_PLOTTING})
