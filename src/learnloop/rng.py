"""The random number generators a fit draws from: capture, restore, and a check before restoring.

`rng_state` captures python's, numpy's and torch's global generators, the CUDA ones and the train
loader's own generators (which fix its shuffling order) as tensors and plain values.
`check_rng_state` makes sure `set_rng_state` can apply a state whole, before it changes any
generator: it checks the structure and sizes, then applies each state to a fresh generator of its
kind (`random.Random`, `np.random.RandomState`, `torch.Generator`), never to a global one.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

__all__ = [
    "RngSnapshot",
    "check_rng_state",
    "loader_generators",
    "rng_state",
    "set_rng_state",
]

log = logging.getLogger(__name__)

# Words of Mersenne Twister state, python's (plus a position) and numpy's.
_MT_SIZE = 624


def loader_generators(dl: Any) -> list[torch.Generator]:
    """The torch Generators a loader draws from: its own, its sampler's, its batch sampler's (deduplicated)."""
    found: list[torch.Generator] = []

    def visit(obj: Any, depth: int) -> None:
        if obj is None or depth > 3:
            return
        if isinstance(obj, torch.Generator):
            if not any(obj is g for g in found):
                found.append(obj)
            return
        for attr in ("generator", "sampler", "batch_sampler"):
            visit(getattr(obj, attr, None), depth + 1)

    visit(dl, 0)
    return found


class RngSnapshot:
    """The states `rng_state` reads, taken as the generators give them (about half its cost).

    A fit takes one at each epoch's start, for a checkpoint that may never be written; `.state()`
    turns it into `rng_state`'s dict when one is.
    """

    __slots__ = ("_raw",)

    def __init__(self, train_dl: Any = None) -> None:
        cuda = None
        # Untested here: no GPU in CI.
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            cuda = torch.cuda.get_rng_state_all()
        self._raw = (
            random.getstate(),
            np.random.get_state(),
            torch.get_rng_state(),
            [g.get_state() for g in loader_generators(train_dl)],
            cuda,
        )

    def state(self) -> dict[str, Any]:
        """The snapshot as `rng_state` returns it: tensors and plain values."""
        return _as_tensors(*self._raw)


def rng_state(train_dl: Any = None) -> dict[str, Any]:
    """Every RNG a fit draws from, as tensors and plain values: python, numpy, torch, cuda, `train_dl`'s."""
    return RngSnapshot(train_dl).state()


def _as_tensors(
    python: tuple, numpy: tuple, torch_state: torch.Tensor, loaders: list, cuda: Any
) -> dict[str, Any]:
    version, state, gauss = python
    kind, keys, pos, has_gauss, cached = numpy
    rng: dict[str, Any] = {
        "python": {
            "version": version,
            "state": torch.tensor(state, dtype=torch.int64),
            "gauss": gauss,
        },
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached": float(cached),
        },
        "torch": torch_state,
        "loaders": loaders,
    }
    if cuda is not None:
        rng["cuda"] = cuda
    return rng


def set_rng_state(rng: dict[str, Any], train_dl: Any = None) -> None:
    """Restore what `rng_state` captured; CUDA and loader states only where the devices and generators match."""
    random.setstate(_python_state(rng["python"]))
    if "numpy" in rng:
        np.random.set_state(_numpy_state(rng["numpy"]))
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():  # untested here: no GPU in CI
        if len(rng["cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(rng["cuda"])
        else:
            log.warning(
                "Saved CUDA RNG states for %d devices, this machine has %d: not restored.",
                len(rng["cuda"]),
                torch.cuda.device_count(),
            )
    gens = loader_generators(train_dl)
    if len(gens) != len(rng["loaders"]):
        log.warning(
            "Saved %d train-loader generator(s), this train loader has %d: "
            "shuffling order not restored.",
            len(rng["loaders"]),
            len(gens),
        )
        return
    for g, state in zip(gens, rng["loaders"]):
        g.set_state(state)


def _python_state(py: dict[str, Any]) -> tuple:
    return (py["version"], tuple(py["state"].tolist()), py["gauss"])


def _numpy_state(n: dict[str, Any]) -> tuple:
    keys = n["keys"].numpy().astype(np.uint32)
    return (n["kind"], keys, n["pos"], n["has_gauss"], n["cached"])


def check_rng_state(rng: Any, train_dl: Any = None) -> None:
    """ValueError naming the entry (`rng['torch']`, ...) unless `set_rng_state(rng, train_dl)` applies whole."""
    gens = loader_generators(train_dl)
    trials: list[tuple[str, str, Callable[[], Any]]] = [
        (
            "'rng'",
            "a dict with 'python', 'torch', 'loaders' and optionally 'numpy' and 'cuda'",
            lambda: _check_layout(rng),
        ),
        (
            "rng['python']",
            f"{{'version': 3, 'state': {_MT_SIZE + 1} int64 values, 'gauss': float or None}}",
            lambda: random.Random().setstate(_python_state(rng["python"])),
        ),
        (
            "rng['numpy']",
            (
                f"{{'kind': 'MT19937', 'keys': {_MT_SIZE} int64 values, 'pos': 0 to {_MT_SIZE}, "
                "'has_gauss': 0 or 1, 'cached': float}"
            ),
            lambda: _trial_numpy(rng.get("numpy")),
        ),
        (
            "rng['torch']",
            "a torch.uint8 tensor from torch.get_rng_state()",
            lambda: torch.Generator().set_state(rng["torch"]),
        ),
        (
            "rng['loaders']",
            "torch.uint8 tensors from torch.Generator.get_state()",
            lambda: _trial_loaders(rng["loaders"], gens),
        ),
        (
            "rng['cuda']",
            "a list of torch.uint8 tensors from torch.cuda.get_rng_state_all()",
            lambda: _require(
                all(
                    isinstance(t, torch.Tensor) and t.dtype == torch.uint8
                    for t in rng.get("cuda", [])
                ),
                "not all torch.uint8 tensors",
            ),
        ),
    ]
    for where, expected, trial in trials:
        try:
            trial()
        except Exception as e:
            raise ValueError(
                f"{where} does not apply ({type(e).__name__}: {str(e)[:200]}); "
                f"expected {expected}."
            ) from e


def _trial_numpy(n: Any) -> None:
    if n is None:  # optional: files from before numpy's state was saved
        return
    # numpy does not check `pos`, and would read past its key array with a bad one.
    pos, keys = n["pos"], n["keys"]
    _require(type(pos) is int and 0 <= pos <= _MT_SIZE, f"'pos' is {pos!r}")
    _require(
        isinstance(keys, torch.Tensor) and keys.shape == (_MT_SIZE,),
        f"'keys' is {_describe(keys)}",
    )
    np.random.RandomState().set_state(_numpy_state(n))


def _trial_loaders(states: list[Any], gens: list[torch.Generator]) -> None:
    if len(gens) != len(
        states
    ):  # then not restored (see set_rng_state): check them on the CPU
        gens = [torch.Generator() for _ in states]
    for state, gen in zip(states, gens):
        torch.Generator(gen.device).set_state(state)


def _check_layout(rng: Any) -> None:
    _require(isinstance(rng, dict), f"it is a {type(rng).__name__}")
    missing = [k for k in ("python", "torch", "loaders") if k not in rng]
    _require(not missing, f"it lacks {missing}")
    _require(
        isinstance(rng["loaders"], list), f"'loaders' is {_describe(rng['loaders'])}"
    )


def _describe(x: Any) -> str:
    if isinstance(x, torch.Tensor):
        return f"a {x.dtype} tensor of shape {tuple(x.shape)}"
    return f"a {type(x).__name__}"


def _require(ok: bool, problem: str) -> None:
    if not ok:
        raise ValueError(problem)
