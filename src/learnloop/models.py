"""Small reference models used by the `learnloop` command, the examples and the benchmarks."""

from __future__ import annotations

from torch import nn

__all__ = ["MODELS", "linear", "mlp", "simple_cnn"]


def _conv(c_in: int, c_out: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1),
        nn.BatchNorm2d(c_out),
        nn.ReLU(),
    )


def simple_cnn(
    n_in: int = 1, n_out: int = 10, widths: tuple[int, ...] = (16, 32, 64)
) -> nn.Module:
    """A small CNN for any image size: stride-2 convolutions, then global average pooling."""
    layers, c = [], n_in
    for i, w in enumerate(widths):
        layers.append(_conv(c, w, stride=1 if i == 0 else 2))
        c = w
    return nn.Sequential(
        *layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, n_out)
    )


def mlp(n_in: int = 784, n_out: int = 10, hidden: int = 50) -> nn.Module:
    """Flatten, one hidden ReLU layer, then a linear classifier."""
    return nn.Sequential(
        nn.Flatten(), nn.Linear(n_in, hidden), nn.ReLU(), nn.Linear(hidden, n_out)
    )


def linear(n_in: int = 784, n_out: int = 10) -> nn.Module:
    """Flatten, then a single linear layer (logistic regression)."""
    return nn.Sequential(nn.Flatten(), nn.Linear(n_in, n_out))


MODELS = {"cnn": simple_cnn, "mlp": mlp, "linear": linear}
