"""The fast path: decode images once, keep them in the Hugging Face cache, index tensors a batch at a time.

Per-row access to a Hugging Face dataset pays Python, Arrow and PNG-decoding costs for every
image of every epoch (a 28x28 PNG takes about 100 us to decode; the model's step on it takes
less). Here, `decode_images` turns each `Image` column into a fixed-shape uint8 `(C, H, W)`
array column with one batched `Dataset.map`. `datasets` writes that result beside the
dataset's own cache files, named by fingerprint, so a second run or a second process finds it
and decodes nothing. `BatchedDataset` then reads each column once into a tensor (from the
memory-mapped Arrow buffers, one copy) and serves whole batches by tensor indexing:
a `BatchSampler` is the DataLoader's sampler and `batch_size=None`.

Why not `with_format('torch')` and `ds[indices]` per batch: on Fashion-MNIST that costs about
11 ms a batch (Arrow take and formatting), 25x slower than an in-memory `TensorDataset`.

A dataset built in memory (`Dataset.from_dict`, no cache files) has nowhere to keep a cache:
it is decoded in memory, once per process.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    Dataset,
    RandomSampler,
    SequentialSampler,
)

from .hf import returned_none
from .quiet import import_datasets

__all__ = ["BatchedDataset", "batched_loader", "decode_images"]

log = logging.getLogger(__name__)

BatchTfm = Callable[[dict[str, Tensor]], dict[str, Tensor]]


_8BIT_MODES = {"1", "L", "LA", "P", "RGB", "RGBA", "CMYK", "YCbCr"}


def as_tfm_list(tfms: Sequence[BatchTfm] | BatchTfm | None) -> list[BatchTfm]:
    """`tfms` as a list: None is empty, one transform is a list of one."""
    if tfms is None:
        return []
    return list(tfms) if isinstance(tfms, Iterable) else [tfms]


def _source(item: Mapping[str, Any]) -> Any:
    """What PIL opens for an undecoded Image value (`{'bytes', 'path'}`): its bytes, else its path."""
    return io.BytesIO(item["bytes"]) if item.get("bytes") is not None else item["path"]


def _target_mode(item: Mapping[str, Any], mode: str | None) -> str:
    """The mode every image of a column is converted to: the feature's, else the first image's (RGB for palettes)."""
    from PIL import Image

    with Image.open(_source(item)) as im:
        found = im.mode
    if mode is None and found not in _8BIT_MODES:
        raise ValueError(
            f"Images in mode {found!r} are not 8-bit: the batched path stores uint8. Set the column's mode, "
            "e.g. ds.cast_column('image', datasets.Image(mode='L')), or use the per-item path."
        )
    return mode or ("RGB" if found in ("P", "CMYK", "YCbCr") else found)


def _open(item: Mapping[str, Any], mode: str) -> np.ndarray:
    """One undecoded Image value as a `(C, H, W)` uint8 array in `mode`."""
    from PIL import Image

    with Image.open(_source(item)) as im:
        a = np.asarray(im if im.mode == mode else im.convert(mode), dtype=np.uint8)
    return a[None] if a.ndim == 2 else a.transpose(2, 0, 1)


def _decode_batch(
    batch: dict[str, list[Any]],
    indices: list[int],
    columns: list[str],
    modes: list[str],
    shapes: list[tuple[int, ...]],
) -> dict[str, np.ndarray]:
    """`Dataset.map` function: decode the image `columns` of `batch` into `(B, C, H, W)` uint8 arrays."""
    out = {}
    for col, mode, shape in zip(columns, modes, shapes):
        arr = np.empty((len(batch[col]), *shape), dtype=np.uint8)
        for j, (item, index) in enumerate(zip(batch[col], indices)):
            a = _open(item, mode)
            if a.shape != tuple(shape):
                raise ValueError(
                    f"Column {col!r}: image {index} (item {j} of its batch) has shape {a.shape} (C, H, W), "
                    f"but image 0 has {tuple(shape)}. The batched path needs one image size: resize the "
                    "images first (ds.map with PIL's resize), or use the per-item path with a transform."
                )
            arr[j] = a
        out[col] = arr
    return out


def decode_images(ds: Any, num_proc: int | None = None) -> Any:
    """`ds` with each `Image` column decoded once into a fixed-shape uint8 `Array3D` `(C, H, W)` column.

    The result is cached by `datasets` beside `ds`'s cache files, so later calls (in any process)
    load it instead of decoding; a dataset with no cache files is decoded in memory.
    """
    import_datasets()  # quietly, the first time (see data/quiet.py)
    from datasets import Array3D, Features, Image

    columns = [k for k, f in ds.features.items() if isinstance(f, Image)]
    if not columns or len(ds) == 0:
        return ds
    # map's function must see raw {'bytes', 'path'} dicts, not formatted ones.
    raw = ds.with_format(None)
    for col in columns:
        raw = raw.cast_column(col, Image(decode=False))
    first = raw[0]
    modes = [_target_mode(first[col], ds.features[col].mode) for col in columns]
    shapes = [_open(first[col], mode).shape for col, mode in zip(columns, modes)]
    features = Features(dict(raw.features))
    for col, shape in zip(columns, shapes):
        features[col] = Array3D(shape=shape, dtype="uint8")
    in_memory = not ds.cache_files
    if in_memory:
        log.info(
            "decode_images: the dataset has no cache files, so its %d images are decoded in memory.",
            len(ds),
        )
    return raw.map(
        _decode_batch,
        batched=True,
        with_indices=True,
        features=features,
        num_proc=num_proc,
        fn_kwargs={"columns": columns, "modes": modes, "shapes": shapes},
        keep_in_memory=in_memory,
        desc="learnloop: decoding images (once; cached)",
    )


def _column_tensor(ds: Any, table: Any, name: str) -> Tensor:
    """Column `name` of `table` (rows of `ds`) as one tensor, read from the Arrow buffers in one copy."""
    import pyarrow as pa

    import_datasets()  # quietly, the first time (see data/quiet.py)
    from datasets import Array2D, Array3D, Array4D, Array5D

    feature, col = ds.features[name], table.column(name)
    if (
        isinstance(feature, (Array2D, Array3D, Array4D, Array5D))
        and None not in feature.shape
    ):
        values = []
        for chunk in col.chunks:
            flat = chunk.storage if isinstance(chunk, pa.ExtensionArray) else chunk
            for _ in feature.shape:
                flat = flat.flatten()
            values.append(flat.to_numpy(zero_copy_only=False))
        data = np.concatenate(values) if values else np.empty(0, dtype=feature.dtype)
        return torch.from_numpy(data.reshape(len(table), *feature.shape))
    if (
        pa.types.is_integer(col.type)
        or pa.types.is_floating(col.type)
        or pa.types.is_boolean(col.type)
    ):
        return torch.from_numpy(col.to_numpy().copy())
    data = np.asarray(ds.with_format("numpy", columns=[name])[:][name])
    if data.dtype == object or data.dtype.kind in "USO":
        raise ValueError(
            f"Column {name!r} ({feature}) cannot be batched into a tensor: the batched path needs numeric, "
            f"array or image columns. Drop it with dd.remove_columns([{name!r}]), or use batched=False."
        )
    return torch.from_numpy(data.copy())


class BatchedDataset(Dataset):
    """Columns as tensors, indexed with a whole batch of indices at once; `tfms` run on each batch.

    `ds[[3, 1, 2]]` returns a tuple of column batches in column order, after each transform
    (a function of the batch dict `{column: tensor}` that returns it). A transform with
    `train_only = True` is skipped on the validation loader built by `DataLoaders.from_dd`.

    Example:
        >>> ds = BatchedDataset({"x": torch.arange(6.0), "y": torch.arange(6) % 2})
        >>> ds[[0, 5]]
        (tensor([0., 5.]), tensor([0, 1]))
    """

    def __init__(
        self,
        columns: Mapping[str, Tensor],
        tfms: Sequence[BatchTfm] | BatchTfm | None = None,
        features: Mapping[str, Any] | None = None,
    ) -> None:
        lengths = {name: len(t) for name, t in columns.items()}
        if len(set(lengths.values())) > 1:
            raise ValueError(
                f"BatchedDataset columns must have one length, got {lengths}."
            )
        self.columns = dict(columns)
        self.tfms = as_tfm_list(tfms)
        self.features = features
        self._len = next(iter(lengths.values()), 0)

    @classmethod
    def from_hf(
        cls,
        ds: Any,
        tfms: Sequence[BatchTfm] | BatchTfm | None = None,
        num_proc: int | None = None,
    ) -> BatchedDataset:
        """Decode `ds`'s images once (see `decode_images`) and hold its columns as tensors."""
        if ds.format.get("type") == "custom":
            raise ValueError(
                "The dataset has a with_transform function, which the batched path does not apply (it reads "
                "the stored columns): pass batch_tfms=[...] (functions of the batch dict) instead, or "
                "use batched=False."
            )
        decoded = decode_images(ds, num_proc=num_proc)
        table = decoded.with_format("arrow")[:]
        columns = {
            name: _column_tensor(decoded, table, name) for name in decoded.features
        }
        return cls(columns, tfms, features=decoded.features)

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, idx: Any) -> tuple[Tensor, ...]:
        if isinstance(idx, int):
            return tuple(t[idx] for t in self.columns.values())
        idx = torch.as_tensor(idx, dtype=torch.long)
        # index_select, not t[idx]: advanced indexing is 5-10x slower here (and far worse on busy cores).
        b = {name: t.index_select(0, idx) for name, t in self.columns.items()}
        for tfm in self.tfms:
            out = tfm(b)
            if out is None:
                raise returned_none(tfm, "in batch_tfms")
            b = out
        return tuple(b.values())

    def __repr__(self) -> str:
        cols = ", ".join(
            f"{k}: {tuple(v.shape[1:])} {str(v.dtype).removeprefix('torch.')}"
            for k, v in self.columns.items()
        )
        return f"BatchedDataset({self._len} rows; {cols})"


def _as_is(batch: Any) -> Any:
    """The DataLoader's collate_fn: the dataset already returns a whole batch (picklable for workers)."""
    return batch


def batched_loader(
    ds: Dataset,
    batch_size: int,
    shuffle: bool = False,
    drop_last: bool = False,
    **dl_kwargs: Any,
) -> DataLoader:
    """A DataLoader that asks `ds` for whole batches: a `BatchSampler` as sampler and `batch_size=None`."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}.")
    generator = dl_kwargs.get("generator")
    base = RandomSampler(ds, generator=generator) if shuffle else SequentialSampler(ds)
    sampler = BatchSampler(base, batch_size, drop_last)
    return DataLoader(
        ds, sampler=sampler, batch_size=None, collate_fn=_as_is, **dl_kwargs
    )
