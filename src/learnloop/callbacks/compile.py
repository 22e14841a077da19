"""`CompileCB`: runs the model through `torch.compile`, off unless you attach it.

The model is compiled in place (`nn.Module.compile`), so `learn.model`, its `state_dict` keys
and checkpoints stay those of the plain model. Compilation happens on the first batch; before
that, a tiny function is compiled on the model's device as a probe, so that a platform that
cannot compile (no C++ compiler, an unsupported Python or OS) fails at once with a message that
says what to do, rather than deep inside the first forward pass. The model stays compiled
after the fit.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from .core import ORDERS, Callback

if TYPE_CHECKING:
    from ..learner import Learner

__all__ = ["CompileCB", "check_compile"]

log = logging.getLogger(__name__)


def _probe_fn(x: torch.Tensor) -> torch.Tensor:
    return torch.sin(x) * 2 + 1


@functools.cache
def _probe(device: str, backend: str | Callable[..., Any]) -> str | None:
    """None if `backend` compiles and runs a tiny function on `device`, else the error, one line."""
    try:
        x = torch.ones(3, device=device)
        out = torch.compile(_probe_fn, backend=backend, fullgraph=True)(x)
        if not torch.allclose(out, _probe_fn(x)):
            return "the compiled probe gave a wrong result"
    except Exception as e:  # noqa: BLE001 - any failure means: this platform cannot compile
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        return f"{type(e).__name__}: {first.rstrip('.')}"
    return None


def check_compile(
    device: torch.device | str = "cpu", backend: str | Callable[..., Any] = "inductor"
) -> None:
    """Raise a RuntimeError that says what to do if `torch.compile` cannot work on `device` with `backend`."""
    error = _probe(str(torch.device(device)), backend)
    if error is not None:
        raise RuntimeError(
            f"torch.compile (backend={backend!r}) does not work on {device} here: {error}.\n"
            "- help: the inductor backend needs a C++ compiler on the CPU (install gcc or clang) and "
            "Triton on CUDA; try CompileCB(backend='aot_eager') to check the graph capture alone, "
            "or train without CompileCB (compilation is an optimisation, never required)."
        )


class CompileCB(Callback):
    """Compile the model with `torch.compile(backend=backend, **compile_kwargs)` at the first fit or validate.

    `check=False` skips the probe (a tiny compile, a few seconds on a CPU) that turns a platform
    without compiler support into a clear error.

    Example:
        >>> learn = Learner(model, dls, cbs=[CompileCB(mode="max-autotune")])  # doctest: +SKIP
    """

    order = ORDERS["CompileCB"]

    def __init__(
        self,
        backend: str | Callable[..., Any] = "inductor",
        check: bool = True,
        **compile_kwargs: Any,
    ) -> None:
        self.backend, self.check, self.compile_kwargs = backend, check, compile_kwargs
        self._compiled: Any = None

    def _compile(self, learn: Learner) -> None:
        # Read from the model too: a trial fit (lr_find, profile) that compiled it puts this
        # callback's attributes back afterwards, and the model must not be compiled twice.
        if self._compiled is learn.model or _is_compiled(learn.model):
            self._compiled = learn.model
            return
        if self.check:
            first = next(learn.model.parameters(), None)
            check_compile(first.device if first is not None else "cpu", self.backend)
        learn.model.compile(backend=self.backend, **self.compile_kwargs)
        self._compiled = learn.model
        log.debug(
            "CompileCB: compiled %s with backend %r",
            type(learn.model).__name__,
            self.backend,
        )

    def before_fit(self, learn: Learner, *args: Any, **kwargs: Any) -> None:
        self._compile(learn)

    def before_validate(self, learn: Learner, *args: Any, **kwargs: Any) -> None:
        self._compile(learn)

    def __repr__(self) -> str:
        return f"CompileCB(backend={self.backend!r})"


def _is_compiled(model: Any) -> bool:
    """Whether `model.compile()` already ran on `model` (torch keeps the compiled call on it)."""
    return getattr(model, "_compiled_call_impl", None) is not None
