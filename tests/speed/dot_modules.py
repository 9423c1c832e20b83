"""Our bf16 kernel modules for the fusion tests: a first 1×1 on our product and a grouped 3×3
on one of our kernels, made from random convolutions."""

from __future__ import annotations

import torch
from tensor_checks import nhwc
from torch import nn

from resnext.speed.conv_x3_swap import DotConv1x1
from resnext.speed.grouped_split import SplitGroupedConv3x3, input_order
from resnext.speed.grouped_swap import FastGroupedConv3x3


def bf16(t: torch.Tensor) -> torch.Tensor:
    """`t` in bf16, channels-last."""
    return nhwc(t.to(torch.bfloat16))


def pair(
    cin: int, width: int, groups: int, stride: int, variant: str, seed: int
) -> tuple[DotConv1x1, FastGroupedConv3x3, nn.Conv2d, nn.Conv2d]:
    """A 1×1 (with its ReLU) on our product and a grouped 3×3 (with its ReLU) of `variant`,
    and the bf16 convolutions they were made from. For 'split' the 1×1 writes the split input
    order (its weight rows permuted, as `group_order` does) and the 3×3 writes the output order."""
    torch.manual_seed(seed)
    conv1 = nn.Conv2d(cin, width, 1).bfloat16()
    conv2 = nn.Conv2d(width, width, 3, stride, 1, groups=groups).bfloat16()
    with torch.no_grad():
        conv1.weight.div_(cin**0.5)
        conv2.weight.div_((9 * width // groups) ** 0.5)
    pointwise = conv1
    if variant == "split":
        order = input_order(width, groups)
        pointwise = nn.Conv2d(cin, width, 1).bfloat16()
        with torch.no_grad():
            pointwise.weight.copy_(conv1.weight[order])
            pointwise.bias.copy_(conv1.bias[order])
        grouped: FastGroupedConv3x3 = SplitGroupedConv3x3(conv2, relu=True)
    else:
        grouped = FastGroupedConv3x3(conv2, relu=True, dtype=torch.bfloat16, variant=variant)
    return DotConv1x1(pointwise, relu=True), grouped, conv1, conv2
