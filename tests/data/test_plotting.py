"""Image plots: show_image, subplots, get_grid, show_images, and DataLoaders.show_batch."""

from __future__ import annotations

import inspect
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

plt = pytest.importorskip("matplotlib.pyplot")

from learnloop.data import DataLoaders, get_grid, show_image, show_images, subplots
from learnloop.figure import NotebookFigure


@pytest.fixture(autouse=True)
def _close_figures():
    """Each test starts and ends with no open figures."""
    plt.close("all")
    yield
    plt.close("all")


@pytest.mark.parametrize(
    ("im", "shape"),
    [
        (torch.rand(3, 5, 4, requires_grad=True), (5, 4, 3)),  # CHW with grad
        (torch.rand(1, 5, 4), (5, 4)),  # one channel
        (torch.randint(0, 255, (5, 4), dtype=torch.uint8), (5, 4)),  # HW
        (np.zeros((5, 4, 3), dtype=np.uint8), (5, 4, 3)),  # numpy HWC
    ],
)
def test_show_image_inputs(im, shape):
    """Tensors (CHW or HW, with grad), numpy arrays display with the right shape and a title."""
    ax = show_image(im, title="t")
    assert ax.images[0].get_array().shape == shape and ax.get_title() == "t"


def test_show_image_pil_and_rescale():
    """PIL images display; float images outside [0, 1] are rescaled into it."""
    from PIL import Image

    assert show_image(Image.new("RGB", (4, 5))).images[0].get_array().shape == (5, 4, 3)
    arr = show_image(torch.tensor([[-2.0, 0.0], [2.0, 1.0]])).images[0].get_array()
    assert arr.min() == 0 and arr.max() == 1


@pytest.mark.parametrize(
    ("n", "kw", "grid"),
    [(10, {}, (3, 4)), (5, {"nrows": 1}, (5,)), (5, {"ncols": 2}, (3, 2))],
)
def test_get_grid_holds_n(n, kw, grid):
    """The grid has room for n images; the unused axes are hidden."""
    _fig, axs = get_grid(n, **kw)
    assert axs.shape == grid
    assert [ax.axison for ax in axs.flat] == [True] * n + [False] * (axs.size - n)


def test_get_grid_too_small():
    """A grid that cannot hold the images is refused."""
    with pytest.raises(ValueError, match="cannot hold 5"):
        get_grid(5, nrows=2, ncols=2)


def test_show_images_titles():
    """Each image gets its title, in order."""
    show_images([torch.rand(4, 4) for _ in range(3)], titles=["a", "b", "c"], imsize=1)
    assert [ax.get_title() for ax in plt.gcf().axes if ax.images] == ["a", "b", "c"]


def test_subplots_one_axis_is_an_array():
    """A single axis still comes back as an array, sized by imsize."""
    fig, axs = subplots(imsize=2)
    assert axs.shape == (1,) and tuple(fig.get_size_inches()) == (2, 2)


@pytest.mark.parametrize(
    ("f", "name"), [(show_image, "cmap"), (subplots, "sharex"), (show_images, "imsize")]
)
def test_delegated_signatures(f, name):
    """help() shows matplotlib's own keyword arguments (fastcore.meta.delegates)."""
    assert name in inspect.signature(f).parameters


def test_import_is_light():
    """Importing learnloop does not import matplotlib or datasets (they load when used)."""
    code = "import sys, learnloop, learnloop.data; print('matplotlib' in sys.modules, 'datasets' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code], check=False, capture_output=True, text=True
    )
    assert out.stdout.split() == ["False", "False"], out.stderr


def batch_dls(images: torch.Tensor) -> DataLoaders:
    """DataLoaders whose training loader yields `images` and their labels 0..N-1 in one batch."""
    ds = TensorDataset(images, torch.arange(len(images)))
    return DataLoaders(DataLoader(ds, batch_size=len(images)), None)


class TestShowBatch:
    @pytest.mark.parametrize(
        ("images", "shown"),
        [
            (torch.rand(6, 5, 7), (5, 7)),  # (N, H, W)
            (torch.rand(6, 3, 5, 7), (5, 7, 3)),  # (N, C, H, W)
            (torch.rand(6, 64), (8, 8)),  # flattened grey, H == W
            (torch.rand(6, 3 * 16), (4, 4, 3)),  # flattened RGB (N, 3*H*W)
        ],
    )
    def test_shapes(self, images, shown):
        """Image batches show as they are; flattened square ones are made square again."""
        fig = batch_dls(images).show_batch(n=4)
        drawn = [ax for ax in fig.axes if ax.images]
        assert len(drawn) == 4 and [ax.get_title() for ax in drawn] == [
            "0",
            "1",
            "2",
            "3",
        ]
        assert all(ax.images[0].get_array().shape == shown for ax in drawn)

    def test_flattened_pixels_in_place(self):
        """A flattened image is drawn row by row, as it was before flattening."""
        image = torch.arange(16.0).reshape(4, 4) / 15
        fig = batch_dls(image.reshape(1, 16)).show_batch(n=1)
        assert np.allclose(fig.axes[0].images[0].get_array(), image.numpy())

    @pytest.mark.parametrize("shape", [(6, 10), (6,), (6, 2, 3, 4, 5)])
    def test_not_images(self, shape):
        """Inputs that are not images, flattened or not, say which shapes work and which came."""
        with pytest.raises(
            ValueError,
            match=rf"show_batch needs images.*got inputs of shape {re.escape(str(shape))}",
        ):
            batch_dls(torch.rand(*shape)).show_batch()

    def test_grid_and_no_pyplot(self):
        """The grid holds n images (unused axes hidden), sized imsize per image, on a figure pyplot does not hold."""
        fig = batch_dls(torch.rand(6, 64)).show_batch(n=5, ncols=3, imsize=1)
        assert isinstance(fig, NotebookFigure) and plt.get_fignums() == []
        assert [bool(ax.images) for ax in fig.axes] == [True] * 5 + [False]
        assert tuple(fig.get_size_inches()) == (3, 2)
