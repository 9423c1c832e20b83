"""A guard against torch's wrong CPU bf16 weight gradients of convolutions over inputs narrower
than their stride.

torch 2.13's CPU convolution backward (oneDNN) returns a wrong bf16 weight gradient for a
convolution whose kernel is more than one pixel wide when its input is narrower than its
horizontal stride: a stride-2 3×3 convolution over a feature map one pixel wide, a stride-3 one
over a map two pixels wide. The values vary from call to call, from right to 1e36 or NaN; the
forward and the input gradient are right, and so is float32 (found by fuzzing; `benchmarks/
RESULTS.md`, stop 60). A ResNeXt meets this at its stage-4 grouped 3×3 when the images are at most
16 pixels wide (ImageNet layout): a CPU training run under bf16 autocast on such images wrote NaN
weights into its checkpoint, with a finite loss.

`guard_bf16_weight_grads(model)` gives each convolution that could meet such an input the class
`Bf16GuardedConv2d`, which computes it in float32 whenever it does, in bf16 with a weight
gradient to compute; every other call is the plain `nn.Conv2d` (one comparison of widths more).
Only the class changes: parameters, buffers and state-dict keys stay.
"""

from __future__ import annotations

import torch
from torch import nn


def narrower_than_stride(width: int, kernel_width: int, stride_width: int) -> bool:
    """Whether an input `width` pixels wide is where the bf16 weight gradient goes wrong."""
    return kernel_width > 1 and width < stride_width


def _computes_bf16(x: torch.Tensor) -> bool:
    autocast = (
        torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
    )
    return x.dtype == torch.bfloat16 or autocast


def needs_float32(conv: nn.Conv2d, x: torch.Tensor) -> bool:
    """Whether `conv` on `x` would take torch's wrong bf16 weight gradient."""
    return (
        x.device.type == "cpu"
        and x.dim() >= 3
        and narrower_than_stride(x.shape[-1], conv.kernel_size[1], conv.stride[1])
        and torch.is_grad_enabled()
        and conv.weight.requires_grad
        and _computes_bf16(x)
    )


def float32_conv(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """`conv(x)` computed in float32 (so its weight gradient is too), returned in bf16 as autocast
    would return it."""
    bias = None if conv.bias is None else conv.bias.float()
    with torch.autocast("cpu", enabled=False):
        out = conv._conv_forward(x.float(), conv.weight.float(), bias)
    return out.to(torch.bfloat16)


class Bf16GuardedConv2d(nn.Conv2d):
    """A Conv2d computed in float32 where torch's bf16 weight gradient of it would be wrong."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if needs_float32(self, x):
            return float32_conv(self, x)
        return super().forward(x)


def guard_bf16_weight_grads(model: nn.Module) -> int:
    """Give every plain `nn.Conv2d` of `model` with a kernel and a stride wider than one pixel the
    class `Bf16GuardedConv2d`, in place; how many. (The training fast paths' convolution classes
    derive from it already.)"""
    from resnext.speed.swap import swap_class  # swap's classes derive from this module's

    return swap_class(
        model,
        nn.Conv2d,
        Bf16GuardedConv2d,
        where=lambda m: m.kernel_size[1] > 1 and m.stride[1] > 1,
    )
