"""Guards against two bugs of torch's CPU convolution backward (oneDNN, torch 2.13) in training.

Both were found by fuzzing our training kernels' candidates against float64 (`benchmarks/
RESULTS.md`, stop 60); the forward passes and input gradients are right in both.

1. **bf16 weight gradients over inputs narrower than the stride.** Where the input is narrower
   than the horizontal stride (a stride-2 3×3 convolution over a map one pixel wide, a stride-3
   one over a map two pixels wide; 1×1s too, with few input channels), the bf16 weight gradient
   is wrong: from right to 1e36 or NaN, varying from call to call; float32's is right. A ResNeXt
   with the ImageNet stem meets this at stage 4's stride-2 3×3 on images at most 16 pixels wide:
   a CPU run under bf16 autocast on such images wrote NaN weights into its checkpoint, with a
   finite loss. Such calls are computed in float32.
2. **Channels-last weight gradients of strided 1×1 convolutions with few inputs.** With fewer
   than 16 input channels (measured: 2-15, with 8-16 outputs, stride 2, even map sizes; in
   float32 from two images on, in bf16 from one), the weight gradient of a channels-last input
   writes past its buffers: the process later aborts in `free()` or crashes. The same convolution
   on a contiguous (NCHW) input is right, so such calls read their input in that layout.

`guard_conv_backward(model)` gives each `nn.Conv2d` that could meet either case the class
`GuardedConv2d`, which takes the safe way only when a call meets its case with a weight gradient to
compute; every other call is the plain `nn.Conv2d` (a few comparisons more). Only the class
changes: parameters, buffers and state-dict keys stay. The training fast paths' convolution
classes derive from `GuardedConv2d`, and their own oneDNN candidates take the same ways.
"""

from __future__ import annotations

import torch
from torch import nn

# case 2: a strided 1×1 with fewer input channels than this takes the dense layout
FEW_INPUT_CHANNELS = 16


def narrower_than_stride(width: int, stride_width: int) -> bool:
    """Case 1's shape: an input `width` pixels wide where the bf16 weight gradient goes wrong."""
    return width < stride_width


def few_input_channels(in_channels: int, kernel: tuple[int, int], stride: tuple[int, int]) -> bool:
    """Case 2's shape: a strided 1×1 whose channels-last weight gradient writes astray."""
    return kernel == (1, 1) and max(stride) > 1 and in_channels < FEW_INPUT_CHANNELS


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a CPU convolution of `x` computes in: autocast's where it is on, else x's."""
    return torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else x.dtype


def _needs_weight_grad(conv: nn.Conv2d, x: torch.Tensor) -> bool:
    return x.device.type == "cpu" and torch.is_grad_enabled() and conv.weight.requires_grad


def needs_float32(conv: nn.Conv2d, x: torch.Tensor) -> bool:
    """Whether `conv` on `x` would take torch's wrong bf16 weight gradient (case 1)."""
    return (
        x.dim() >= 3
        and narrower_than_stride(x.shape[-1], conv.stride[1])
        and _needs_weight_grad(conv, x)
        and compute_dtype(x) == torch.bfloat16
    )


def needs_dense_layout(conv: nn.Conv2d, x: torch.Tensor) -> bool:
    """Whether `conv` on `x` would take torch's channels-last weight gradient of a strided 1×1
    with few inputs (case 2)."""
    return (
        x.dim() == 4
        and few_input_channels(conv.in_channels, conv.kernel_size, conv.stride)
        and _needs_weight_grad(conv, x)
        and not x.is_contiguous()
    )


def float32_conv(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """`conv(x)` computed in float32 (so its weight gradient is too), returned in bf16 as autocast
    would return it."""
    bias = None if conv.bias is None else conv.bias.float()
    with torch.autocast("cpu", enabled=False):
        out = conv._conv_forward(x.float(), conv.weight.float(), bias)
    return out.to(torch.bfloat16)


def dense_layout_conv(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """`conv(x)` on x in the contiguous layout, returned channels-last as x came."""
    out = conv._conv_forward(x.contiguous(), conv.weight, conv.bias)
    return out.contiguous(memory_format=torch.channels_last)


def onednn_gradient(
    grad: torch.Tensor,
    x: torch.Tensor,
    w: torch.Tensor,
    stride: int,
    padding: int,
    groups: int,
    which: int,
) -> torch.Tensor:
    """torch's (oneDNN's) input (which=0) or weight (which=1) gradient of the bias-free
    ``conv2d(x, w, stride, padding, groups=groups)`` for output gradient `grad`; a weight
    gradient in either case takes the guard's way (what the training fast paths offer as
    oneDNN's)."""
    if which == 1 and x.dtype == torch.bfloat16 and narrower_than_stride(x.shape[3], stride):
        float32 = onednn_gradient(grad.float(), x.float(), w.float(), stride, padding, groups, 1)
        return float32.to(torch.bfloat16)
    if which == 1 and few_input_channels(x.shape[1], tuple(w.shape[2:]), (stride, stride)):
        grad, x = grad.contiguous(), x.contiguous()
    mask = [which == 0, which == 1, False]
    out = torch.ops.aten.convolution_backward(
        grad, x, w, None, [stride] * 2, [padding] * 2, [1, 1], False, [0, 0], groups, mask
    )
    return out[which]


class GuardedConv2d(nn.Conv2d):
    """A Conv2d that takes a safe way where torch's CPU weight gradient of it would go wrong."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if needs_float32(self, x):
            return float32_conv(self, x)
        if needs_dense_layout(self, x):
            return dense_layout_conv(self, x)
        return super().forward(x)


def may_meet_a_case(conv: nn.Conv2d) -> bool:
    """Whether some input could put `conv` in one of the two cases: both need a stride."""
    return max(conv.stride) > 1


def guard_conv_backward(model: nn.Module) -> int:
    """Give every plain `nn.Conv2d` of `model` that may meet either case the class
    `GuardedConv2d`, in place; how many."""
    from resnext.speed.swap import swap_class  # swap's classes derive from this module's

    return swap_class(model, nn.Conv2d, GuardedConv2d, where=may_meet_a_case)
