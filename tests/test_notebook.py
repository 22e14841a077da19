"""learnloop.notebook and learnloop.figure: figures show once in a notebook, outputs update in place.

In-process, with `FakeKernel` (tests/helpers.py) standing in for the Jupyter kernel; the same
behaviour in a real kernel is tested in test_notebook_kernel.py.
"""

from __future__ import annotations

import base64
import io
import struct
import warnings

import matplotlib
import pytest
from helpers import FakeKernel, make_dls
from matplotlib import pyplot as plt
from torch import nn

from learnloop import (
    ActivationStatsCB,
    Learner,
    LRFindResult,
    ProfileReport,
    ProgressCB,
)
from learnloop.data import DataLoaders, Normalize, load_digits
from learnloop.figure import NotebookFigure, new_figure, png_data
from learnloop.notebook import LiveOutput, NotebookBar, in_notebook, show_at_cell_end


@pytest.fixture
def kernel(monkeypatch) -> FakeKernel:
    return FakeKernel().install(monkeypatch)


@pytest.fixture(scope="module")
def fitted():
    """A small learner fitted on the embedded digits, with activation statistics and a sweep."""
    dls = DataLoaders.from_dd(
        load_digits(), 256, batched=True, batch_tfms=[Normalize(4.9, 6.0)]
    )
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10))
    learn = Learner(model, dls, lr=0.1, cbs=[ProgressCB(file=io.StringIO())])
    stats = ActivationStatsCB(nn.ReLU)
    learn.fit(1, cbs=[stats])
    lr = learn.lr_find(num_it=20, show_plot=False)
    return learn, stats, lr


PLOTS = {
    "plot_loss": lambda learn, stats, lr: learn.recorder.plot_loss(),
    "plot_lr": lambda learn, stats, lr: learn.recorder.plot_lr(),
    "lr_find plot": lambda learn, stats, lr: lr.plot(),
    "plot_stats": lambda learn, stats, lr: stats.plot_stats(),
    "color_dim": lambda learn, stats, lr: stats.color_dim(),
    "dead_chart": lambda learn, stats, lr: stats.dead_chart(),
    "show_batch": lambda learn, stats, lr: learn.dls.show_batch(n=4),
}


def png_size(data: dict) -> tuple[int, int]:
    """(width, height) of the base64 PNG in a display bundle."""
    png = base64.b64decode(data["image/png"])
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", png[16:24])


class TestInNotebook:
    def test_false_outside_a_kernel(self):
        """A test process (no IPython kernel) is not a notebook; nothing is kept for a cell's end."""
        assert not in_notebook()
        assert not show_at_cell_end(object())

    def test_true_in_a_kernel(self, kernel):
        """An IPython shell started by ipykernel is a notebook."""
        assert in_notebook()


class TestPlotsShowOnce:
    @pytest.mark.parametrize("name", list(PLOTS))
    def test_made_for_effect_shows_at_cell_end(self, kernel, fitted, name):
        """A plot made for its effect (not the cell's value) shows once, as a PNG, when the cell ends."""
        fig = PLOTS[name](*fitted)
        assert isinstance(fig, NotebookFigure) and kernel.images() == 0
        kernel.end_cell()
        kernel.end_cell()
        assert kernel.images() == 1
        width, height = fig.get_size_inches() * fig.dpi
        assert png_size(kernel.shown()[0]) == (round(width), round(height))

    @pytest.mark.parametrize("name", list(PLOTS))
    def test_cell_value_shows_once(self, kernel, fitted, name):
        """A plot that is the cell's value (IPython displays it) is not shown again when the cell ends."""
        kernel.display(PLOTS[name](*fitted))
        assert kernel.images() == 1
        kernel.end_cell()
        assert kernel.images() == 1

    @pytest.mark.parametrize("name", list(PLOTS))
    def test_no_pyplot_figures(self, fitted, name, monkeypatch):
        """No plot leaves a pyplot figure open: with pyplot warning at 1 open figure, 3 calls stay silent."""
        plt.close("all")
        monkeypatch.setitem(matplotlib.rcParams, "figure.max_open_warning", 1)
        # A pyplot-managed figure would warn at the second call (an error under pytest).
        for _ in range(3):
            PLOTS[name](*fitted)
        assert plt.get_fignums() == []

    def test_one_hook_per_shell(self, kernel):
        """However many figures a cell makes, the cell-end callback is registered once."""
        for _ in range(3):
            new_figure()
        assert len(kernel.events.callbacks["post_run_cell"]) == 1


def test_outside_notebook_plain_figure(tmp_path):
    """Outside a notebook new_figure is an ordinary Figure that saves as PNG."""
    fig = new_figure(figsize=(2, 1))
    fig.add_subplot().plot([0, 1])
    fig.savefig(tmp_path / "f.png")
    assert (tmp_path / "f.png").read_bytes()[:4] == b"\x89PNG"
    assert png_size(png_data(fig)) == (200, 100)
    assert png_data(fig)["text/plain"] == repr(fig)


def test_live_output_updates_in_place(kernel):
    """A LiveOutput is one output: the first update displays it, the next ones replace it."""
    out = LiveOutput()
    for i in range(3):
        out.update({"text/plain": str(i)})
    assert kernel.outputs == [
        [{"text/plain": "0"}, {"text/plain": "1"}, {"text/plain": "2"}]
    ]


class TestNotebookBar:
    def test_draws_tqdm_text_and_progress(self, kernel):
        """The bar shows tqdm's text (label, counts, postfix) and an HTML <progress> of n of total."""
        bar = NotebookBar(total=10, desc="train")
        bar.set_postfix_str("loss 0.5000", refresh=False)
        bar.update(4)
        data = kernel.shown()[0]
        assert (
            data["text/plain"].startswith("train:  40%|")
            and "4/10" in data["text/plain"]
        )
        assert "loss 0.5000" in data["text/plain"]
        assert '<progress value="4" max="10"' in data["text/html"]
        assert "train:  40% 4/10" in data["text/html"]

    def test_unknown_total(self, kernel):
        """Without a total the bar counts, with an indeterminate <progress>."""
        bar = NotebookBar(desc="valid")
        bar.update(3)
        data = kernel.shown()[0]
        assert (
            data["text/plain"].startswith("valid: 3it")
            and "<progress " in data["text/html"]
        )
        assert "value=" not in data["text/html"]

    @pytest.mark.parametrize(("leave", "cleared"), [(True, False), (False, True)])
    def test_close(self, kernel, leave, cleared):
        """Closing keeps the final bar, or with leave=False clears its output."""
        bar = NotebookBar(total=2, desc="valid", leave=leave)
        bar.update(2)
        bar.close()
        assert len(kernel.outputs) == 1
        assert (kernel.shown()[0]["text/plain"] == "") == cleared

    def test_invisible_until_drawn(self, kernel):
        """visible=False keeps the bar's place blank until it is reset."""
        bar = NotebookBar(leave=False, visible=False)
        assert kernel.shown() == [{"text/html": "", "text/plain": ""}]
        bar.set_description_str("train", refresh=False)
        bar.reset(total=5)
        assert kernel.shown()[0]["text/plain"].startswith("train:   0%")


# The calls that draw their result in a notebook, and the result's class.
SHOWN = {
    "lr_find": (
        lambda learn, show: learn.lr_find(num_it=10, show_plot=show),
        LRFindResult,
    ),
    "profile": (
        lambda learn, show: learn.profile(n_batches=3, show_plot=show),
        ProfileReport,
    ),
}


@pytest.mark.parametrize("call", list(SHOWN))
class TestShowPlot:
    @pytest.mark.parametrize(
        ("show_plot", "images"), [(None, 1), (True, 1), (False, 0)]
    )
    def test_in_a_notebook(self, kernel, call, show_plot, images):
        """`lr = learn.lr_find()` and `learn.profile()` show their plot when the cell ends (not with show_plot=False)."""
        run, kind = SHOWN[call]
        learn = Learner(nn.Linear(4, 3), make_dls(), default_cbs=False)
        result = run(learn, show_plot)
        kernel.end_cell()
        assert kernel.images() == images and isinstance(result, kind)

    @pytest.mark.parametrize("show_plot", [None, True])
    def test_outside_a_notebook(self, monkeypatch, call, show_plot):
        """Outside a notebook nothing is drawn; show_plot=True says where the plot shows."""
        run, kind = SHOWN[call]
        drawn = []
        monkeypatch.setattr(kind, "plot", lambda self: drawn.append(self))
        learn = Learner(nn.Linear(4, 3), make_dls(), default_cbs=False)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            run(learn, show_plot)
        assert drawn == []
        said = [str(w.message) for w in caught if "notebook only" in str(w.message)]
        assert len(said) == int(bool(show_plot))
