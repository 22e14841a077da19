"""Image plots, as in the fast.ai course: `show_image`, `subplots`, `get_grid`, `show_images`.

Images may be torch tensors (CHW or HW, on any device, with or without grad), numpy arrays
or PIL images. `fastcore.meta.delegates` makes help() show matplotlib's own keyword arguments.
This module imports matplotlib, so `learnloop.data` loads it only when one of these is used.
These draw on pyplot figures, as the course does (`plt.savefig` saves them); `DataLoaders.show_batch`
builds its figure without pyplot (`learnloop.figure`) from `grid_shape` and `show_image`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from itertools import zip_longest
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
from fastcore.meta import delegates

__all__ = ["get_grid", "grid_shape", "show_image", "show_images", "subplots"]


def _to_numpy(im: Any) -> np.ndarray:
    """`im` as an HW or HWC numpy array; float images outside [0, 1] are rescaled to it for display."""
    if hasattr(im, "detach") and hasattr(im, "permute"):
        im = im.detach().cpu()
        if im.ndim == 3 and im.shape[0] in (1, 3, 4):
            im = im.permute(1, 2, 0)
        im = im.numpy()
    else:
        im = np.asarray(im)
    if im.ndim == 3 and im.shape[-1] == 1:
        im = im[..., 0]
    if im.dtype.kind == "f" and im.size and (im.min() < 0 or im.max() > 1):
        lo, hi = float(im.min()), float(im.max())
        im = (im - lo) / (hi - lo or 1.0)
    return im


@delegates(plt.Axes.imshow)
def show_image(
    im: Any,
    ax: plt.Axes | None = None,
    figsize: tuple[float, float] | None = None,
    title: str | None = None,
    noframe: bool = True,
    **kwargs: Any,
) -> plt.Axes:
    """Show `im` (tensor, array or PIL image) on `ax` (a new figure if None), with an optional `title`."""
    im = _to_numpy(im)
    if ax is None:
        _, ax = plt.subplots(figsize=figsize)
    if im.ndim == 2:
        kwargs.setdefault("cmap", "gray")
    ax.imshow(im, **kwargs)
    if title is not None:
        ax.set_title(title)
    ax.set_xticks([])
    ax.set_yticks([])
    if noframe:
        ax.axis("off")
    return ax


@delegates(plt.subplots, keep=True)
def subplots(
    nrows: int = 1,
    ncols: int = 1,
    figsize: tuple[float, float] | None = None,
    imsize: float = 3,
    suptitle: str | None = None,
    **kwargs: Any,
) -> tuple[Any, np.ndarray]:
    """A figure and an array of axes, `imsize` inches per image unless `figsize` is given."""
    if figsize is None:
        figsize = (ncols * imsize, nrows * imsize)
    fig, ax = plt.subplots(nrows, ncols, figsize=figsize, **kwargs)
    if suptitle is not None:
        fig.suptitle(suptitle)
    return fig, np.atleast_1d(ax)


def grid_shape(
    n: int, nrows: int | None = None, ncols: int | None = None
) -> tuple[int, int]:
    """(rows, columns) of a grid for `n` images: near-square unless `nrows`/`ncols` say."""
    if n < 1:
        raise ValueError(f"A grid needs at least one image, got n={n}.")
    if nrows:
        ncols = ncols or math.ceil(n / nrows)
    elif ncols:
        nrows = math.ceil(n / ncols)
    else:
        nrows = max(1, int(math.sqrt(n)))
        ncols = math.ceil(n / nrows)
    if nrows * ncols < n:
        raise ValueError(f"A {nrows}x{ncols} grid cannot hold {n} images.")
    return nrows, ncols


@delegates(subplots)
def get_grid(
    n: int,
    nrows: int | None = None,
    ncols: int | None = None,
    title: str | None = None,
    weight: str = "bold",
    size: int = 14,
    **kwargs: Any,
) -> tuple[Any, np.ndarray]:
    """A grid of axes for `n` images (near-square unless `nrows`/`ncols` say); unused axes hidden."""
    nrows, ncols = grid_shape(n, nrows, ncols)
    fig, axs = subplots(nrows, ncols, **kwargs)
    for ax in axs.flat[n:]:
        ax.set_axis_off()
    if title is not None:
        fig.suptitle(title, weight=weight, size=size)
    return fig, axs


@delegates(subplots)
def show_images(
    ims: Sequence[Any],
    nrows: int | None = None,
    ncols: int | None = None,
    titles: Sequence[Any] | None = None,
    **kwargs: Any,
) -> None:
    """Show images `ims` in a grid, each with its title from `titles`."""
    ims = list(ims)
    axs = get_grid(len(ims), nrows, ncols, **kwargs)[1].flat
    for im, title, ax in zip_longest(
        ims, list(titles or [])[: len(ims)], axs[: len(ims)]
    ):
        show_image(im, ax=ax, title=title)
