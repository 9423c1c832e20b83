"""A bottleneck's first bf16 1×1 and the grouped 3×3 after it in one kernel call (AVX512-BF16).

Apart, the 1×1 (`DotConv1x1`) writes all of its output (12.8 MB for ResNeXt-50's stage 1 at
batch 16) before the grouped 3×3 reads it back, by then from memory: in the network each grouped
layer ran at its cold-cache time, 1.1–1.2× its time in cache (benchmarks/RESULTS.md, stop 40).
The fused kernel (`pointwise_grouped3x3_bf16` in kernels/grouped3x3.c) has each thread compute
the 1×1's output rows just before the first of its grouped rows that reads them, so the grouped
kernel finds them in cache. It runs the same tiles and row kernels as the two calls apart, so
its output equals theirs bit for bit. `fuse_dot_pointwise` is `optimize`'s pass that puts it in
where timing says (under `fuse_pointwise`, which fuses the AMX form of the same pair).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from resnext.speed import grouped_kernel, grouped_split, operators, pointwise_gemm
from resnext.speed.chain_fusion import Chain, Way, run_pass
from resnext.speed.conv_x3_swap import DotConv1x1
from resnext.speed.grouped_split import SplitGroupedConv3x3
from resnext.speed.grouped_swap import (
    FastGroupedConv3x3,
    LayerChoice,
    NativeGroupedConv3x3,
    kernel_form,
)
from resnext.speed.kernel_module import KernelModule
from resnext.speed.pointwise_fusion import onednn_conv
from resnext.speed.timing_cache import TimingCache

# The 1×1 pixels computed per step, at least: one block of 8 tiles of 7 rows, as the 1×1's own
# walk takes them (its weights stay in use). 1, 112 and 224 timed within 0.6 % of it (stop 41).
AHEAD_PIXELS = 56
VARIANTS = ("widening", "pairs", "split")  # the grouped kernel forms the fused kernel runs
NAME = "pointwise_grouped_conv3x3_bf16"


def run_fused(
    x: torch.Tensor,
    pointwise: torch.Tensor,
    pointwise_bias: torch.Tensor,
    packed: torch.Tensor,
    bias: torch.Tensor | None,
    groups: int,
    stride: int,
    relu: bool,
    split: bool,
) -> torch.Tensor:
    """``grouped(relu(conv1x1(x, w1) + pointwise_bias))`` in bf16 for a channels-last `x`, with
    `pointwise` = pointwise_gemm.pack_conv(w1) and the grouped 3×3 (padding 1, `stride`, then
    ReLU if `relu`) given as a `FastGroupedConv3x3` holds it: `packed` and `bias` from
    grouped_kernel.pack_weights, or with `split` from grouped_split.pack_weights (its input and
    output channels in the split order). For inference: no gradient."""
    packing = checked_packing(x, pointwise, pointwise_bias, packed, bias, groups, stride, split)
    return grouped_kernel.call_pointwise_kernel(
        x, pointwise, pointwise_bias, packed, bias, groups, stride, relu, packing, AHEAD_PIXELS
    )


def checked_packing(
    x: torch.Tensor,
    pointwise: torch.Tensor,
    pointwise_bias: torch.Tensor,
    packed: torch.Tensor,
    bias: torch.Tensor | None,
    groups: int,
    stride: int,
    split: bool,
) -> int:
    """The grouped kernel's packing number for `run_fused`'s arguments, after checking them (a
    ValueError naming the one that does not fit)."""
    operators.check_bf16_input(NAME, x)
    c = pointwise_gemm.checked_outputs(
        "pointwise", pointwise, "pointwise_bias", pointwise_bias, x.shape[1]
    )
    if split:
        grouped_split.check_packed(c, groups, stride, packed, bias)
        return grouped_split.PACKING
    return grouped_kernel.packing_of(c, groups, stride, packed, bias, torch.bfloat16)


def fake_fused(
    x: torch.Tensor,
    pointwise: torch.Tensor,
    pointwise_bias: torch.Tensor,
    packed: torch.Tensor,
    bias: torch.Tensor | None,
    groups: int,
    stride: int,
    relu: bool,
    split: bool,
) -> torch.Tensor:
    """The output's shape, dtype and layout without running the kernel (for torch.compile)."""
    return grouped_kernel.output_for(x, stride, pointwise.shape[0] * pointwise_gemm.COLUMN_BLOCK)


operators.define(
    f"{NAME}(Tensor x, Tensor pointwise, Tensor pointwise_bias, Tensor packed, Tensor? bias, "
    "int groups, int stride, bool relu, bool split) -> Tensor",
    run_fused,
    fake_fused,
)


def dot_fusable(pointwise: nn.Module, grouped: nn.Module | None) -> bool:
    """Whether the fused kernel computes `grouped`(`pointwise`(x)) for these two modules: a
    stride-1 bf16 1×1 with its ReLU and no residual, then one of our grouped kernels on its
    output, or oneDNN's with one of ours kept beside it (`kernel_form`) (bf16 activations:
    `DotConv1x1` exists only in bf16 models)."""
    grouped = kernel_form(grouped)
    return (
        isinstance(pointwise, DotConv1x1)
        and grouped is not None
        and grouped.variant in VARIANTS
        and pointwise.stride == 1
        and pointwise.relu
        and not pointwise.in_place
        and pointwise.out_channels == grouped.channels
    )


class DotPointwiseGrouped(KernelModule):
    """``relu(1×1(x))`` on `DotConv1x1`'s product, then our bf16 grouped 3×3, in one kernel call.

    Holds both packed weights as plain attributes (as the two modules do) so that a later
    ``.to(dtype)`` leaves them packed.
    """

    def __init__(self, pointwise: DotConv1x1, grouped: FastGroupedConv3x3) -> None:
        super().__init__()
        if not dot_fusable(pointwise, grouped):
            raise ValueError(
                "pointwise, grouped: expected a stride-1 DotConv1x1 with its ReLU, no residual "
                f"and the grouped kernel's {getattr(grouped, 'channels', '?')} outputs, then a "
                f"grouped kernel of variant {VARIANTS}; got {pointwise} before {grouped}"
            )
        grouped = kernel_form(grouped)  # where oneDNN's is kept, the kernel beside it
        self.in_channels = pointwise.in_channels
        self.pointwise_packed, self.pointwise_bias = pointwise.packed, pointwise.bias
        self.packed, self.bias = grouped.packed, grouped.bias
        self.groups, self.stride, self.relu = grouped.groups, grouped.stride, grouped.relu
        self.channels, self.variant = grouped.channels, grouped.variant
        self.split = isinstance(grouped, SplitGroupedConv3x3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.resnext.pointwise_grouped_conv3x3_bf16(
            x,
            self.pointwise_packed,
            self.pointwise_bias,
            self.packed,
            self.bias,
            self.groups,
            self.stride,
            self.relu,
            self.split,
        )

    def extra_repr(self) -> str:
        relu = ", relu=True" if self.relu else ""
        return (
            f"1×1 {self.in_channels} → {self.channels} + relu, then grouped 3×3 "
            f"groups={self.groups}, stride={self.stride}, variant={self.variant}{relu}"
        )


def _ways(pointwise: nn.Module, grouped: nn.Module) -> tuple[Way, nn.Module, Way]:
    fused = DotPointwiseGrouped(pointwise, grouped)
    if not isinstance(grouped, NativeGroupedConv3x3):
        return lambda x: grouped(pointwise(x)), fused, fused
    prepacked: dict[tuple[int, ...], Callable[[torch.Tensor], torch.Tensor]] = {}

    def separate(x: torch.Tensor) -> object:
        # oneDNN's grouped convolution as every backend runs it: prepacked for its input
        y = pointwise(x)
        shape = tuple(y.shape)
        if shape not in prepacked:
            prepacked[shape] = onednn_conv(grouped.as_conv(), shape, relu=grouped.relu)
        return prepacked[shape](y)

    return separate, fused, fused


CHAIN = Chain(DotConv1x1, FastGroupedConv3x3, dot_fusable, False, False)


def fuse_dot_pointwise(
    model: nn.Module,
    example: torch.Tensor,
    *,
    mode: str = "auto",
    repeats: int = 5,
    timings: TimingCache | None = None,
) -> list[LayerChoice]:
    """Replace, in place, each `DotConv1x1` (stride 1, ReLU) → grouped kernel chain by
    `DotPointwiseGrouped`.

    Run after `swap_convs_dot` and the grouped passes. `example` is the model's input (bf16,
    channels_last). 'auto' times each chain both ways (in turns, on a random input of its real
    shape: the separate way writes the 1×1's output and reads it back as in the network) and
    fuses where that is faster; 'on' fuses every chain; 'off' changes nothing. Each choice is a
    `LayerChoice` named after the grouped conv (native_ms: the two calls, kernel_ms: the fused
    one; chosen 'fused' or 'separate', variant 'dot+grouped'). No `DotConv1x1`, so no chain,
    where the bf16 1×1 kernel cannot run.
    """
    return run_pass(
        model,
        example,
        CHAIN,
        _ways,
        switch="fuse_pointwise",
        mode=mode,
        variant="dot+grouped",
        repeats=repeats,
        timings=timings,
    )
