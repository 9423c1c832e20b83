"""BN folding: the folded model computes the same function, checked against an unfolded reference."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import resnext
from resnext.speed.fold import count_batchnorms, fold_batchnorm, fold_conv_bn_weights


def _randomize_bn(model: nn.Module) -> None:
    """Non-trivial BN statistics, so that folding is actually exercised."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.normal_()
            m.bias.data.normal_()


def test_fold_matches_hand_computed_affine() -> None:
    # A 1×1 conv with weight 2, then BN with mean 1, var 3, eps 1, gamma 4, beta 5:
    # y = 4 * (2x - 1) / sqrt(3 + 1) + 5 = 4x + 3.
    conv = nn.Conv2d(1, 1, 1, bias=False)
    conv.weight.data.fill_(2.0)
    bn = nn.BatchNorm2d(1, eps=1.0)
    bn.running_mean.fill_(1.0)
    bn.running_var.fill_(3.0)
    bn.weight.data.fill_(4.0)
    bn.bias.data.fill_(5.0)
    weight, bias = fold_conv_bn_weights(conv, bn)
    assert weight.item() == pytest.approx(4.0)
    assert bias.item() == pytest.approx(3.0)


@pytest.mark.parametrize(
    ("name", "preact"),
    [("resnext_tiny", False), ("resnext_tiny_in", False), ("resnext_tiny", True)],
)
def test_folded_model_equals_eager(name: str, preact: bool) -> None:
    model = resnext.create_model(name, preact=preact).eval()
    _randomize_bn(model)
    folded = fold_batchnorm(model)
    x = torch.randn(2, model.spec.in_chans, 32, 32)
    with torch.no_grad():
        expected, got = model(x), folded(x)
    assert torch.allclose(got, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())
    assert count_batchnorms(folded) < count_batchnorms(model)
    assert count_batchnorms(model) > 0  # the original is untouched


def test_preactivation_bn_is_kept() -> None:
    # A BN before its conv (through a ReLU) cannot be folded into that conv; it must stay.
    model = nn.Sequential(nn.BatchNorm2d(3), nn.ReLU(), nn.Conv2d(3, 4, 3)).eval()
    _randomize_bn(model)
    folded = fold_batchnorm(model)
    assert count_batchnorms(folded) == 1


def test_conv_used_twice_is_not_folded() -> None:
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 1)
            self.bn = nn.BatchNorm2d(3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.conv(x)
            return self.bn(y) + y

    model = Twice().eval()
    _randomize_bn(model)
    folded = fold_batchnorm(model)
    x = torch.randn(1, 3, 4, 4)
    assert count_batchnorms(folded) == 1
    with torch.no_grad():
        assert torch.allclose(folded(x), model(x))


class _Twice(nn.Module):
    """Calls its ReLU twice and its convolution once."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 1)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.conv(self.act(x)))


class _Untraceable(nn.Module):
    """A parent whose forward branches on a tensor's value, which fx cannot trace."""

    def __init__(self) -> None:
        super().__init__()
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(x) if x.sum() > 0 else x


def test_child_calls_walks_each_parent_of_a_matching_child() -> None:
    from torch import fx

    from resnext.speed.fold import child_calls, parents_of

    model = nn.Sequential(nn.ReLU(), _Twice(), nn.Sequential(_Twice()), _Untraceable())
    is_relu = lambda m: isinstance(m, nn.ReLU)  # noqa: E731
    # the root's own ReLU is never a site; the untraceable parent is listed but yields nothing
    assert parents_of(model, is_relu) == {"1", "2.0", "3"}
    calls = [
        (parent, str(node.target), counts[str(node.target)], counts["conv"])
        for parent, node, modules, counts in child_calls(model, is_relu, fx.Tracer)
        if isinstance(modules[str(node.target)], nn.ReLU)
    ]
    # each call of a matching child, parents in name order, with the parent's call counts
    assert calls == [
        ("1", "act", 2, 1),
        ("1", "act", 2, 1),
        ("2.0", "act", 2, 1),
        ("2.0", "act", 2, 1),
    ]
