"""Fixtures for the data tests (builders live in tests/image_helpers.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
from image_helpers import image_dataset


@pytest.fixture
def png_dir(tmp_path: Path) -> Path:
    """A folder with train.parquet (10 PNG images) and test.parquet (4), as the hub stores images."""
    image_dataset(10).to_parquet(tmp_path / "train.parquet")
    image_dataset(4).to_parquet(tmp_path / "test.parquet")
    return tmp_path
