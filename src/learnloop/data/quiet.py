"""`import_datasets()`: the first import of Hugging Face `datasets`, without tqdm's ipywidgets warning.

`datasets` imports `tqdm.auto`, which in a Jupyter kernel without ipywidgets warns "IProgress not
found. Please update jupyter and ipywidgets" and falls back to text bars. learnloop needs no
ipywidgets (its own bars are drawn without them), so a default install must not greet a notebook
user with that warning in the first cell that loads data. Every module here that imports
`datasets` calls this first; once imported, `datasets` and `tqdm.auto` are cached and quiet.
"""

from __future__ import annotations

import sys
import warnings
from types import ModuleType

__all__ = ["import_datasets"]


def import_datasets() -> ModuleType:
    """The `datasets` module, imported with tqdm's "IProgress not found" warning silenced."""
    module = sys.modules.get("datasets")
    if module is not None:
        return module
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="IProgress not found")
        import datasets
    return datasets
