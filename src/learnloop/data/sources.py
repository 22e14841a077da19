"""Load a `DatasetDict` from a name: the embedded digits, a local path, or a hub dataset.

Local data always loads: parquet or arrow files, a folder of them, a `save_to_disk` folder, or
an image folder (one sub-folder per class). A hub name loads when a network is there.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from .quiet import import_datasets

if TYPE_CHECKING:
    from datasets import DatasetDict

__all__ = ["load_data", "load_local"]

# File-name prefixes (or folder names) and the split each means, as the hub's own conventions.
_SPLIT_NAMES = {
    "train": "train",
    "training": "train",
    "validation": "validation",
    "valid": "validation",
    "val": "validation",
    "dev": "validation",
    "test": "test",
    "testing": "test",
}
_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


def load_data(spec: str, cache_dir: str | None = None) -> DatasetDict:
    """`'digits'` (embedded), a local path (see `load_local`), or a Hugging Face hub name.

    `cache_dir` is where `datasets` keeps its Arrow cache (default: `~/.cache/huggingface/datasets`).
    """
    import_datasets()  # quietly, the first time (see data/quiet.py)
    from datasets import load_dataset

    from .embedded import load_digits

    if spec == "digits":
        return load_digits()
    if Path(spec).exists():
        return load_local(spec, cache_dir=cache_dir)
    try:
        return load_dataset(spec, cache_dir=cache_dir)
    except Exception as e:
        raise ValueError(
            f"Could not load {spec!r}: it is not 'digits', not an existing local path, and loading it "
            f"from the Hugging Face hub failed ({type(e).__name__}: {e}). Offline, pass a local "
            "parquet/arrow file or folder, a save_to_disk folder, or an image folder."
        ) from e


def _split_of(f: Path, root: Path) -> str:
    """The split `f` belongs to: its name's prefix (`train-00000-of-00002`), else a folder's name, else train."""
    for part in [f.stem, *reversed(f.relative_to(root).parent.parts)]:
        word = part.lower().replace("-", "_").split("_")[0]
        if word in _SPLIT_NAMES:
            return _SPLIT_NAMES[word]
    return "train"


def _split_files(folder: Path, suffix: str) -> dict[str, list[str]]:
    splits: dict[str, list[str]] = {}
    for f in sorted(folder.rglob(f"*{suffix}")):
        if f.name.startswith("cache-"):  # `datasets`' own cache files, not data
            continue
        splits.setdefault(_split_of(f, folder), []).append(str(f))
    return splits


def load_local(path: str | Path, cache_dir: str | None = None) -> DatasetDict:
    """A `DatasetDict` from a local parquet/arrow file or folder, `save_to_disk` folder or image folder.

    In a folder of files (searched recursively), a file's split is its name's prefix
    (`train-00000-of-00001.parquet`, `test.parquet`, `valid.parquet` -> 'validation') or the name
    of a folder above it; files with neither go to 'train'. An image folder has one sub-folder per
    class, optionally under `train/`, `test/` ... split folders. `cache_dir` is `datasets`' cache.
    """
    import_datasets()  # quietly, the first time (see data/quiet.py)
    from datasets import DatasetDict, load_dataset, load_from_disk

    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"No such file or folder: {str(p)!r}.")
    if p.is_file():
        kind = {
            ".parquet": "parquet",
            ".arrow": "arrow",
            ".csv": "csv",
            ".json": "json",
            ".jsonl": "json",
        }
        if p.suffix.lower() not in kind:
            raise ValueError(
                f"Cannot load {p.name!r}: expected one of {', '.join(kind)} files."
            )
        return load_dataset(
            kind[p.suffix.lower()], data_files={"train": str(p)}, cache_dir=cache_dir
        )
    if (p / "dataset_dict.json").exists() or (p / "dataset_info.json").exists():
        loaded = load_from_disk(str(p))
        return loaded if isinstance(loaded, DatasetDict) else DatasetDict(train=loaded)
    for suffix, kind in ((".parquet", "parquet"), (".arrow", "arrow")):
        splits = _split_files(p, suffix)
        if splits:
            return load_dataset(kind, data_files=splits, cache_dir=cache_dir)
    if any(f.suffix.lower() in _IMAGE_SUFFIXES for f in p.rglob("*") if f.is_file()):
        return load_dataset("imagefolder", data_dir=str(p), cache_dir=cache_dir)
    raise ValueError(
        f"Found no parquet, arrow or image files in {str(p)!r}, and it is not a save_to_disk folder."
    )
