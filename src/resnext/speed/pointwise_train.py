"""The training fast path's 1×1 convolution: weight gradient as one GEMM, bf16 products of our own.

For a 1×1 convolution on a channels-last tensor, the weight gradient is one matrix product,
dW = Gᵀ·X, with the output gradient G viewed as (N·H·W) × C_out and the input X as
(N·H·W) × C_in (subsampled first at stride 2). oneDNN's convolution weight gradient runs
these shapes at 440–680 GFLOP/s in bf16 when the maps are small (stages 2–4 of an ImageNet
network: few rows, large weight matrices), where `torch.mm` runs them at 690–860
(benchmarks/bench_pointwise_train.py). `use_gemm_weight_grad(model)` turns each 1×1 `nn.Conv2d`
without bias or groups into a `TrainingPointwiseConv2d` (same parameters and state-dict keys);
in training mode, in bf16 (autocast's included), on channels-last CPU tensors with at most
`GEMM_MAX_ROWS` rows, its backward takes the weight gradient from the GEMM. The forward and the
input gradient of a stride-1 layer with multiples of 64 channels come from our bf16 product
(`resnext.speed.pointwise_gemm`, 1.02–1.26× oneDNN on these shapes, packing included:
benchmarks/bench_pointwise_gemm.py), the others from oneDNN; with at least `OUR_WGRAD_MIN_ROWS`
rows the weight gradient comes from our kernel too, and such layers take the fast path also
above `GEMM_MAX_ROWS` (ResNeXt-50's 56² layers). Everywhere else it is the plain `nn.Conv2d`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from resnext.speed import pointwise_gemm
from resnext.speed.swap import TrainingFastConv2d, swap_class, training_input_dtype

# Rows (N·H·W of the output) up to which the GEMM beat oneDNN's weight gradient in
# bench_pointwise_train.py on the project's 2-core AVX-512 machine: in bf16 it won at 7², 14²
# and 28² maps (batch 16: 784, 3,136 and 12,544 rows; 1.06–1.85×) and lost at 56² (50,176).
GEMM_MAX_ROWS = 16384
# Rows from which our weight-gradient kernel (`pointwise_gemm.weight_grad`) beats both oneDNN and
# `torch.mm` in bf16 (benchmarks/bench_pointwise_gemm.py: 1.05–1.10× the GEMM at 28², 1.0–1.1×
# oneDNN and 1.2–1.4× the GEMM at 56²; within ±5 % of the GEMM at 14² and 7²). With our product
# (stride 1, multiples of 64 channels) layers with more than GEMM_MAX_ROWS rows take the fast
# path too, all three ops ours.
OUR_WGRAD_MIN_ROWS = 8192
# float32 matrix products go through MKL, slower than oneDNN's convolution here.
DTYPES = (torch.bfloat16,)


def gemm_weight_grad(x: torch.Tensor, grad: torch.Tensor, stride: int) -> torch.Tensor:
    """The weight gradient (C_out, C_in, 1, 1) of a bias-free 1×1 convolution, as one GEMM.

    `x` is the convolution's input and `grad` the gradient of its output, both channels-last.
    """
    if stride != 1:
        x = x[:, :, ::stride, ::stride]
    rows_x = x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])
    rows_g = grad.permute(0, 2, 3, 1).reshape(-1, grad.shape[1])
    return (rows_g.t() @ rows_x)[:, :, None, None]


def our_product_applies(dtype: torch.dtype, weight: torch.Tensor, stride: int) -> bool:
    """Whether `kernels/pointwise_gemm.c` computes this convolution and its input gradient."""
    return (
        stride == 1
        and dtype == torch.bfloat16
        and pointwise_gemm.takes(weight.shape[1], weight.shape[0])
        and pointwise_gemm.unavailable_reason() is None
    )


def weight_grad(x: torch.Tensor, grad: torch.Tensor, stride: int) -> torch.Tensor:
    """The weight gradient (C_out, C_in, 1, 1): our kernel on large maps in bf16, else one GEMM."""
    rows = grad.numel() // max(grad.shape[1], 1)
    if (
        rows >= OUR_WGRAD_MIN_ROWS
        and x.dtype == torch.bfloat16
        and pointwise_gemm.takes_weight_grad(x.shape[1])
        and pointwise_gemm.unavailable_reason() is None
    ):
        return pointwise_gemm.weight_grad(x[:, :, ::stride, ::stride], grad)
    return gemm_weight_grad(x, grad, stride)


class _PointwiseConv(torch.autograd.Function):
    """conv2d(x, weight, stride) with a 1×1 weight by our product or oneDNN; backward: input grad
    likewise, weight grad by our kernel or one GEMM."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, x: torch.Tensor, weight: torch.Tensor, stride: int
    ) -> torch.Tensor:
        ctx.stride, ctx.weight_dtype = stride, weight.dtype
        ctx.ours = our_product_applies(x.dtype, weight, stride)
        if ctx.ours:
            # Both operands packed straight from the parameter (rounded to bf16 while packing):
            # no bf16 copy of the weight is made or kept.
            want_x = ctx.needs_input_grad[0]
            ctx.save_for_backward(x, pointwise_gemm.pack_input_grad(weight) if want_x else None)
            return pointwise_gemm.matmul_channels(x, pointwise_gemm.pack_forward(weight))
        w = weight.to(x.dtype)
        ctx.save_for_backward(x, w)
        return F.conv2d(x, w, None, stride).contiguous(memory_format=torch.channels_last)

    @staticmethod
    @once_differentiable
    def backward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor
    ) -> tuple[torch.Tensor | None, ...]:
        x, w = ctx.saved_tensors  # w: the packed input-gradient operand where ctx.ours
        grad = grad.contiguous(memory_format=torch.channels_last)
        want_x, want_w = ctx.needs_input_grad[:2]
        dx = dw = None
        if want_x and ctx.ours:
            dx = pointwise_gemm.matmul_channels(grad, w)
        elif want_x:
            stride = [ctx.stride] * 2
            dx, _, _ = torch.ops.aten.convolution_backward(
                grad, x, w, None, stride, [0, 0], [1, 1], False, [0, 0], 1, [True, False, False]
            )
        if want_w:
            dw = weight_grad(x, grad, ctx.stride).to(ctx.weight_dtype)
        return dx, dw, None


class TrainingPointwiseConv2d(TrainingFastConv2d):
    """A 1×1 Conv2d whose training products run in our kernels or one GEMM where those beat oneDNN."""

    def _fast_forward(self, x: torch.Tensor) -> torch.Tensor:
        return _PointwiseConv.apply(x, self.weight, self.stride[0])

    def _fast_dtype(self, x: torch.Tensor) -> torch.dtype | None:
        """The dtype the fast path computes `x` in (autocast's, else x's), or None for torch's."""
        dtype = training_input_dtype(self, x)
        if dtype is None or not self.weight.requires_grad:
            return None
        s = self.stride[0]
        rows = x.shape[0] * ((x.shape[2] - 1) // s + 1) * ((x.shape[3] - 1) // s + 1)
        if dtype not in DTYPES or not x.is_floating_point():
            return None
        if rows > GEMM_MAX_ROWS and not our_product_applies(dtype, self.weight, s):
            return None
        return dtype


def takes_module(conv: nn.Module) -> bool:
    """Whether `conv` is a 1×1 convolution the GEMM weight gradient applies to."""
    return (
        isinstance(conv, nn.Conv2d)
        and conv.kernel_size == (1, 1)
        and conv.stride[0] == conv.stride[1]
        and conv.padding == (0, 0)
        and conv.dilation == (1, 1)
        and conv.groups == 1
        and conv.bias is None
        and conv.padding_mode == "zeros"
    )


def use_gemm_weight_grad(model: nn.Module) -> int:
    """Make every 1×1 `nn.Conv2d` the GEMM applies to a `TrainingPointwiseConv2d`; how many."""
    return swap_class(model, nn.Conv2d, TrainingPointwiseConv2d, takes_module)


def use_plain_pointwise_conv(model: nn.Module) -> int:
    """Undo `use_gemm_weight_grad`: every `TrainingPointwiseConv2d` becomes an `nn.Conv2d` again."""
    return swap_class(model, TrainingPointwiseConv2d, nn.Conv2d)
