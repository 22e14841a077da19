"""In a real Jupyter kernel, headless (nbclient), with the default install: no ipywidgets, no
`%matplotlib inline`. One notebook, built here, runs once on one kernel; the tests read its saved
outputs: each plot shows exactly one image, bars and the table update in place.
"""

from __future__ import annotations

import pytest
from helpers import png_outputs, run_notebook

nbformat = pytest.importorskip("nbformat")

SETUP = """\
import warnings

import torch
from torch import nn

from learnloop import Accuracy, ActivationStatsCB, Learner, MetricsCB, ProgressCB

import datasets  # the user's own import, after learnloop's: quiet too
from learnloop.data import DataLoaders, Normalize, load_digits

torch.manual_seed(0)
dls = DataLoaders.from_dd(load_digits(), 256, batched=True, batch_tfms=[Normalize(4.9, 6.0)])
model = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10))
stats = ActivationStatsCB(nn.ReLU)
learn = Learner(model, dls, lr=0.1, cbs=[MetricsCB(Accuracy())])"""

FIT = "learn.fit(3, cbs=[stats])"
LR_FIND = "lr = learn.lr_find()\nprint(type(lr).__name__, isinstance(lr, float))"
LR_FIND_AND_PLOT = (
    "lr2 = learn.lr_find(num_it=20)\nlr2.plot()"  # README's habit: still one plot
)
PLOTS = [
    "learn.recorder.plot_loss()",
    "learn.recorder.plot_lr()",
    "lr.plot()",
    "stats.plot_stats()",
    "stats.color_dim()",
    "stats.dead_chart()",
    "dls.show_batch(n=4)",  # last: it imports pyplot (for show_image), the others do not
]
LOOP = """\
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    for _ in range(100):
        learn.recorder.plot_loss()
print("warnings:", [str(w.message) for w in caught])"""
LIVE_PLOT = "learn.fit(2, cbs=[ProgressCB(plot=True)])"
WITH_PYPLOT = """\
%matplotlib inline
import matplotlib.pyplot as plt

plt.plot([0, 1])
learn.recorder.plot_loss()"""


def as_value(plot: str) -> str:
    return plot


def for_effect(plot: str) -> str:
    return f"fig = {plot}\nprint(type(fig).__name__)"


CELLS = [
    SETUP,
    FIT,
    LR_FIND,
    LR_FIND_AND_PLOT,
    *[as_value(p) for p in PLOTS],
    *[for_effect(p) for p in PLOTS],
    LOOP,
    LIVE_PLOT,
    WITH_PYPLOT,
]


@pytest.fixture(scope="module")
def cells(tmp_path_factory) -> dict:
    """The executed notebook's code cells, by source."""
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in CELLS])
    run_notebook(nb, tmp_path_factory.mktemp("notebook"), timeout=300)
    return {c.source: c for c in nb.cells}


def streams(cell) -> str:
    return "".join(o.get("text", "") for o in cell.outputs if o.output_type == "stream")


def test_setup_is_quiet(cells):
    """Importing datasets and loading data in a kernel without ipywidgets prints nothing (no tqdm
    "IProgress not found"), once learnloop is imported."""
    assert streams(cells[SETUP]) == ""


def test_no_errors(cells):
    """Every cell runs without an error."""
    errors = [o for c in cells.values() for o in c.outputs if o.output_type == "error"]
    assert not errors, errors[0].get("evalue")


@pytest.mark.parametrize("plot", PLOTS)
@pytest.mark.parametrize("cell", [as_value, for_effect])
def test_each_plot_shows_one_image(cells, plot, cell):
    """Each plot shows one image, as the cell's value and when made for its effect (still returned)."""
    executed = cells[cell(plot)]
    assert png_outputs(executed) == 1
    if cell is for_effect:
        assert streams(executed) == "NotebookFigure\n"


def test_fit_bars_and_table_in_place(cells):
    """A 3-epoch fit: one output per bar (a line at most), one table of header + 3 lines, no stream."""
    outputs = cells[FIT].outputs
    assert not [o for o in outputs if o.output_type == "stream"]
    bars = [o for o in outputs if "text/html" in o.get("data", {})]
    assert len(bars) == 2 and sum("<progress" in o.data["text/html"] for o in bars) == 1
    assert all(len(o.data["text/plain"].splitlines()) <= 1 for o in bars)
    assert "epoch: 100%" in bars[0].data["text/plain"]
    (table,) = [
        o for o in outputs if "valid_loss" in o.get("data", {}).get("text/plain", "")
    ]
    lines = table.data["text/plain"].splitlines()
    assert lines[0].split()[:2] == ["epoch", "train_loss"]
    assert [line.split()[0] for line in lines[1:]] == ["0", "1", "2"]
    text = "".join(str(o.get("data", "")) + o.get("text", "") for o in outputs)
    assert "\r" not in text and "\x1b" not in text


def test_lr_find_shows_plot_and_is_a_float(cells):
    """`lr = learn.lr_find()` shows the sweep's plot once; `lr` is a float."""
    assert png_outputs(cells[LR_FIND]) == 1
    assert streams(cells[LR_FIND]) == "LRFindResult True\n"


def test_lr_find_then_plot_shows_once(cells):
    """`lr = learn.lr_find(); lr.plot()` in one cell shows the sweep once, not twice."""
    assert png_outputs(cells[LR_FIND_AND_PLOT]) == 1


def test_hundred_plots_in_a_loop(cells):
    """100 plot_loss calls in a loop: no too-many-figures warning, and each shows."""
    assert streams(cells[LOOP]) == "warnings: []\n"
    assert png_outputs(cells[LOOP]) == 100


def test_live_plot_one_image(cells):
    """ProgressCB(plot=True) shows one image for the whole fit, updated in place."""
    assert png_outputs(cells[LIVE_PLOT]) == 1


def test_with_pyplot_inline(cells):
    """With `%matplotlib inline` and a pyplot figure too, each figure still shows once."""
    assert png_outputs(cells[WITH_PYPLOT]) == 2
