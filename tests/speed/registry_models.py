"""Registry models for the fast paths' same-function tests: which are small enough, their inputs."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import resnext
from resnext.models import complexity

MAX_PARAMS = 10_000_000  # larger registry models take 1-4 s each to build and test
# Larger models tested all the same: one per structure of the zoo at full ImageNet width (the
# ResNet baseline, the 32 × 4d headline, 14-channel groups, deep stem with pooled shortcuts,
# squeeze-excitation), where layers reach widths (up to 2,048 channels) no small model has.
FULL_WIDTH = (
    "resnet50",
    "resnext50_32x4d",
    "resnext50_8x14d",
    "resnext50d_32x4d",
    "seresnext50_32x4d",
)

# Each spec option the zoo's models use beyond the default bottleneck, as ModelSpec fields.
OPTION_VARIANTS = {
    "deep_stem_avg_down": {"stem": "deep", "avg_down": True},
    "squeeze_excitation": {"se_reduction": 4},
    "preactivation": {"stem": "cifar", "preact": True},
    "no_residual": {"residual": False},
    "stride_in_1x1": {"stride_in_1x1": True},
    "form_a": {"block_form": "a"},
    "form_b": {"block_form": "b"},
}


def param_count(name: str) -> int:
    """Parameters of registry model `name`, counted without allocating them."""
    return complexity.param_count(resnext.get_spec(name))


def skip_if_too_large(name: str) -> None:
    """Skip the calling test, with the reason, for a registry model too large to build fast
    that is not one of the `FULL_WIDTH` models."""
    if name not in FULL_WIDTH and param_count(name) > MAX_PARAMS:
        pytest.skip(
            f"{name}: over {MAX_PARAMS:,} parameters, too slow to build in a fast test "
            "(FULL_WIDTH's models stand for the zoo at full width)"
        )


def registry_model_and_input(name: str) -> tuple[nn.Module, torch.Tensor]:
    """Registry model `name` in eval mode with randomized batch norms, and a small input for it;
    the calling test skipped where the model is too large (`skip_if_too_large`)."""
    skip_if_too_large(name)
    model = resnext.create_model(name).eval()
    randomize_bn(model)
    return model, small_input(model)


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
