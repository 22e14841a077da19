"""Hugging Face `datasets` and tqdm without tqdm's ipywidgets warning in a notebook.

`datasets` (and huggingface_hub) import `tqdm.auto`, which in a Jupyter kernel without ipywidgets
warns "IProgress not found. Please update jupyter and ipywidgets" and falls back to text bars.
learnloop needs no ipywidgets (its own bars are drawn without them), so a default install must not
greet a notebook user with that warning. The warning comes once, when `tqdm.auto` is first
imported: `import learnloop` in a kernel imports it quietly (`quiet_tqdm_auto`), and so does
learnloop's first import of `datasets` (`import_datasets`). A `datasets` imported before
learnloop has warned already.
"""

from __future__ import annotations

import sys
import warnings
from types import ModuleType

__all__ = ["import_datasets", "quiet_tqdm_auto"]


def quiet_tqdm_auto() -> None:
    """Import `tqdm.auto` with its "IProgress not found" warning silenced (later imports are cached)."""
    if "tqdm.auto" in sys.modules:
        return
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="IProgress not found")
        import tqdm.auto  # noqa: F401


def import_datasets() -> ModuleType:
    """The `datasets` module, imported with tqdm's "IProgress not found" warning silenced."""
    module = sys.modules.get("datasets")
    if module is not None:
        return module
    quiet_tqdm_auto()
    import datasets

    return datasets
