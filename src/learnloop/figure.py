"""Figures that show themselves in a notebook, without pyplot and without `%matplotlib inline`.

learnloop's plots (`plot_loss`, `plot_lr`, the lr finder's, the activation plots, `show_batch`)
are built on `matplotlib.figure.Figure` directly, not with pyplot: pyplot keeps every figure open
until closed (100 plots in a loop leak them and warn), and a script that calls `.savefig` needs no
GUI backend. But IPython learns to draw a Figure as PNG only when pyplot's inline backend is
activated, so in a fresh kernel a returned Figure printed as `<Figure size 600x400 with 1 Axes>`.

`NotebookFigure` draws itself (`_ipython_display_`, which IPython calls before any formatter
registered for the Figure type, so this holds when the user imported pyplot too), and
`new_figure` makes one that, in a notebook, is shown when the cell ends unless it was shown
before (as the cell's value): each figure shows exactly once, whether it is the cell's value or
was made for its effect. Outside a notebook it is an ordinary Figure. This module imports
matplotlib; the plotting functions import it when called.
"""

from __future__ import annotations

import base64
import io
from typing import Any

from matplotlib.figure import Figure

from .notebook import mark_shown, show_at_cell_end

__all__ = ["NotebookFigure", "new_figure", "png_data"]


def png_data(fig: Figure) -> dict[str, str]:
    """`fig` as a display bundle: the PNG (base64, as notebooks store it) and its repr as text."""
    buf = io.BytesIO()
    # The PNG `fig.savefig("x.png")` writes, so a notebook shows what a script saves. (The
    # inline backend's bbox_inches="tight" would cost a second draw; our figures are laid out.)
    fig.savefig(buf, format="png")
    return {
        "image/png": base64.b64encode(buf.getvalue()).decode("ascii"),
        "text/plain": repr(fig),
    }


class NotebookFigure(Figure):
    """A matplotlib Figure that a notebook shows as a PNG (as the cell's value or at the cell's end)."""

    def _ipython_display_(self) -> None:
        from IPython.display import display

        display(png_data(self), raw=True)
        mark_shown(self)


def new_figure(**kwargs: Any) -> NotebookFigure:
    """A `NotebookFigure(**kwargs)` that a notebook shows at the end of the cell, unless shown before.

    Example:
        >>> fig = new_figure(figsize=(6, 4))
        >>> ax = fig.add_subplot()
    """
    fig = NotebookFigure(**kwargs)
    show_at_cell_end(fig)
    return fig
