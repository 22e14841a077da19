"""Glue between Hugging Face `datasets` and torch DataLoaders, for the per-item path.

Hugging Face rows are dicts; a `Learner` wants `(x, y)` tuples. `collate_dict` collates rows
into a tuple in the dataset's feature order; when torch's `default_collate` fails, it says
why in plain words (a missing column, images of different sizes, PIL images). `inplace`
lets a transform that edits its batch in place be used with `Dataset.with_transform`, and
`check_transform` makes a transform that forgot to return its batch fail with that diagnosis.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import default_collate

__all__ = ["collate_dict", "inplace"]


def inplace(f: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """Make `f`, which edits a batch in place, return that batch (as `with_transform` needs).

    Example:
        >>> @inplace
        ... def double(b):
        ...     b["x"] = [v * 2 for v in b["x"]]
        >>> double({"x": [1, 2]})
        {'x': [2, 4]}
    """

    @functools.wraps(f)
    def _inner(b: Any) -> Any:
        f(b)
        return b

    return _inner


def returned_none(f: Callable[..., Any], where: str) -> TypeError:
    """The error for a transform `f` (used `where`) that returned None instead of the batch."""
    name = getattr(f, "__qualname__", type(f).__name__)
    return TypeError(
        f"The transform {name} ({where}) returned None instead of the batch: end it with `return b`, "
        "or decorate it with `@inplace` (from learnloop.data import inplace) if it edits `b` in place."
    )


def check_transform(ds: Any) -> Any:
    """`ds` with its `with_transform` function wrapped so that returning None raises a clear error."""
    fmt = getattr(ds, "format", None)
    if not isinstance(fmt, Mapping) or fmt.get("type") != "custom":
        return ds
    tfm = fmt["format_kwargs"].get("transform")
    if tfm is None or getattr(tfm, "_learnloop_checked", False):
        return ds

    @functools.wraps(tfm)
    def checked(b: Any) -> Any:
        out = tfm(b)
        if out is None:
            raise returned_none(tfm, "set with Dataset.with_transform")
        return out

    checked._learnloop_checked = True  # type: ignore[attr-defined]
    return ds.with_transform(
        checked, columns=fmt["columns"], output_all_columns=fmt["output_all_columns"]
    )


def _shape(v: Any) -> tuple[int, ...] | None:
    if isinstance(v, (torch.Tensor, np.ndarray)):
        return tuple(v.shape)
    if type(v).__module__.startswith("PIL."):
        return tuple(reversed(v.size))
    return None


def _check_column(name: str, values: Sequence[Any]) -> None:
    """Raise if the rows' `name` values are PIL images or differ in shape (default_collate's cryptic cases)."""
    first = values[0]
    if type(first).__module__.startswith("PIL."):
        raise TypeError(
            f"Column {name!r} holds PIL images, which cannot be collated: convert them to tensors with "
            "a transform (ds.with_transform(...)), or use DataLoaders.from_dd(..., batched=True)."
        )
    shape0 = _shape(first)
    if shape0 is None:
        return
    for i, v in enumerate(values):
        shape = _shape(v)
        if shape != shape0:
            raise ValueError(
                f"Column {name!r}: item {i} of the batch has shape {shape}, but item 0 has {shape0}. "
                "Items in one batch must have one shape: resize or crop them in a transform."
            )


def collate_dict(
    ds: Any = None, columns: Sequence[str] | None = None
) -> Callable[[list[Any]], tuple[Any, ...]]:
    """A collate function turning dict rows into a tuple of batched columns, in `ds.features` order.

    `columns` picks (and orders) the columns instead; the rows may hold others, which are dropped.

    Example:
        >>> collate = collate_dict(columns=["x", "y"])
        >>> collate([{"x": 1.0, "y": 0}, {"x": 2.0, "y": 1}])
        (tensor([1., 2.], dtype=torch.float64), tensor([0, 1]))
    """
    if columns is None:
        if ds is None or not hasattr(ds, "features"):
            raise TypeError(
                "collate_dict needs a Hugging Face dataset (for its features) or columns=[...]."
            )
        columns = list(ds.features)
    keys = list(columns)

    def _collate(rows: list[Any]) -> tuple[Any, ...]:
        if not rows or not isinstance(rows[0], Mapping):
            got = "no rows" if not rows else f"a {type(rows[0]).__name__}"
            raise TypeError(
                f"collate_dict expects dict rows (Hugging Face dataset items), got {got}."
            )
        try:
            return tuple(default_collate([r[key] for r in rows]) for key in keys)
        except Exception:
            # Only a failed batch pays for the diagnosis: say which column and row, and why.
            _diagnose(rows, keys)
            raise

    return _collate


def _diagnose(rows: list[Any], keys: list[str]) -> None:
    """Raise the clear error for rows that default_collate could not batch, if the cause is a known one."""
    for key in keys:
        missing = next((i for i, r in enumerate(rows) if key not in r), None)
        if missing is not None:
            raise KeyError(
                f"collate_dict expects column {key!r}, but row {missing} of the batch lacks it; the "
                f"rows have columns {list(rows[missing])}. Return {key!r} from your transform, or "
                "pass collate_dict(ds, columns=[...]) with the columns to keep."
            )
        _check_column(key, [r[key] for r in rows])


def class_names(features: Mapping[str, Any] | None) -> list[str] | None:
    """The class names of the first ClassLabel feature in `features`, or None."""
    for feature in (features or {}).values():
        names = getattr(feature, "names", None)
        if type(feature).__name__ == "ClassLabel" and names:
            return list(names)
    return None
