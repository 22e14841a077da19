"""Builders for the data tests: small image datasets made by the tests themselves."""

from __future__ import annotations

import datasets


def image_dataset(
    n: int = 10, size: tuple[int, int] = (6, 5), mode: str = "L", odd: int | None = None
):
    """An in-memory Dataset with an Image column (PNG-encoded) and a ClassLabel; image `odd` is 1px wider."""
    from PIL import Image

    images = []
    for i in range(n):
        w, h = size
        color = (i * 20, 255 - i * 20, 7) if mode == "RGB" else i * 20
        images.append(Image.new(mode, (w + (i == odd), h), color=color))
    features = datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(names=["x", "y"])}
    )
    return datasets.Dataset.from_dict(
        {"image": images, "label": [i % 2 for i in range(n)]}, features=features
    )
