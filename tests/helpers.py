"""Small builders shared by tests: synthetic data made in the test, no files, no network."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path
from types import ModuleType

import torch
from torch.utils.data import DataLoader, TensorDataset

from learnloop import Callback, DataLoaders

TESTS = Path(__file__).resolve().parent
SRC = TESTS.parent / "src"


def load_script(path: Path, name: str) -> ModuleType:
    """Import the script at `path` as the module `name`, without running it as a script."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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


def assert_same(a, b, path="state"):
    """Recursively compare nested dicts/lists of tensors and numbers, bit for bit."""
    if isinstance(a, torch.Tensor):
        assert (
            isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
        ), path
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            assert_same(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{path}[{i}]")
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


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


class FakeKernel:
    """A stand-in for a Jupyter kernel, in this process: `install` makes `in_notebook()` true and
    records what is displayed. `outputs` has one entry per output of the running cell, the list of
    every bundle it was drawn with (a display handle's updates replace it in place, as in Jupyter);
    `end_cell()` fires the kernel's `post_run_cell` event."""

    def __init__(self) -> None:
        from IPython.core.events import EventManager, available_events

        # What learnloop.notebook.in_notebook looks for.
        self.config = {"IPKernelApp": {}}
        self.events = EventManager(self, available_events)
        self.outputs: list[list[dict]] = []

    def showtraceback(self) -> None:
        # EventManager.trigger calls this in its `except`: the callback's error fails the test.
        raise sys.exc_info()[1]

    def install(self, monkeypatch) -> FakeKernel:
        import IPython
        import IPython.display

        from learnloop import notebook

        monkeypatch.setattr(IPython, "get_ipython", lambda: self)
        monkeypatch.setattr(IPython.display, "display", self.display)
        # A new kernel: no figures left waiting by an earlier test's cell.
        monkeypatch.setattr(notebook, "_pending", [])
        return self

    def display(self, *objs, raw=False, display_id=None, **kwargs):
        """IPython's display: an object's `_ipython_display_` first, else a text/plain repr."""
        for obj in objs:
            if raw:
                self.outputs.append([obj])
            elif hasattr(obj, "_ipython_display_"):
                obj._ipython_display_()
            else:
                self.outputs.append([{"text/plain": repr(obj)}])
        if display_id:
            index = len(self.outputs) - 1
            outputs = self.outputs

            class Handle:
                def update(self, obj, raw=False, **kwargs):
                    assert raw, "learnloop updates displays with mimebundles"
                    outputs[index].append(obj)

            return Handle()
        return None

    def end_cell(self) -> None:
        self.events.trigger("post_run_cell", None)

    def shown(self) -> list[dict]:
        """Each output as it looks now (its last bundle)."""
        return [states[-1] for states in self.outputs]

    def images(self) -> int:
        """How many outputs show an image now."""
        return sum("image/png" in data for data in self.shown())


def notebook_kernel_spec(workdir: Path) -> str:
    """A Jupyter kernel spec under `workdir` running this interpreter with this checkout's learnloop;
    returns its name (set JUPYTER_PATH to `workdir` for Jupyter to find it)."""
    kernel_dir = workdir / "kernels" / "learnloop-test"
    kernel_dir.mkdir(parents=True, exist_ok=True)
    spec = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "learnloop test",
        "language": "python",
        "env": {"PYTHONPATH": str(SRC)},
    }
    (kernel_dir / "kernel.json").write_text(json.dumps(spec))
    return "learnloop-test"


def run_notebook(nb, workdir: Path, timeout: int = 120):
    """Execute the nbformat notebook `nb` headless, in place, in `workdir`, on a fresh kernel of this
    interpreter (skips the test where nbclient or ipykernel is missing); returns `nb`."""
    import pytest

    nbclient = pytest.importorskip("nbclient")
    if importlib.util.find_spec("ipykernel") is None:
        pytest.skip(
            "ipykernel is not installed, so there is no kernel to run the notebook"
        )
    name = notebook_kernel_spec(workdir)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("JUPYTER_PATH", str(workdir))
        client = nbclient.NotebookClient(
            nb,
            kernel_name=name,
            timeout=timeout,
            resources={"metadata": {"path": str(workdir)}},
        )
        client.execute()
    return nb


def png_outputs(cell) -> int:
    """How many outputs of an executed notebook cell are images."""
    return sum("image/png" in o.get("data", {}) for o in cell.outputs)
