"""Batch transforms: Normalize, RandomFlip, RandomCrop."""

from __future__ import annotations

import pytest
import torch

from learnloop.data import Normalize, RandomCrop, RandomFlip


def _batch(n: int = 8, c: int = 3) -> dict[str, torch.Tensor]:
    return {
        "image": torch.randint(0, 256, (n, c, 6, 6), dtype=torch.uint8),
        "label": torch.arange(n),
    }


class TestNormalize:
    def test_from_tensor(self):
        """Stats from the data make each channel of the result mean 0, std 1, in float32."""
        b = _batch(64)
        out = Normalize.from_tensor(b["image"])(dict(b))["image"]
        assert out.dtype == torch.float32
        assert torch.allclose(out.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-5)
        assert torch.allclose(out.std(dim=(0, 2, 3)), torch.ones(3), atol=1e-4)

    def test_scalar_on_hw_images(self):
        """One mean and std apply to images without a channel axis too."""
        out = Normalize(1.0, 2.0)(
            {"image": torch.full((2, 4, 4), 5, dtype=torch.uint8)}
        )["image"]
        assert out.shape == (2, 4, 4) and torch.all(out == 2.0)

    def test_bad_std(self):
        """A non-positive std is refused."""
        with pytest.raises(ValueError, match="std must be positive"):
            Normalize(0.0, 0.0)


@pytest.mark.parametrize("p", [0.0, 1.0])
def test_random_flip(p):
    """p=1 flips every image left-right, p=0 none; the transform is training-only."""
    b = _batch()
    x = b["image"].clone()
    out = RandomFlip(p)(b)["image"]
    assert torch.equal(out, x.flip(-1) if p else x) and RandomFlip.train_only


def test_random_crop():
    """The crop keeps the size and shifts the content by at most `padding` pixels."""
    torch.manual_seed(1)
    x = torch.arange(36.0).reshape(1, 1, 6, 6)
    out = RandomCrop(padding=1)({"image": x})["image"]
    assert out.shape == x.shape
    shifts = [(i, j) for i in range(-1, 2) for j in range(-1, 2)]
    padded = torch.nn.functional.pad(x, (1, 1, 1, 1))
    assert any(
        torch.equal(out, padded[..., 1 + i : 7 + i, 1 + j : 7 + j]) for i, j in shifts
    )
    assert torch.equal(RandomCrop(padding=0)({"image": x})["image"], x)
