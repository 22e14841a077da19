"""What counts as a metric for `MetricsCB`, what its column is called, and how its value becomes cells.

A metric is an object with `update`, `compute` and `reset` (torchmetrics, torcheval, `Accuracy`),
or a plain function `f(preds, targets) -> number`, wrapped here as `FunctionMetric`. Every value
reaches the epoch's row as plain numbers (`cells`), so that the table, the CSV file, TensorBoard
and the monitors never meet a dict or a tensor.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "FunctionMetric",
    "as_metric",
    "batch_size",
    "cells",
    "free_name",
    "function_name",
    "metric_name",
    "snake_case",
]

_PROTOCOL = ("update", "compute", "reset")


def _is_numpy(value: Any) -> bool:
    # numpy is not imported for this: a value of its types says where it comes from.
    return type(value).__module__ == "numpy" and hasattr(value, "size")


class FunctionMetric:
    """A function `fn(preds, targets) -> number` as a metric: its batch values averaged over rows.

    As fastai's `AvgMetric`: each batch's value is weighted by the batch's rows, so uneven
    batches give the mean over rows. Tensor values are summed on their device (no host sync per
    batch). Several targets (`learn.yb` a tuple) are passed as several arguments, as to the loss.
    """

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn = fn
        self.reset()

    def reset(self) -> None:
        """Forget every update."""
        self.total: Tensor | float = 0.0
        self.count = 0

    def update(self, preds: Tensor, targets: Any) -> None:
        """Add one batch's value, times its number of rows."""
        value = self.fn(preds, *(targets if isinstance(targets, tuple) else (targets,)))
        n = batch_size(targets, preds)
        if isinstance(value, Tensor) and value.numel() == 1:
            value = value.detach().reshape(())
            # Summed in float32 at least: a float16 sum overflows past 65504.
            value = value if value.dtype == torch.float64 else value.float()
            self.total = self.total + value * n
        elif isinstance(value, (int, float)) or (_is_numpy(value) and value.size == 1):
            self.total = (
                self.total + float(value.item() if _is_numpy(value) else value) * n
            )
        else:
            shape = getattr(value, "shape", None)
            got = f"shape {tuple(shape)}" if shape is not None else f"{value!r}"
            raise ValueError(
                f"Metric function {function_name(self.fn)!r} returned a "
                f"{type(value).__name__} of {got}: a function metric must return one number "
                "per batch (reduce it, e.g. with .mean()). For per-class values, pass a metric "
                "object whose compute() returns them (update/compute/reset, as torchmetrics' "
                "F1Score(average=None))."
            )
        self.count += n

    def all_reduce(self, sum_fn: Callable[[Tensor], Tensor]) -> None:
        """Replace the sums by their sums over processes (`sum_fn` sums a tensor across them)."""
        self.total = sum_fn(torch.as_tensor(self.total))
        self.count = int(sum_fn(torch.as_tensor(self.count)))

    def compute(self) -> float:
        """The mean over every row since the last reset (nan before any)."""
        return float(self.total) / self.count if self.count else float("nan")

    def __repr__(self) -> str:
        return f"FunctionMetric({function_name(self.fn)})"


def as_metric(metric: Any, key: str | None) -> Any:
    """`metric` if it is a metric object, a function wrapped as one, else a TypeError (`key`: its keyword)."""
    call = f"MetricsCB({key}=...)" if key else "MetricsCB"
    if isinstance(metric, type):  # a class has update/compute/reset too, unbound
        raise TypeError(
            f"{call} got the class {metric.__name__}, not a metric: "
            f"pass {metric.__name__}() instead."
        )
    has = [a for a in _PROTOCOL if callable(getattr(metric, a, None))]
    # Metric objects first: torchmetrics metrics are callable too.
    if len(has) == len(_PROTOCOL):
        return metric
    if not has and callable(metric):
        return FunctionMetric(metric)
    missing = ", ".join(a for a in _PROTOCOL if a not in has)
    hint = " Pass the metric itself, not its name." if isinstance(metric, str) else ""
    raise TypeError(
        f"{call} got {metric!r}, which is not a metric: it lacks {missing}. A metric is an "
        "object with update(preds, targets), compute() and reset() (torchmetrics metrics have "
        f"them), or a function f(preds, targets) that returns one number per batch.{hint}"
    )


def snake_case(name: str) -> str:
    """`name` in snake case, acronyms kept whole: 'F1Score' -> 'f1_score', 'MulticlassAUROC' -> 'multiclass_auroc'."""
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])", "_", name).lower()


def function_name(fn: Any) -> str:
    """A function's `__name__` ('<lambda>' -> 'lambda'); a partial's function's; else its class in snake case."""
    while isinstance(fn, functools.partial):
        fn = fn.func
    name = getattr(fn, "__name__", None)
    if not isinstance(name, str):  # a callable object, e.g. nn.CrossEntropyLoss()
        return snake_case(type(fn).__name__)
    return name.strip("<>") or "function"


def metric_name(metric: Any) -> str:
    """The column name of `metric`: a function's name, or a metric object's class in snake case."""
    if isinstance(metric, FunctionMetric):
        return function_name(metric.fn)
    return snake_case(type(metric).__name__)


def free_name(name: str, taken: set[str]) -> str:
    """`name`, or if it is taken the first of `name_2`, `name_3`, ... that is not."""
    i = 2
    free = name
    while free in taken:
        free, i = f"{name}_{i}", i + 1
    return free


def cells(name: str, value: Any, keys_as_names: bool = False) -> list[tuple[str, Any]]:
    """`value` as (column, plain value) pairs, one per number in it.

    A one-element tensor or numpy value is one number under `name`. A dict's keys and a
    sequence's indices are joined to `name` with '_' (a tensor or array of several values is read
    to the host once, as nested lists: `name_0`, `name_1`, ..., `name_0_1` for 2-d); with
    `keys_as_names` a dict's keys stand for `name` instead (what `compute()` returned).
    """
    if isinstance(value, Tensor):
        value = value.detach().cpu()
        value = value.item() if value.numel() == 1 else value.tolist()
    elif _is_numpy(value):
        value = value.item() if value.size == 1 else value.tolist()
    if isinstance(value, Mapping):
        return [
            cell
            for k, v in value.items()
            for cell in cells(str(k) if keys_as_names else f"{name}_{k}", v)
        ]
    if isinstance(value, (list, tuple)):
        return [cell for i, v in enumerate(value) for cell in cells(f"{name}_{i}", v)]
    return [(name, value)]


def batch_size(yb: Any, xb: Any) -> int:
    """Rows of a batch: the first dimension of its targets `yb`, else of its inputs `xb`, else 1."""
    for x in (yb, xb):
        if isinstance(x, Tensor) and x.dim() > 0:
            return x.shape[0]
        if isinstance(x, (tuple, list)) and x:
            return batch_size(x[0], None)
    return 1
