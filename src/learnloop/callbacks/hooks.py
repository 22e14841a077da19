"""Forward hooks that always come off, and activation statistics as in the fast.ai course.

`Hook` and `Hooks` are context managers around `register_forward_hook`: leaving the `with`
block, by an exception too, removes them. `ActivationStatsCB` records, for each chosen layer and
each training batch, the mean, the standard deviation and a histogram of the absolute
activations, and draws them: `plot_stats`, `color_dim` (the course's "colorful dimension"
plot) and `dead_chart` (the share of near-zero activations). Statistics stay on the device as
tensors and are moved to the CPU only when read.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from functools import partial
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from ..checkpoint import unwrap_model
from .core import ORDERS, Callback

if TYPE_CHECKING:
    from matplotlib.figure import Figure
    from typing_extensions import Self  # typing.Self needs Python 3.11

    from ..learner import Learner

__all__ = ["ActivationStatsCB", "Hook", "Hooks"]

HookFunc = Callable[..., None]


class _RemovedOnExit:
    """Context-manager plumbing shared by Hook and Hooks: leaving the block, or garbage collection, calls remove()."""

    def remove(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def __del__(self) -> None:
        self.remove()


class Hook(_RemovedOnExit):
    """Calls `func(hook, module, inputs, output)` after each forward pass of `module` until removed.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> shapes = []
        >>> with Hook(nn.Linear(2, 3), lambda h, m, i, o: shapes.append(o.shape)) as h:
        ...     _ = h.module(torch.zeros(1, 2))
        >>> shapes
        [torch.Size([1, 3])]
    """

    def __init__(self, module: nn.Module, func: HookFunc) -> None:
        self.module = module
        self._handle: Any = module.register_forward_hook(partial(func, self))

    @property
    def removed(self) -> bool:
        """Whether the hook is off the module."""
        return self._handle is None

    def remove(self) -> None:
        """Take the hook off the module (safe to call twice)."""
        # Absent if __init__ failed; __del__ still calls this.
        handle = getattr(self, "_handle", None)
        if handle is not None:
            handle.remove()
            self._handle = None

    def __repr__(self) -> str:
        return (
            f"Hook({type(self.module).__name__}{', removed' if self.removed else ''})"
        )


class Hooks(_RemovedOnExit):
    """One `Hook` per module of `modules`, all calling `func`; a context manager that removes them all.

    Example:
        >>> model = nn.Sequential(nn.Linear(2, 3), nn.ReLU())  # doctest: +SKIP
        >>> with Hooks(model, lambda h, m, i, o: print(type(m).__name__)):  # doctest: +SKIP
        ...     model(torch.zeros(1, 2))
    """

    def __init__(self, modules: Iterable[nn.Module], func: HookFunc) -> None:
        self.hooks = [Hook(m, func) for m in modules]

    def remove(self) -> None:
        """Take every hook off its module."""
        for h in getattr(self, "hooks", ()):
            h.remove()

    def __iter__(self) -> Iterator[Hook]:
        return iter(self.hooks)

    def __len__(self) -> int:
        return len(self.hooks)

    def __getitem__(self, i: int) -> Hook:
        return self.hooks[i]

    def __repr__(self) -> str:
        return f"Hooks({len(self)} hooks)"


def _module_filter(mod_filter: Any) -> Callable[[nn.Module], bool]:
    if mod_filter is None:
        return lambda m: next(m.children(), None) is None  # every leaf module
    if isinstance(mod_filter, type) or (
        isinstance(mod_filter, tuple) and all(isinstance(t, type) for t in mod_filter)
    ):
        return lambda m: isinstance(m, mod_filter)
    if callable(mod_filter):
        return mod_filter
    raise TypeError(
        f"mod_filter must be a module class, a tuple of classes or a predicate, got {mod_filter!r}."
    )


class ActivationStatsCB(Callback):
    """Records activation statistics of the layers `mod_filter` picks, per training batch.

    Args:
        mod_filter: a module class (e.g. `nn.ReLU`), a tuple of classes, or a predicate on modules;
            None picks every leaf module.
        bins, hist_range: the histogram of absolute activations; its first bin counts as "dead".

    Example:
        >>> stats = ActivationStatsCB(nn.ReLU)  # doctest: +SKIP
        >>> learn.fit(1, cbs=[stats])  # doctest: +SKIP
        >>> stats.plot_stats().savefig("stats.png")  # doctest: +SKIP
    """

    run_in_lr_find = False  # lr_find detaches it for the sweep

    order = ORDERS["ActivationStatsCB"]

    def __init__(
        self,
        mod_filter: Any = None,
        bins: int = 40,
        hist_range: tuple[float, float] = (0.0, 10.0),
    ) -> None:
        self._filter = _module_filter(mod_filter)
        self.bins, self.hist_range = bins, hist_range
        self.names: list[str] = []
        self.hooks: Hooks | None = None
        self._stats: list[dict[str, list[Any]]] = []

    def before_fit(self, learn: Learner, *args: Any, **kwargs: Any) -> None:
        picked = [
            (n, m)
            for n, m in unwrap_model(learn.model).named_modules()
            if self._filter(m)
        ]
        if not picked:
            kinds = sorted({type(m).__name__ for m in learn.model.modules()})
            raise ValueError(
                f"ActivationStatsCB's mod_filter picked none of the model's modules ({kinds}): "
                "pass a class the model uses, e.g. ActivationStatsCB(nn.ReLU)."
            )
        self.names = [
            f"{n} {type(m).__name__}" if n else type(m).__name__ for n, m in picked
        ]
        self._modules = [m for _, m in picked]
        self._index = {id(m): i for i, m in enumerate(self._modules)}
        self._stats = [{"mean": [], "std": [], "hist": [], "numel": []} for _ in picked]

    def before_train(self, learn: Learner, *args: Any, **kwargs: Any) -> None:
        self._remove()
        # Training only: removed again in after_train.
        self.hooks = Hooks(self._modules, self._record)

    def after_train(self, learn: Learner, *args: Any, **kwargs: Any) -> None:
        self._remove()

    def after_fit(self, learn: Learner, *args: Any, **kwargs: Any) -> None:
        self._remove()  # after_train does not run when the fit ends in an error or interrupt

    def _remove(self) -> None:
        if self.hooks is not None:
            self.hooks.remove()
            self.hooks = None

    def _record(self, hook: Hook, module: nn.Module, inputs: Any, output: Any) -> None:
        acts = output[0] if isinstance(output, (tuple, list)) else output
        if not isinstance(acts, Tensor):
            return
        acts = acts.detach().float()
        stats = self._stats[self._index[id(module)]]
        stats["mean"].append(acts.mean())
        stats["std"].append(
            acts.std() if acts.numel() > 1 else torch.zeros((), device=acts.device)
        )
        stats["hist"].append(acts.abs().histc(self.bins, *self.hist_range))
        stats["numel"].append(acts.numel())

    # ---------------------------------------------------------------- reading
    def _stacked(self, key: str) -> Tensor:
        if not self._stats or not self._stats[0]["mean"]:
            raise ValueError(
                "ActivationStatsCB has no statistics yet: fit with it attached first."
            )
        return torch.stack([torch.stack(s[key]).cpu() for s in self._stats])

    @property
    def means(self) -> Tensor:
        """Mean activation, shape (layers, batches)."""
        return self._stacked("mean")

    @property
    def stds(self) -> Tensor:
        """Standard deviation of the activations, shape (layers, batches)."""
        return self._stacked("std")

    @property
    def hists(self) -> Tensor:
        """Histograms of absolute activations, shape (layers, batches, bins)."""
        return self._stacked("hist")

    @property
    def dead(self) -> Tensor:
        """Share of activations in the histogram's first bin (near zero), shape (layers, batches)."""
        numel = torch.tensor([s["numel"] for s in self._stats], dtype=torch.float32)
        return self.hists[..., 0] / numel

    # ---------------------------------------------------------------- plots
    def plot_stats(self, figsize: tuple[float, float] = (10, 4)) -> Figure:
        """Means and standard deviations of each layer's activations over the training batches."""
        from ..figure import new_figure

        fig = new_figure(figsize=figsize)
        for ax, values, title in zip(
            fig.subplots(1, 2), (self.means, self.stds), ("means", "stds")
        ):
            for name, row in zip(self.names, values):
                ax.plot(row.numpy(), label=name)
            ax.set_title(title)
            ax.set_xlabel("batch")
        fig.axes[0].legend(fontsize="small")
        fig.tight_layout()
        return fig

    def color_dim(self, figsize: tuple[float, float] | None = None) -> Figure:
        """Each layer's activation histogram over the batches as an image (log scale, small values below)."""
        from ..figure import new_figure

        hists = self.hists
        cols = min(len(self.names), 4)
        rows = math.ceil(len(self.names) / cols)
        fig = new_figure(figsize=figsize or (3 * cols, 2.5 * rows))
        axes = fig.subplots(rows, cols, squeeze=False).flatten()
        lo, hi = self.hist_range
        for ax, name, h in zip(axes, self.names, hists):
            ax.imshow(
                h.T.log1p().numpy(),
                origin="lower",
                aspect="auto",
                extent=(0, h.shape[0], lo, hi),
            )
            ax.set_title(name, fontsize="small")
        for ax in axes[len(self.names) :]:
            ax.set_axis_off()
        fig.supxlabel("batch")
        fig.supylabel("|activation|")
        fig.tight_layout()
        return fig

    def dead_chart(self, figsize: tuple[float, float] = (6, 4)) -> Figure:
        """Share of near-zero activations (the histogram's first bin) per layer over the batches."""
        from ..figure import new_figure

        fig = new_figure(figsize=figsize)
        ax = fig.add_subplot()
        for name, row in zip(self.names, self.dead):
            ax.plot(row.numpy(), label=name)
        width = (self.hist_range[1] - self.hist_range[0]) / self.bins
        ax.set(
            ylim=(0, 1), xlabel="batch", ylabel=f"share with |activation| < {width:g}"
        )
        ax.legend(fontsize="small")
        fig.tight_layout()
        return fig

    def __repr__(self) -> str:
        return f"ActivationStatsCB({len(self.names)} layers)"
