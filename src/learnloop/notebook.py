"""Showing things in a Jupyter notebook with the default install: no ipywidgets, no `%matplotlib`.

Two needs, met with IPython's own display machinery (imported when used, so `import learnloop`
stays free of IPython and matplotlib):

- A figure made for its effect (not the cell's value: `fig = learn.recorder.plot_loss()`, a call
  in a loop) should still show, as pyplot figures do under `%matplotlib inline`. `show_at_cell_end`
  keeps such an object until the running cell ends (an IPython `post_run_cell` callback, registered
  once per shell, as matplotlib_inline's `flush_figures` is), then displays it unless `mark_shown`
  said it was displayed already (as the cell's value, say). So each shows exactly once.
- Progress should update in place: Jupyter ignores the cursor-up escapes that stack tqdm's text
  bars, so a 3-epoch fit left ~25 bar lines. `LiveOutput` is one output of the cell, replaced on
  each update (a display handle), and `NotebookBar` draws a tqdm-style bar into one.
"""

from __future__ import annotations

import html
import sys
import time
from typing import Any

__all__ = [
    "LiveOutput",
    "NotebookBar",
    "in_notebook",
    "mark_shown",
    "show_at_cell_end",
]

# What the running cell made for its effect, in order, to show when it ends (see the docstring).
_pending: list[Any] = []


def _kernel_shell() -> Any:
    """The IPython shell of the Jupyter kernel we run in, or None (a script, terminal IPython)."""
    # Looked up, not imported: a process that has not imported IPython is not a notebook.
    ipython = sys.modules.get("IPython")
    if ipython is None:
        return None
    shell = ipython.get_ipython()
    if shell is None or "IPKernelApp" not in getattr(shell, "config", {}):
        return None
    return shell


def in_notebook() -> bool:
    """True inside a Jupyter kernel (a notebook, JupyterLab, VS Code, qtconsole)."""
    return _kernel_shell() is not None


def show_at_cell_end(obj: Any) -> bool:
    """Display `obj` when the running cell ends, unless `mark_shown(obj)` comes first.

    Returns False (and keeps nothing) outside a notebook.
    """
    shell = _kernel_shell()
    if shell is None:
        return False
    # register() skips a callback already there: once per shell, however many figures.
    shell.events.register("post_run_cell", _show_pending)
    if not any(o is obj for o in _pending):  # once, however often it is asked for
        _pending.append(obj)
    return True


def mark_shown(obj: Any) -> None:
    """`obj` has been displayed: the end of the cell does not show it again."""
    _pending[:] = [o for o in _pending if o is not obj]


def _show_pending(*args: Any, **kwargs: Any) -> None:
    """At a cell's end (post_run_cell): display what it made and did not show."""
    from IPython.display import display

    # Taken off first: a display that fails is reported once, not at every later cell.
    objs = list(_pending)
    _pending.clear()
    for obj in objs:
        display(obj)


class LiveOutput:
    """One output of the running cell, drawn on the first `update` and replaced in place after.

    Example:
        >>> out = LiveOutput()  # doctest: +SKIP
        >>> out.update({"text/plain": "epoch 1"})  # doctest: +SKIP
        >>> out.update({"text/plain": "epoch 2"})  # replaces it  # doctest: +SKIP
    """

    def __init__(self) -> None:
        self._handle: Any = None

    def update(self, data: dict[str, Any]) -> None:
        """Show `data` (a mimebundle: {'text/plain': ..., 'image/png': ...}) in this output."""
        from IPython.display import display

        if self._handle is None:
            self._handle = display(data, raw=True, display_id=True)
        else:
            self._handle.update(data, raw=True)


class NotebookBar:
    """A progress bar drawn in one `LiveOutput`: an HTML <progress> with tqdm's text, and the text alone.

    It takes the part of tqdm's interface `ProgressCB` uses (`update`, `reset`, `set_description_str`,
    `set_postfix_str`, `close`), and draws on each `update`, `reset` and `close`: the caller hands
    it counts at most once per refresh interval. `leave=False` clears it when closed;
    `visible=False` keeps its place in the cell's outputs, blank until the first draw.
    """

    def __init__(
        self,
        total: int | None = None,
        desc: str = "",
        initial: int = 0,
        leave: bool = True,
        visible: bool = True,
        **tqdm_kwargs: Any,
    ) -> None:
        # tqdm_kwargs (file, mininterval, dynamic_ncols) are for a terminal; nothing to do here.
        self.total, self.desc, self.postfix = total, desc, ""
        self.n = self._initial = initial
        self.leave = leave
        self._start = time.monotonic()
        self._out = LiveOutput()
        if visible:
            self.render()
        else:
            self._clear()

    def text(self, bar: bool = True) -> str:
        """The bar's text, as tqdm formats it (`bar=False`: without the bar of block characters)."""
        from tqdm import tqdm

        return tqdm.format_meter(
            self.n,
            self.total,
            time.monotonic() - self._start,
            ncols=None if bar else 0,
            prefix=self.desc,
            postfix=self.postfix,
            initial=self._initial,
        )

    def render(self) -> None:
        """Draw the bar as it is now."""
        value = f' value="{self.n}" max="{self.total}"' if self.total else ""
        page = (
            f'<div><progress{value} style="width:20em;vertical-align:middle"></progress> '
            f"<code>{html.escape(self.text(bar=False))}</code></div>"
        )
        self._out.update({"text/html": page, "text/plain": self.text()})

    def update(self, n: int = 1) -> None:
        """Count `n` more and redraw."""
        self.n += n
        self.render()

    def reset(self, total: int | None = None) -> None:
        """Start again from 0 (with `total`, if given) and redraw."""
        self.n = self._initial = 0
        if total is not None:
            self.total = total
        self._start = time.monotonic()
        self.render()

    def set_description_str(self, desc: str, refresh: bool = True) -> None:
        """The label before the bar."""
        self.desc = desc
        if refresh:
            self.render()

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None:
        """The text after the counts (the running loss)."""
        self.postfix = s
        if refresh:
            self.render()

    def close(self) -> None:
        """Draw the final state, or clear the output if `leave` is False."""
        if self.leave:
            self.render()
        else:
            self._clear()

    def _clear(self) -> None:
        self._out.update({"text/html": "", "text/plain": ""})

    def __repr__(self) -> str:
        return f"NotebookBar({self.text(bar=False)!r})"
