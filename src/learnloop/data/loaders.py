"""`DataLoaders`: the pair of training and validation loaders a `Learner` iterates over.

Built directly from two loaders, from two datasets (`from_datasets`), or from a Hugging Face
`DatasetDict` (`from_dd`), per item (`collate_dict`) or batched (`learnloop.data.batched`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

from torch.utils.data import DataLoader

from .hf import check_transform, class_names, collate_dict

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["DataLoaders"]

VALID_SPLITS = ("validation", "valid", "test")


class DataLoaders:
    """Holds a training and a validation loader: any iterables of batches (torch DataLoaders).

    Example:
        >>> import torch
        >>> from torch.utils.data import DataLoader, TensorDataset
        >>> ds = TensorDataset(torch.randn(8, 3), torch.arange(8) % 2)
        >>> dls = DataLoaders(DataLoader(ds, batch_size=4, shuffle=True), DataLoader(ds, batch_size=8))
        >>> len(dls.train), len(dls.valid)
        (2, 1)
    """

    def __init__(
        self, train: Iterable[Any], valid: Iterable[Any] | None = None
    ) -> None:
        for name, dl in (("train", train), ("valid", valid)):
            if dl is not None and not isinstance(dl, Iterable):
                raise TypeError(
                    f"DataLoaders {name} must be an iterable of batches (a torch DataLoader), "
                    f"got {type(dl).__name__}."
                )
        self.train = train
        self.valid = valid

    @classmethod
    def from_datasets(
        cls,
        train_ds: Any,
        valid_ds: Any,
        batch_size: int,
        collate_fn: Callable[..., Any] | None = None,
        **dl_kwargs: Any,
    ) -> DataLoaders:
        """Loaders over `train_ds` (shuffled) and `valid_ds` (batch size doubled); `dl_kwargs` go to both.

        Hugging Face datasets get `collate_dict(train_ds)` when `collate_fn` is None, so batches
        are tuples. `drop_last` applies to the training loader only (validation sees every row).
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}.")
        if collate_fn is None and hasattr(train_ds, "features"):
            collate_fn = collate_dict(train_ds)
        train_ds, valid_ds = check_transform(train_ds), check_transform(valid_ds)
        drop_last = dl_kwargs.pop("drop_last", False)
        train = DataLoader(
            train_ds,
            batch_size=batch_size,
            shuffle=True,
            drop_last=drop_last,
            collate_fn=collate_fn,
            **dl_kwargs,
        )
        valid = DataLoader(
            valid_ds, batch_size=batch_size * 2, collate_fn=collate_fn, **dl_kwargs
        )
        return cls(train, valid)

    @classmethod
    def from_dd(
        cls,
        dd: Any,
        batch_size: int,
        collate_fn: Callable[..., Any] | None = None,
        *,
        batched: bool = False,
        batch_tfms: Sequence[Callable[..., Any]] | Callable[..., Any] | None = None,
        train: str = "train",
        valid: str | None = None,
        num_proc: int | None = None,
        **dl_kwargs: Any,
    ) -> DataLoaders:
        """Loaders over the `train` and `valid` splits of a Hugging Face `DatasetDict`.

        `valid` defaults to the first split named 'validation', 'valid' or 'test'. Per item
        (`batched=False`), rows are collated by `collate_fn` (default `collate_dict(dd[train])`:
        tuples in feature order) after any `with_transform` function. With `batched=True`, images
        are decoded once and cached (`learnloop.data.batched`), the loader indexes whole batches,
        and `batch_tfms` (functions of the batch dict) run on each batch; a transform with
        `train_only = True` runs on the training loader only. DataLoader options pass through.

        Example:
            >>> from learnloop.data import load_digits
            >>> dls = DataLoaders.from_dd(load_digits(), 64, batched=True)
            >>> [tuple(t.shape) for t in next(iter(dls.valid))]
            [(128, 8, 8), (128,)]
        """
        names = list(dd.keys()) if hasattr(dd, "keys") else None
        if names is None:
            raise TypeError(
                f"from_dd needs a DatasetDict (splits by name), got {type(dd).__name__}."
            )
        valid = (
            valid
            if valid is not None
            else next((s for s in VALID_SPLITS if s in names), None)
        )
        if valid is None:
            raise ValueError(
                f"No validation split: the DatasetDict has splits {names}; name one with valid=..., "
                f"or split the data (dd['train'].train_test_split(test_size=0.1))."
            )
        for split in (train, valid):
            if split not in names:
                raise KeyError(
                    f"No split named {split!r}: the DatasetDict has splits {names}."
                )
        if not batched:
            if batch_tfms is not None:
                raise ValueError(
                    "batch_tfms needs batched=True; per item, use dd.with_transform(...) instead."
                )
            collate_fn = (
                collate_fn if collate_fn is not None else collate_dict(dd[train])
            )
            return cls.from_datasets(
                dd[train], dd[valid], batch_size, collate_fn, **dl_kwargs
            )
        if collate_fn is not None:
            raise ValueError(
                "collate_fn and batched=True are mutually exclusive: the batched path yields tuples of "
                "column tensors itself; put per-batch work in batch_tfms."
            )
        from .batched import BatchedDataset, as_tfm_list, batched_loader

        tfms = as_tfm_list(batch_tfms)
        train_ds = BatchedDataset.from_hf(dd[train], tfms, num_proc=num_proc)
        valid_ds = BatchedDataset.from_hf(
            dd[valid],
            [t for t in tfms if not getattr(t, "train_only", False)],
            num_proc,
        )
        drop_last = dl_kwargs.pop("drop_last", False)
        return cls(
            batched_loader(
                train_ds, batch_size, shuffle=True, drop_last=drop_last, **dl_kwargs
            ),
            batched_loader(valid_ds, batch_size * 2, **dl_kwargs),
        )

    def show_batch(
        self,
        n: int = 9,
        nrows: int | None = None,
        ncols: int | None = None,
        imsize: float = 3,
        figsize: tuple[float, float] | None = None,
        **kwargs: Any,
    ) -> Figure:
        """Show `n` images of a training batch, titled with their class names; return the figure.

        Class names come from the dataset's ClassLabel feature. Images are (N, H, W) or
        (N, C, H, W); flattened ones, (N, H*W) with H == W or (N, 3*H*W), are drawn square.
        The grid is near-square unless `nrows`/`ncols` say, `imsize` inches per image unless
        `figsize` is given; `kwargs` go to matplotlib's `imshow` (e.g. `cmap="Greys"`). The
        figure is made without pyplot: a notebook shows it, a script saves it (`.savefig`).
        """
        from ..figure import new_figure
        from .plotting import grid_shape, show_image

        batch = next(iter(self.train))
        if not isinstance(batch, (tuple, list)) or len(batch) < 2:
            raise TypeError(
                f"show_batch needs (images, labels) batches, got {type(batch).__name__}."
            )
        x, y = _as_images(batch[0][:n]), batch[1][:n]
        names = class_names(
            getattr(getattr(self.train, "dataset", None), "features", None)
        )
        labels = y.tolist() if hasattr(y, "tolist") else list(y)
        titles = [
            names[int(v)] if names and float(v).is_integer() else str(v) for v in labels
        ]
        rows, cols = grid_shape(len(x), nrows, ncols)
        fig = new_figure(figsize=figsize or (cols * imsize, rows * imsize))
        axs = fig.subplots(rows, cols, squeeze=False).flatten()
        for ax in axs[len(x) :]:
            ax.set_axis_off()
        for im, title, ax in zip(x, titles, axs):
            show_image(im, ax=ax, title=title, **kwargs)
        fig.tight_layout()
        return fig

    def __repr__(self) -> str:
        def size(dl: Any) -> str:
            return "None" if dl is None else f"{type(dl).__name__}({_len(dl)} batches)"

        return f"DataLoaders(train={size(self.train)}, valid={size(self.valid)})"


def _as_images(x: Any) -> Any:
    """Images of a batch `x` as (N, H, W) or (N, C, H, W): flattened ones made square again."""
    # A list of images (PIL, arrays): each is drawn as it is.
    if not hasattr(x, "shape"):
        return x
    shape = tuple(x.shape)
    if len(shape) in (3, 4):
        return x
    if len(shape) == 2:
        n, length = shape
        # length = side**2 (grey) and length = 3 * side**2 (RGB) never both hold (sqrt 3 is
        # irrational), so the two readings of a flattened image cannot be confused.
        side = math.isqrt(length)
        if length and side * side == length:
            return x.reshape(n, side, side)
        side = math.isqrt(length // 3)
        if length and length == 3 * side * side:
            return x.reshape(n, 3, side, side)
    raise ValueError(
        "show_batch needs images: (N, H, W), (N, C, H, W), or flattened (N, H*W) with H == W "
        f"or (N, 3*H*W) with H == W; got inputs of shape {shape}. Reshape them in a batch "
        "transform, or show them yourself with learnloop.data.show_images."
    )


def _len(dl: Any) -> str:
    try:
        return str(len(dl))
    except TypeError:
        return "?"
