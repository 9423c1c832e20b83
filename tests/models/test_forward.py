"""Every registered model runs forward and backward on a small input with the right output shapes."""

from __future__ import annotations

import pytest
import torch

import resnext

# 468 M and 828 M parameters: 10-20 s each to build and run here. Their code is 32x16d's at wider
# layers; test_complexity checks their parameter counts, built on the meta device.
LARGEST = ("resnext101_32x32d", "resnext101_32x48d")


@pytest.mark.parametrize("name", [n for n in resnext.list_models() if n not in LARGEST])
def test_forward_backward(name: str) -> None:
    model = resnext.create_model(name, num_classes=7)
    size = 32 if model.spec.stem == "cifar" else 64
    x = torch.randn(2, 3, size, size, requires_grad=True)
    y = model(x)
    assert y.shape == (2, 7)
    assert torch.isfinite(y).all()
    y.square().mean().backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None for g in grads)
    assert x.grad is not None and x.grad.abs().sum() > 0
    # Stage maps: strides 4/8/16/32 (ImageNet layouts) or 1/2/4 (CIFAR).
    model.eval()
    with torch.no_grad():
        maps = model.forward_stages(x)
    for fmap, info in zip(maps, model.feature_info[1:], strict=True):
        assert fmap.shape[1] == info["num_chs"]
        assert fmap.shape[-1] == -(-size // info["reduction"])
