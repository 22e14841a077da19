"""Data: DataLoaders, the embedded dataset and (see the Data issue) Hugging Face glue."""

from .embedded import load_digits
from .loaders import DataLoaders

__all__ = ["DataLoaders", "load_digits"]
