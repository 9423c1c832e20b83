"""The bf16 grouped 3×3 on channels in the "split" order: no lane of a register crosses a group.

For 4 or 8 channels per group, the pair kernels in channel order (`grouped_kernel`, packing 1)
spend a third of their time moving lanes: a 32-channel register holds pairs of several groups,
so each output's sum is spread over lanes. `kernels/grouped3x3_split.h` reads its input and
writes its output in another order of the channels, block by block of 16 groups:

- input position ``32 r + 2 g + k`` of a block holds channel ``cpg·g + 2r + k`` (pair r of group g),
- output position ``16 o + g`` holds channel ``cpg·g + o`` (output o of group g),

so that every dot product adds into the right output in place. Inside a ResNeXt bottleneck the
order costs nothing: the 1×1 before the grouped 3×3 writes its outputs in the input order and
the 1×1 after reads its inputs in the output order, their weights permuted once
(`resnext.speed.group_order`). `input_order` and `output_order` give the two permutations:
``x_split = x[:, input_order(...)]``, ``y_split = y[:, output_order(...)]``.
"""

from __future__ import annotations

import torch
from torch import nn

from resnext.speed import grouped_kernel, operators
from resnext.speed.capability import has_avx512_bf16
from resnext.speed.grouped_swap import FastGroupedConv3x3
from resnext.speed.operators import check_bias

SPLIT_CPG = (4, 8)  # channels per group the split kernels take
GROUPS_PER_BLOCK = 16  # one float32 register's lanes: a block is 16 groups
PACKING = 3  # the C entry's packing number for these kernels


def supports(channels: int, groups: int, stride: int) -> bool:
    """Whether the split kernels take a 3×3 conv of `channels` (in = out) in `groups`."""
    if groups < 1 or channels % groups:
        return False
    cpg = channels // groups
    return cpg in SPLIT_CPG and groups % GROUPS_PER_BLOCK == 0 and stride in (1, 2)


def unavailable_reason() -> str | None:
    """None if the split kernels can run here, else why not (one line)."""
    if not has_avx512_bf16():
        return "this CPU lacks avx512_bf16"
    return grouped_kernel.unavailable_reason(torch.bfloat16)


def _check_shape(channels: int, groups: int) -> int:
    if not supports(channels, groups, 1):
        raise ValueError(
            f"channels: expected {SPLIT_CPG} channels per group in whole blocks of "
            f"{GROUPS_PER_BLOCK} groups, got {channels} channels in {groups} groups"
        )
    return channels // groups


def input_order(channels: int, groups: int) -> torch.Tensor:
    """The channel each input position holds: position 32r + 2g + k of a block of 16 groups is
    channel cpg·g + 2r + k of that block."""
    cpg = _check_shape(channels, groups)
    block = torch.arange(channels // (GROUPS_PER_BLOCK * cpg)).view(-1, 1, 1, 1)
    r = torch.arange(cpg // 2).view(1, -1, 1, 1)
    g = torch.arange(GROUPS_PER_BLOCK).view(1, 1, -1, 1)
    k = torch.arange(2).view(1, 1, 1, -1)
    return (block * GROUPS_PER_BLOCK * cpg + cpg * g + 2 * r + k).flatten()


def output_order(channels: int, groups: int) -> torch.Tensor:
    """The channel each output position holds: position 16o + g of a block is channel cpg·g + o."""
    cpg = _check_shape(channels, groups)
    block = torch.arange(channels // (GROUPS_PER_BLOCK * cpg)).view(-1, 1, 1)
    o = torch.arange(cpg).view(1, -1, 1)
    g = torch.arange(GROUPS_PER_BLOCK).view(1, 1, -1)
    return (block * GROUPS_PER_BLOCK * cpg + cpg * g + o).flatten()


def pack_weights(weight: torch.Tensor, groups: int) -> torch.Tensor:
    """The (C, C/groups, 3, 3) weight as the split kernels read it: bf16 [C/B][9][cpg][cpg/2][32]
    for blocks of B = 16·cpg channels, value 2g + k of vector (o, r) the weight from input 2r + k
    of group g of the block to its output o."""
    out_ch, cpg, kh, kw = weight.shape
    if (kh, kw) != (3, 3) or out_ch != cpg * groups:
        raise ValueError(
            f"weight: expected a (C, C/groups, 3, 3) grouped weight, got shape "
            f"{tuple(weight.shape)} with groups={groups}"
        )
    _check_shape(out_ch, groups)
    blocks = out_ch // (GROUPS_PER_BLOCK * cpg)
    # (block, g, o, r, k, tap) -> (block, tap, o, r, g, k)
    w = weight.detach().float().reshape(blocks, GROUPS_PER_BLOCK, cpg, cpg // 2, 2, 9)
    return w.permute(0, 5, 2, 3, 1, 4).contiguous().to(torch.bfloat16)


def run_split(
    x: torch.Tensor,
    packed: torch.Tensor,
    bias: torch.Tensor | None,
    groups: int,
    stride: int,
    relu: bool = False,
) -> torch.Tensor:
    """The grouped 3×3 (padding 1, then ReLU if `relu`) of a bf16 channels-last `x` whose
    channels are in `input_order`, with `packed` = pack_weights(w) and `bias` in `output_order`;
    the output's channels are in `output_order`."""
    operators.check_bf16_input("the split grouped kernel", x)
    check_packed(x.shape[1], groups, stride, packed, bias)
    return grouped_kernel.call_kernel(x, packed, bias, groups, stride, relu, PACKING)


def check_packed(
    channels: int, groups: int, stride: int, packed: torch.Tensor, bias: torch.Tensor | None
) -> None:
    """A ValueError naming the argument that does not fit unless the split kernels take this
    shape with `packed` = pack_weights(w) and `bias` in `output_order` (or None)."""
    c = channels  # the messages' name for it
    if not supports(c, groups, stride):
        raise ValueError(
            f"x: {c} channels in {groups} groups with stride {stride} is not a shape the split "
            f"kernels take ({SPLIT_CPG} channels per group, groups a multiple of "
            f"{GROUPS_PER_BLOCK}, stride 1 or 2)"
        )
    want = c * (c // groups) * 9
    if packed.dtype != torch.bfloat16 or not packed.is_contiguous() or packed.numel() != want:
        raise ValueError(
            f"packed: expected a contiguous bf16 tensor of {want} values from "
            f"grouped_split.pack_weights, got {packed.dtype} with {packed.numel()}"
        )
    check_bias(bias, c)


operators.define(
    "grouped_conv3x3_split(Tensor x, Tensor packed, Tensor? bias, int groups, int stride, "
    "bool relu) -> Tensor",
    run_split,
    grouped_kernel.fake_grouped,
)


class SplitGroupedConv3x3(FastGroupedConv3x3):
    """A grouped 3×3 convolution (padding 1, optional ReLU) on bf16 channels in the split order:
    its input in `input_order`, its output in `output_order` (see the module docstring). Alone it
    is not the convolution it was made from; with the 1×1s around it permuted
    (`group_order.split_group_channels`) the block computes the same function. One of our kernel
    modules (the passes' tracers keep it whole; it has no AMX form); the packed weights and bias
    are plain attributes."""

    def __init__(self, conv: nn.Conv2d, relu: bool = False) -> None:
        nn.Module.__init__(self)
        if conv.kernel_size != (3, 3) or conv.padding != (1, 1) or conv.dilation != (1, 1):
            raise ValueError(f"conv: expected a 3×3 convolution with padding 1, got {conv}")
        if conv.stride[0] != conv.stride[1] or conv.in_channels != conv.out_channels:
            raise ValueError(
                f"conv: expected a square stride and as many inputs as outputs: {conv}"
            )
        if not supports(conv.out_channels, conv.groups, conv.stride[0]):
            raise ValueError(f"conv: not a shape the split kernels take: {conv}")
        self.relu = relu
        self.groups, self.stride, self.channels = conv.groups, conv.stride[0], conv.out_channels
        self.variant = "split"
        self.packed = pack_weights(conv.weight, conv.groups)
        order = output_order(conv.out_channels, conv.groups)
        self.bias = None if conv.bias is None else conv.bias.detach().float()[order].contiguous()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.resnext.grouped_conv3x3_split(
            x, self.packed, self.bias, self.groups, self.stride, self.relu
        )

    def extra_repr(self) -> str:
        relu = ", relu=True" if self.relu else ""
        return (
            f"{self.channels}, {self.channels}, groups={self.groups}, stride={self.stride}, "
            f"order=split{relu}"
        )
