"""Batch transforms for the batched path: tensor ops on a whole batch dict `{column: tensor}`.

Each is a callable that takes the batch and returns it. Augmentations set `train_only = True`,
so `DataLoaders.from_dd(..., batched=True, batch_tfms=[...])` leaves them off the validation loader.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["Normalize", "RandomCrop", "RandomFlip"]


def _per_channel(v: float | Sequence[float]) -> Tensor:
    t = torch.as_tensor(v, dtype=torch.float32)
    # One value: any layout.
    return t.reshape(1, -1, 1, 1) if t.numel() > 1 else t.reshape(())


class Normalize:
    """`(b[key].float() - mean) / std`, with `mean`/`std` in the stored units (0..255 for uint8 images).

    Example:
        >>> norm = Normalize.from_tensor(torch.randint(0, 256, (100, 1, 4, 4), dtype=torch.uint8))
        >>> norm({"image": torch.zeros(2, 1, 4, 4, dtype=torch.uint8)})["image"].dtype
        torch.float32
    """

    train_only = False

    def __init__(
        self,
        mean: float | Sequence[float],
        std: float | Sequence[float],
        key: str = "image",
    ) -> None:
        self.mean, self.std, self.key = _per_channel(mean), _per_channel(std), key
        if (self.std <= 0).any():
            raise ValueError(f"Normalize std must be positive, got {std}.")

    @classmethod
    def from_tensor(cls, x: Tensor, key: str = "image") -> Normalize:
        """Per-channel mean and std of a `(N, C, H, W)` batch of images `x` (e.g. the training images)."""
        if x.ndim != 4:
            raise ValueError(
                f"Normalize.from_tensor expects (N, C, H, W) images, got shape {tuple(x.shape)}."
            )
        x = x.float().transpose(0, 1).reshape(x.shape[1], -1)
        return cls(x.mean(dim=1).tolist(), x.std(dim=1).clamp_min(1e-6).tolist(), key)

    def __call__(self, b: dict[str, Tensor]) -> dict[str, Tensor]:
        b[self.key] = (b[self.key].float() - self.mean) / self.std
        return b

    def __repr__(self) -> str:
        return f"Normalize(mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()})"


class RandomFlip:
    """Flip each image of `b[key]` left-right with probability `p` (training only)."""

    train_only = True

    def __init__(self, p: float = 0.5, key: str = "image") -> None:
        self.p, self.key = p, key

    def __call__(self, b: dict[str, Tensor]) -> dict[str, Tensor]:
        x = b[self.key]
        flip = torch.rand(len(x)) < self.p
        b[self.key] = torch.where(flip.reshape(-1, *[1] * (x.ndim - 1)), x.flip(-1), x)
        return b


class RandomCrop:
    """Pad `b[key]` by `padding` pixels (zeros) and crop back to size at one random offset per batch."""

    train_only = True

    def __init__(self, padding: int = 2, key: str = "image") -> None:
        self.padding, self.key = padding, key

    def __call__(self, b: dict[str, Tensor]) -> dict[str, Tensor]:
        x, p = b[self.key], self.padding
        h, w = x.shape[-2:]
        padded = torch.nn.functional.pad(x, (p, p, p, p))
        i, j = torch.randint(0, 2 * p + 1, (2,)).tolist()
        b[self.key] = padded[..., i : i + h, j : j + w]
        return b
