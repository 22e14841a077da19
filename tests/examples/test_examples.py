"""Each example runs, on small or embedded data, for a few batches."""

from __future__ import annotations

import json
from pathlib import Path
from types import ModuleType

import pytest
from helpers import load_script, png_outputs, run_notebook
from image_helpers import image_dataset

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def load(name: str) -> ModuleType:
    """Import examples/<name>.py as a module (without running it as a script)."""
    return load_script(EXAMPLES / f"{name}.py", f"example_{name}")


@pytest.mark.parametrize(
    "name", ["fashion_mnist", "custom_callback", "profile_loaders"]
)
def test_examples_are_scripts(name):
    """Each example opens with a docstring showing its command and keeps its work in main()."""
    module = load(name)
    assert f"python examples/{name}.py" in module.__doc__ and callable(module.main)
    assert len((EXAMPLES / f"{name}.py").read_text().splitlines()) <= 100


def test_fashion_mnist(tmp_path, capsys):
    """The Fashion-MNIST example trains on a local parquet copy, prints its table and writes the plot."""
    data = tmp_path / "data"
    data.mkdir()
    image_dataset(16).to_parquet(data / "train.parquet")
    image_dataset(8).to_parquet(data / "test.parquet")
    out = tmp_path / "loss.png"
    accuracy = load("fashion_mnist").main(
        [
            "--data",
            str(data),
            "--epochs",
            "1",
            "--bs",
            "4",
            "--limit",
            "8",
            "--out",
            str(out),
        ]
    )
    assert 0 <= accuracy <= 1 and out.stat().st_size > 0
    assert "valid_loss" in capsys.readouterr().out


def test_profile_loaders(tmp_path, capsys):
    """The profiling example profiles the per-item and the batched loader and writes both plots."""
    data = tmp_path / "data"
    data.mkdir()
    image_dataset(24).to_parquet(data / "train.parquet")
    image_dataset(16).to_parquet(data / "test.parquet")
    out = tmp_path / "profile.png"
    reports = load("profile_loaders").main(
        ["--data", str(data), "--bs", "4", "--batches", "2", "--out", str(out)]
    )
    assert set(reports) == {"per_item", "batched"}
    assert all(
        r.train.n_batches == 2 and r.valid.n_batches == 2 for r in reports.values()
    )
    for name in reports:
        assert (tmp_path / f"{name}_profile.png").stat().st_size > 0
    printed = capsys.readouterr().out
    assert (
        printed.count("\ntraining step:") == 2 and reports["batched"].advice in printed
    )


def test_custom_callback(capsys):
    """The callbacks count batches, cancel the first two of each epoch and track the best epoch."""
    seen = load("custom_callback").main(["--epochs", "1", "--bs", "256"])
    assert (
        seen["train_batches"] == 6
        and seen["skipped"] == 2
        and seen["best_epoch"][0] == 0
    )


def test_notebook_stored_without_outputs():
    """The notebook is committed with no outputs or execution counts."""
    nb = json.loads((EXAMPLES / "notebook.ipynb").read_text())
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert code and all(not c["outputs"] and c["execution_count"] is None for c in code)


def test_notebook_runs(tmp_path):
    """The notebook executes headless on this interpreter's kernel and shows its figures.

    Default install, no `%matplotlib inline`: show_batch, `lr = learn.lr_find()` (assigned, so
    shown for its effect), the live loss plot of ProgressCB(plot=True) and learn.profile()'s
    stacked bar each show an image; the profile's report is the cell's text.
    """
    nbformat = pytest.importorskip("nbformat")
    nb = run_notebook(
        nbformat.read(EXAMPLES / "notebook.ipynb", as_version=4), tmp_path
    )
    code = [c for c in nb.cells if c.cell_type == "code"]
    outputs = [o for c in code for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    for shows in (
        "show_batch(",
        "lr = learn.lr_find()",
        "ProgressCB(plot=True)",
        "learn.profile(",
    ):
        (cell,) = [c for c in code if shows in c.source]
        assert png_outputs(cell) == 1, f"the cell with {shows} shows no image"
    (profiled,) = [c for c in code if "learn.profile(" in c.source]
    text = [
        o.data["text/plain"]
        for o in profiled.outputs
        if o.output_type == "execute_result"
    ]
    assert len(text) == 1 and "training step:" in text[0]
