"""Shared fixtures: a tiny synthetic classification task and an in-memory `datasets.Dataset`."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from helpers import make_dls
from torch import nn

from learnloop import DataLoaders

FASHION_MNIST = (
    Path(__file__).resolve().parents[1].parent / "shared" / "data" / "fashion_mnist"
)


@pytest.fixture(autouse=True)
def _seed_and_threads():
    """Every test starts from the same seed, on one thread (faster for tiny models, deterministic)."""
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def dls() -> DataLoaders:
    """Tiny synthetic DataLoaders: 96 train rows (6 batches), 48 valid rows (2 batches), 4 features, 3 classes."""
    return make_dls()


@pytest.fixture
def model() -> nn.Module:
    """A linear classifier for `dls`."""
    return nn.Linear(4, 3)


@pytest.fixture
def tqdm_bars(monkeypatch) -> list:
    """Every tqdm bar made during the test, in order; a bar's `closed` turns True when it is closed."""
    import tqdm

    made = []

    class Recorded(tqdm.tqdm):
        def __init__(self, *args, **kwargs):
            self.closed = False
            super().__init__(*args, **kwargs)
            self.first_desc = kwargs.get("desc")
            made.append(self)

        def close(self):
            self.closed = True
            super().close()

    monkeypatch.setattr(tqdm, "tqdm", Recorded)
    return made


@pytest.fixture
def hf_dataset():
    """An in-memory Hugging Face Dataset with an 8x8 image column and a ClassLabel column."""
    datasets = pytest.importorskip("datasets")
    features = datasets.Features(
        {
            "image": datasets.Array2D((8, 8), "uint8"),
            "label": datasets.ClassLabel(names=["a", "b", "c"]),
        }
    )
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 255, (30, 8, 8), generator=g, dtype=torch.uint8).numpy()
    return datasets.Dataset.from_dict(
        {"image": images, "label": [i % 3 for i in range(30)]}, features=features
    )


@pytest.fixture
def fashion_mnist_dir() -> Path:
    """The offline Fashion-MNIST parquet folder; the test is skipped where it is absent."""
    path = Path(os.environ.get("LEARNLOOP_FASHION_MNIST", FASHION_MNIST))
    if not (path / "train.parquet").exists():
        pytest.skip(f"Fashion-MNIST not found at {path}")
    return path
