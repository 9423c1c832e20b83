"""The training fast path's grouped 3×3 convolution: our kernels where they beat oneDNN.

`use_grouped_kernels(model)` turns each grouped 3×3 `nn.Conv2d` the kernels take (padding 1,
no bias, 4 or 8 channels per group, stride 1 or 2) into a `TrainingGroupedConv2d` in place (same
parameters and state-dict keys). In training mode on channels-last float32/bfloat16 CPU tensors
(bf16 from autocast included) it runs:

- the forward and, at stride 1, the input gradient with `kernels/grouped3x3.c` when a group has
  4 channels (ResNeXt-50's stage 1; ~2.5× oneDNN), or 8 channels in float32 (~1.2–1.7×); the
  input gradient of a stride-1 convolution is the convolution of the output gradient with each
  group's weight matrix transposed and its taps flipped;
- the weight gradient with `kernels/grouped3x3_wgrad.c` for 4 and 8 channels per group (1.5–4×
  oneDNN); the float32 gradient is returned as it is, not rounded to bf16 first;
- everything else with oneDNN, through `torch.ops.aten.convolution_backward`.

Everywhere else (eval mode, other devices, layouts or dtypes, tracing, torch.compile, no kernel)
it is the plain `nn.Conv2d`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from resnext.speed import grouped_kernel, grouped_swap, grouped_wgrad
from resnext.speed.swap import TrainingFastConv2d, swap_class, training_input_dtype


def transposed_weight(weight: torch.Tensor, groups: int) -> torch.Tensor:
    """The weight whose stride-1, padding-1 grouped convolution maps an output gradient to the
    input gradient: each group's (out, in) matrix transposed, the 3×3 taps flipped."""
    c, cpg = weight.shape[:2]
    per_group = weight.reshape(groups, c // groups, cpg, 3, 3)
    return per_group.transpose(1, 2).flip(-1, -2).reshape(c, cpg, 3, 3)


def forward_kernel_wins(channels_per_group: int, dtype: torch.dtype) -> bool:
    """Whether our forward kernel beats oneDNN's here (benchmarks/bench_grouped_train.py)."""
    return channels_per_group == 4 or (channels_per_group == 8 and dtype == torch.float32)


def our_kernel(x: torch.Tensor, weight: torch.Tensor, groups: int, stride: int) -> torch.Tensor:
    """conv2d(x, weight, stride, padding=1, groups) by `kernels/grouped3x3.c`, weights packed now."""
    pairs = grouped_kernel.takes_pairs(x.shape[1], groups, x.dtype)
    packed = grouped_kernel.pack_weights(weight, groups, pairs=pairs)
    return grouped_kernel.run_kernel(x, packed, None, groups, stride)


class _GroupedConv3x3(torch.autograd.Function):
    """conv2d(x, weight, stride, padding=1, groups) in `dtype` with the kernel split above."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        x: torch.Tensor,
        weight: torch.Tensor,
        groups: int,
        stride: int,
    ) -> torch.Tensor:
        w = weight.to(x.dtype)
        ours = forward_kernel_wins(x.shape[1] // groups, x.dtype)
        ctx.groups, ctx.stride, ctx.ours = groups, stride, ours
        ctx.weight_dtype = weight.dtype
        ctx.save_for_backward(x, w)
        if ours:
            return our_kernel(x, w, groups, stride)
        y = F.conv2d(x, w, None, stride, 1, 1, groups)
        return y.contiguous(memory_format=torch.channels_last)

    @staticmethod
    @once_differentiable
    def backward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor
    ) -> tuple[torch.Tensor | None, ...]:
        x, w = ctx.saved_tensors
        groups, stride = ctx.groups, ctx.stride
        grad = grad.contiguous(memory_format=torch.channels_last)
        want_x, want_w = ctx.needs_input_grad[:2]
        ours_x = want_x and ctx.ours and stride == 1
        ours_w = want_w and grouped_wgrad.supports(x.shape[1], groups, stride)
        dx = dw = None
        if (want_x and not ours_x) or (want_w and not ours_w):
            mask = [want_x and not ours_x, want_w and not ours_w, False]
            dx, dw, _ = torch.ops.aten.convolution_backward(
                grad, x, w, None, [stride, stride], [1, 1], [1, 1], False, [0, 0], groups, mask
            )
        if ours_x:
            dx = our_kernel(grad, transposed_weight(w, groups), groups, 1)
        if ours_w:
            dw = grouped_wgrad.weight_grad(x, grad, groups, stride)
        if dw is not None:
            dw = dw.to(ctx.weight_dtype)
        return dx, dw, None, None


class TrainingGroupedConv2d(TrainingFastConv2d):
    """A grouped 3×3 Conv2d whose training forward and backward use our kernels where they win."""

    def _fast_forward(self, x: torch.Tensor) -> torch.Tensor:
        return _GroupedConv3x3.apply(x, self.weight, self.groups, self.stride[0])

    def _fast_dtype(self, x: torch.Tensor) -> torch.dtype | None:
        """The dtype the kernels compute `x` in (autocast's, else x's), or None for torch's path."""
        dtype = training_input_dtype(self, x)
        if dtype is None or not takes_module(self):
            return None
        if dtype not in grouped_wgrad.DTYPES or x.dtype not in grouped_wgrad.DTYPES:
            return None
        needs_forward_kernel = forward_kernel_wins(self.in_channels // self.groups, dtype)
        if grouped_wgrad.unavailable_reason() is not None or (
            needs_forward_kernel and grouped_kernel.unavailable_reason(dtype) is not None
        ):
            return None
        return dtype


def takes_module(conv: nn.Module) -> bool:
    """Whether `conv` is a grouped 3×3 convolution the training kernels take."""
    return (
        grouped_swap.eligible(conv)  # the forward kernel's shapes: 3×3, padding 1, in = out, ...
        and conv.bias is None
        and grouped_wgrad.supports(conv.in_channels, conv.groups, conv.stride[0])
    )


def use_grouped_kernels(model: nn.Module) -> int:
    """Make every grouped 3×3 `nn.Conv2d` the kernels take a `TrainingGroupedConv2d`; how many."""
    return swap_class(model, nn.Conv2d, TrainingGroupedConv2d, takes_module)


def use_plain_grouped_conv(model: nn.Module) -> int:
    """Undo `use_grouped_kernels`: every `TrainingGroupedConv2d` becomes an `nn.Conv2d` again."""
    return swap_class(model, TrainingGroupedConv2d, nn.Conv2d)
