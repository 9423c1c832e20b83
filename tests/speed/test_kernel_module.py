"""Tests that the fast path's passes keep every kernel module as one call (`KernelModule`)."""

from __future__ import annotations

import pytest
import torch
from block_nets import Bottleneck
from tensor_checks import nhwc
from torch import nn

from resnext.speed import pointwise_fma
from resnext.speed.block_fusion import FusedBlock
from resnext.speed.conv_x3_swap import ConvX3, DotConv1x1, FmaConv1x1, swap_convs_fma
from resnext.speed.dot_block import DotBottleneck
from resnext.speed.dot_grouped import DotPointwiseGrouped
from resnext.speed.grouped_split import SplitGroupedConv3x3
from resnext.speed.grouped_swap import FastGroupedConv3x3, NativeGroupedConv3x3
from resnext.speed.kernel_module import KernelLeafTracer, KernelModule
from resnext.speed.pointwise_fusion import FusedPointwiseGrouped
from resnext.speed.shortcut_fusion import ShortcutBlock, ShortcutConvX3, ShortcutDotConv1x1
from resnext.speed.stem_fusion import FusedStem


class Scale(KernelModule):
    """A stand-in kernel module: its factor a plain tensor attribute, as our packed weights are."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.factor = torch.linspace(0.5, 1.5, channels).view(1, channels, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.mul(x, self.factor)


def test_the_tracer_keeps_a_kernel_module_whole_and_traces_through_the_rest() -> None:
    block = Bottleneck(32, 16, 32, 1)
    block.bn3 = Scale(32)
    graph = KernelLeafTracer().trace(block)
    calls = [str(n.target) for n in graph.nodes if n.op == "call_module"]
    assert calls == ["conv1", "relu", "conv3", "bn3", "relu"]
    # a plain fx tracer would have read the factor out of it as an attribute instead
    plain = torch.fx.Tracer().trace(block)
    assert "bn3" not in [str(n.target) for n in plain.nodes if n.op == "call_module"]


@pytest.mark.skipif(pointwise_fma.unavailable_reason() is not None, reason="no FMA 1×1 kernel here")
def test_a_pass_that_rewrites_the_parent_keeps_a_kernel_module_beside_it() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(Bottleneck(32, 16, 32, 1)).eval()
    model[0].bn3 = Scale(32)
    x = nhwc(torch.randn(2, 32, 6, 6))
    with torch.no_grad():
        want = model(x)
    choices = swap_convs_fma(model, x, mode="on")
    assert {c.name for c in choices} == {"0.conv1", "0.conv3"}
    # the parent was re-traced to take the swapped 1×1s; the kernel module is still itself
    assert type(model[0].bn3) is Scale
    with torch.no_grad():
        torch.testing.assert_close(model(x), want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "cls",
    [
        FastGroupedConv3x3,
        NativeGroupedConv3x3,
        SplitGroupedConv3x3,
        FusedPointwiseGrouped,
        FusedBlock,
        ShortcutBlock,
        ConvX3,
        ShortcutConvX3,
        FmaConv1x1,
        DotConv1x1,
        ShortcutDotConv1x1,
        DotPointwiseGrouped,
        DotBottleneck,
        FusedStem,
    ],
)
def test_every_kernel_module_of_the_fast_path_is_one(cls: type) -> None:
    assert issubclass(cls, KernelModule)
