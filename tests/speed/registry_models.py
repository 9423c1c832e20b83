"""Registry models for the fast paths' same-function tests: which are small enough, their inputs."""

from __future__ import annotations

import torch
from torch import nn

import resnext

MAX_PARAMS = 10_000_000  # larger registry models take too long to build for a fast test


def param_count(name: str) -> int:
    """Parameters of registry model `name`, counted without allocating them."""
    with torch.device("meta"):
        return sum(p.numel() for p in resnext.create_model(name).parameters())


def small_input(model: nn.Module) -> torch.Tensor:
    """A batch of 2 at a small size the model's stem takes (32² CIFAR, else 64²)."""
    size = 32 if model.spec.stem == "cifar" else 64
    return torch.randn(2, model.spec.in_chans, size, size)


def randomize_bn(model: nn.Module) -> None:
    """Non-trivial batch-norm statistics and affines, so that a wrong fold or block shows."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_(0.0, 0.1)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.normal_(0.0, 0.1)
