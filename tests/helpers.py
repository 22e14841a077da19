"""Small builders shared by tests: synthetic data made in the test, no files, no network."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch.utils.data import DataLoader, TensorDataset

from learnloop import Callback, DataLoaders

TESTS = Path(__file__).resolve().parent
SRC = TESTS.parent / "src"


def torchrun_env() -> dict[str, str]:
    """The environment of a test's `torchrun` launch: this checkout's learnloop and the tests on
    the path, one thread per process, no rank variables of an enclosing launch, and the
    rendezvous store not shared with restarted workers (pytorch/pytorch#135712)."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(SRC), str(TESTS)]),
        "OMP_NUM_THREADS": "1",
        "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1",
    }
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    return env


def make_data(
    n: int = 96, n_in: int = 4, n_classes: int = 3, seed: int = 0
) -> TensorDataset:
    """A linearly separable `n`-row classification set."""
    w = torch.randn(n_in, n_classes, generator=torch.Generator().manual_seed(1234))
    x = torch.randn(n, n_in, generator=torch.Generator().manual_seed(seed))
    return TensorDataset(x, (x @ w).argmax(dim=1))


def make_dls(n: int = 96, bs: int = 16, shuffle: bool = False, **kw) -> DataLoaders:
    """DataLoaders over `make_data` (valid is a second draw of the same task)."""
    train, valid = make_data(n, **kw), make_data(n // 2, seed=1, **kw)
    return DataLoaders(
        DataLoader(train, batch_size=bs, shuffle=shuffle),
        DataLoader(valid, batch_size=bs * 2),
    )


def boom(event: str, exc: BaseException) -> Callback:
    """A callback whose `event` hook raises `exc` (a real method: hooks are looked up on the class)."""
    cls = type(
        "Boom",
        (Callback,),
        {event: lambda self, learn, *a, **k: (_ for _ in ()).throw(exc)},
    )
    return cls()


def count_host_reads(
    monkeypatch, names: tuple[str, ...] = ("item", "__float__", "tolist")
) -> list[str]:
    """Spy on the Tensor methods in `names` (device-to-host reads); returns the names as called."""
    calls: list[str] = []
    for name in names:
        original = getattr(torch.Tensor, name)

        def spy(self, *args, _original=original, _name=name, **kwargs):
            calls.append(_name)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, spy)
    return calls


def training_loop(learn, capsys) -> dict[str, str]:
    """What `learn.show_training_loop()` prints, read through `capsys`: {event: "CbA, CbB" or "-"}."""
    capsys.readouterr()
    learn.show_training_loop()
    return dict(line.split(None, 1) for line in capsys.readouterr().out.splitlines())
