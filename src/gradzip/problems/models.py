"""Models: linear (least squares, logistic, softmax), an MLP and a small CNN."""

from __future__ import annotations

import torch
from torch import nn


def linear(d_in: int, d_out: int = 1) -> nn.Module:
    """Least squares, logistic regression (d_out = 1) or softmax regression."""
    m = nn.Linear(d_in, d_out)
    nn.init.zeros_(m.weight)
    nn.init.zeros_(m.bias)
    return m


def mlp(d_in: int, n_classes: int, hidden: int = 128) -> nn.Module:
    return nn.Sequential(
        nn.Flatten(), nn.Linear(d_in, hidden), nn.ReLU(), nn.Linear(hidden, n_classes)
    )


def cnn(n_classes: int = 10, channels: int = 1, width: int = 16) -> nn.Module:
    """A small CNN for 28x28 images (about 0.2M parameters at width 16)."""
    return nn.Sequential(
        nn.Conv2d(channels, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(2 * width * 7 * 7, 128), nn.ReLU(), nn.Linear(128, n_classes),
    )  # fmt: skip


def init_(model: nn.Module, seed: int) -> nn.Module:
    """Re-initialize ``model`` deterministically from ``seed`` (the global RNG untouched)."""
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        for m in model.modules():
            if hasattr(m, "reset_parameters") and not isinstance(m, nn.Linear | nn.Conv2d):
                m.reset_parameters()
            elif isinstance(m, nn.Linear | nn.Conv2d):
                m.reset_parameters()
    finally:
        torch.random.set_rng_state(state)
    return model
