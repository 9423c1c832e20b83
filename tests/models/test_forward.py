"""Every registered model runs forward and backward on a small input with the right output shapes."""

from __future__ import annotations

import pytest
import torch

import resnext


@pytest.mark.parametrize("name", resnext.list_models())
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
