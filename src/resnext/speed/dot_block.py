"""A whole stride-1 identity bottleneck in one kernel call, written over its input (AVX512-BF16).

After `dot_grouped` fuses a bottleneck's first 1×1 into its grouped 3×3, the grouped output
still goes to memory (12.8 MB for ResNeXt-50's stage 1 at batch 16) and the last 1×1
(`DotConv1x1`, its residual the block's input, written over it) reads it back.
`bottleneck_dot_bf16` (kernels/grouped3x3.c) runs the last 1×1 on each thread's grouped rows a
few rows behind as they come, from a buffer of the thread's own, one image large, so that the
grouped output stays in cache too; it writes each output row over the block's input row, which
the first 1×1 has already read. The same tiles and row kernels as the calls apart: the output
equals theirs bit for bit. Whole images per thread only: for other batches `DotBottleneck` makes
the two calls apart itself, and the operator refuses them. `fuse_dot_blocks` is `optimize`'s pass (under `fuse_block`, which fuses the AMX
form of the same block).
"""

from __future__ import annotations

import torch
from torch import nn

from resnext.speed import dot_grouped, grouped_kernel, operators, pointwise_gemm
from resnext.speed.chain_fusion import Chain, Way, run_pass
from resnext.speed.conv_x3_swap import DotConv1x1
from resnext.speed.dot_grouped import DotPointwiseGrouped
from resnext.speed.grouped_swap import LayerChoice
from resnext.speed.kernel_module import KernelModule
from resnext.speed.timing_cache import TimingCache

NAME = "bottleneck_dot_bf16_"


def run_block_(
    x: torch.Tensor,
    pointwise: torch.Tensor,
    pointwise_bias: torch.Tensor,
    packed: torch.Tensor,
    bias: torch.Tensor | None,
    groups: int,
    split: bool,
    last: torch.Tensor,
    last_bias: torch.Tensor,
) -> None:
    """x = relu(conv1x1(g, w3) + last_bias + x), written over the channels-last bf16 `x`, where
    g = `dot_grouped.run_fused`(x, pointwise, pointwise_bias, packed, bias, groups, stride 1,
    ReLU, split) and `last` = pointwise_gemm.pack_conv(w3) (back to x's channels). For
    inference: no gradient."""
    operators.check_bf16_input(NAME, x)
    if not x.is_contiguous(memory_format=torch.channels_last):
        raise ValueError("x: writing in place needs a channels_last tensor")
    packing = dot_grouped.checked_packing(
        x, pointwise, pointwise_bias, packed, bias, groups, 1, split
    )
    k, c = x.shape[1], pointwise_bias.numel()
    block = pointwise_gemm.COLUMN_BLOCK
    if (
        last.dtype != torch.bfloat16
        or last.shape != (k // block, c // 2, block, 2)
        or not last.is_contiguous()
    ):
        raise ValueError(
            f"last: expected a pack_conv weight ({k // block}, {c // 2}, {block}, 2) from the "
            f"middle {c} channels back to x's {k}, got {last.dtype} {tuple(last.shape)}"
        )
    if last_bias is None:
        raise ValueError(f"last_bias: expected {k} float32 values, got None")
    operators.check_bias(last_bias, k)
    ahead = dot_grouped.AHEAD_PIXELS
    if x.numel() and not grouped_kernel.call_block_kernel(
        x, pointwise, pointwise_bias, packed, bias, last, last_bias, groups, packing, ahead
    ):
        # (taking the calls apart here would hide their middle output from a replay's recording)
        raise ValueError(
            f"x: {x.shape[0]} images do not divide between {torch.get_num_threads()} threads; "
            "DotBottleneck takes the calls apart for such batches"
        )


def _fake_block_(*arguments: object) -> None:
    return None


operators.define(
    f"{NAME}(Tensor(a!) x, Tensor pointwise, Tensor pointwise_bias, Tensor packed, "
    "Tensor? bias, int groups, bool split, Tensor last, Tensor last_bias) -> ()",
    run_block_,
    _fake_block_,
)


def block_fusable(fused: nn.Module, last: nn.Module) -> bool:
    """Whether `DotBottleneck` computes last(fused(x), x) in place: a stride-1 first 1×1 + grouped
    3×3 with its ReLU, then a stride-1 `DotConv1x1` with its ReLU written over its residual, back
    to the block's input channels."""
    return (
        isinstance(fused, DotPointwiseGrouped)
        and isinstance(last, DotConv1x1)
        and fused.stride == 1
        and fused.relu
        and last.stride == 1
        and last.relu
        and last.in_place
        and last.in_channels == fused.channels
        and last.out_channels == fused.in_channels
    )


class DotBottleneck(KernelModule):
    """A stride-1 identity bottleneck (first 1×1 + grouped 3×3 as `DotPointwiseGrouped`, then the
    last 1×1 with the residual and ReLU) in one kernel call, written over its input, which must
    be dead after the block (the last 1×1 was in place: the pass that made it checked that)."""

    def __init__(self, fused: DotPointwiseGrouped, last: DotConv1x1) -> None:
        super().__init__()
        if not block_fusable(fused, last):
            raise ValueError(
                "fused, last: expected a stride-1 DotPointwiseGrouped with its ReLU, then a "
                "stride-1 DotConv1x1 with its ReLU, in place, back to the block's input channels; "
                f"got {fused} before {last}"
            )
        self.fused = fused
        self.last_packed, self.last_bias = last.packed, last.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.fused
        if not grouped_kernel.block_kernel_takes(x.shape[0], torch.get_num_threads()):
            # The calls apart, here rather than inside the operator: so the middle output is a
            # tensor of this forward's, which a replay's recording keeps, not memory an operator
            # allocates and frees unseen (the recording then refused).
            mid = f(x)
            torch.ops.resnext.pointwise_conv_bf16_(
                mid, self.last_packed, self.last_bias, 1, True, x
            )
            return x
        torch.ops.resnext.bottleneck_dot_bf16_(
            x,
            f.pointwise_packed,
            f.pointwise_bias,
            f.packed,
            f.bias,
            f.groups,
            f.split,
            self.last_packed,
            self.last_bias,
        )
        return x

    def extra_repr(self) -> str:
        return f"then the last 1×1 {self.fused.channels} → {self.fused.in_channels} + x, relu"


def _ways(fused: nn.Module, last: nn.Module) -> tuple[Way, nn.Module, Way]:
    block = DotBottleneck(fused, last)

    def separate(x: torch.Tensor) -> object:
        x = x.clone()  # both ways write over their input: each call gets a fresh copy
        return last(fused(x), x)

    return separate, block, lambda x: block(x.clone())


CHAIN = Chain(DotPointwiseGrouped, DotConv1x1, block_fusable, True, True)


def fuse_dot_blocks(
    model: nn.Module,
    example: torch.Tensor,
    *,
    mode: str = "auto",
    repeats: int = 5,
    timings: TimingCache | None = None,
) -> list[LayerChoice]:
    """Replace, in place, each `DotPointwiseGrouped` → last `DotConv1x1` (in place over the
    block's input) by a `DotBottleneck`, under the fused pair's name.

    Run after `dot_grouped.fuse_dot_pointwise`. `example` is the model's input (bf16,
    channels_last). 'auto' times each block both ways (in turns, each on a fresh copy of a random
    input of its real shape, as both write over it) and fuses where that is faster; 'on' fuses
    every block; 'off' changes nothing. Each choice is a `LayerChoice` named after the last 1×1
    (native_ms: the two calls, kernel_ms: one; chosen 'fused' or 'separate', variant
    'dot+block').
    """
    return run_pass(
        model,
        example,
        CHAIN,
        _ways,
        switch="fuse_block",
        mode=mode,
        variant="dot+block",
        repeats=repeats,
        timings=timings,
    )
