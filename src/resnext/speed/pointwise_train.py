"""The training fast path's 1×1 convolution: each product by the fastest of oneDNN, one GEMM or ours.

A 1×1 convolution's three training products each have several exact implementations:
- the forward: oneDNN's convolution, or, with multiples of 64 channels, our bf16 product
  (`resnext.speed.pointwise_gemm`, AVX512-BF16 pair dot products; at stride 2, a projection
  shortcut's, on the input's pixels at the stride gathered first), or in float32 our AVX2 FMA
  product (`resnext.speed.pointwise_fma`, outputs a multiple of 16, any stride);
- the input gradient: oneDNN's convolution backward, or our product with the weight transposed
  (at stride 2 spread into a zeroed input-sized gradient; in float32 the FMA product, at stride 1
  with inputs a multiple of 16);
- the weight gradient dW = Gᵀ·X, with the output gradient G viewed as (N·H·W) × C_out and the
  input X as (N·H·W) × C_in (subsampled first at stride 2): oneDNN's convolution backward, one
  `torch.mm`, our kernel (pixel pairs, float32 sums; C_in a multiple of 64), or on a CPU with
  AMX our tile kernel (`resnext.speed.pointwise_wgrad_amx`, float32 sums).

With `use_gemm_weight_grad(model, fp16_products=True)` (`train.fp16_products`) the float32
products also offer float16 products with float32 sums (`resnext.speed.pointwise_fp16`: the
forward, the input gradient with the weight transposed, and the weight gradient; AVX512-FP16),
which are float16-precise rather than float32-exact, so never offered unless asked.

Which is fastest depends on the CPU (on an AVX512-BF16 AMD EPYC ours won by 1.0–1.3× and the
GEMM beat oneDNN on 28² maps and smaller; on an Intel Xeon with AMX oneDNN and the GEMM run
5–10× faster than ours: benchmarks/RESULTS.md), so each product is chosen per shape by timing
the candidates on the first call (`resnext.speed.autotune`). `use_gemm_weight_grad(model)`
turns each 1×1 `nn.Conv2d` without bias or groups into a `TrainingPointwiseConv2d` (same
parameters and state-dict keys); in training mode, in bf16 (autocast's included) or float32,
on channels-last CPU tensors, its products are chosen that way. Everywhere else it is the plain
`nn.Conv2d`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from resnext.speed import (
    autotune,
    pointwise_fma,
    pointwise_fp16,
    pointwise_gemm,
    pointwise_wgrad_amx,
)
from resnext.speed.conv_guard import onednn_gradient
from resnext.speed.swap import TrainingFastConv2d, swap_class, training_input_dtype

# bf16, and float32, where oneDNN, the GEMM and our FMA product compete: MKL's float32 GEMM lost
# to oneDNN on the AVX-512 machines, where the chooser keeps oneDNN, and won 12 of ResNeXt-50's
# 16 weight gradients on an AVX2-only AMD EPYC (up to 1.7x; RESULTS.md, stop 27).
DTYPES = (torch.bfloat16, torch.float32)


def our_product_applies(dtype: torch.dtype, weight: torch.Tensor) -> bool:
    """Whether `kernels/pointwise_gemm.c` computes this convolution and its input gradient (at
    any stride: on the pixels at the stride, gathered, and spread back)."""
    return (
        dtype == torch.bfloat16
        and pointwise_gemm.takes(weight.shape[1], weight.shape[0])
        and pointwise_gemm.unavailable_reason() is None
    )


def fma_product_applies(dtype: torch.dtype, w: torch.Tensor, stride: int) -> bool:
    """Whether `kernels/pointwise_fma.c` computes the float32 product with 1×1 weight `w`."""
    return (
        dtype == torch.float32
        and pointwise_fma.supports(w.shape[1], w.shape[0], 1, stride, 0)
        and pointwise_fma.unavailable_reason() is None
    )


def fma_product(
    x: torch.Tensor, w: torch.Tensor, stride: int, add: torch.Tensor | None = None
) -> torch.Tensor:
    """conv2d(x, w, stride) (+ `add`) of a bias-free float32 1×1 weight `w` (C_out, C_in, 1, 1)
    by our FMA kernel, `add` summed in as it writes; the weight is packed on every call, as it
    changes every step."""
    bias = torch.zeros(w.shape[0])
    return pointwise_fma.run(x, pointwise_fma.pack(w), bias, stride, residual=add)


def fp16_product_applies(fp16: bool, dtype: torch.dtype, out_channels: int) -> bool:
    """Whether float16 products (`kernels/pointwise_fp16.c`, asked for with `fp16`) compute a
    float32 product with `out_channels` outputs here."""
    return (
        fp16
        and dtype == torch.float32
        and pointwise_fp16.takes(out_channels)
        and pointwise_fp16.unavailable_reason() is None
    )


def fp16_product(
    x: torch.Tensor,
    w: torch.Tensor,
    stride: int,
    add: torch.Tensor | None = None,
    transposed: bool = False,
) -> torch.Tensor:
    """conv2d(x, w or its transpose, stride) (+ `add`) of a bias-free float32 1×1 weight `w`
    with float16 products, `add` summed in as it writes; packed on every call, as the weight
    changes every step."""
    try:
        packed, exponent = pointwise_fp16.pack(w, transposed)
    except pointwise_fp16.NonFiniteWeight:
        # a diverged run's weight: torch's convolution, so its NaNs land where they would
        y = F.conv2d(x, w.transpose(0, 1) if transposed else w, None, stride)
        y = y if add is None else y + add
        return y.contiguous(memory_format=torch.channels_last)
    out_channels = w.shape[1] if transposed else w.shape[0]
    bias = torch.zeros(out_channels)
    return pointwise_fp16.run(x, packed, exponent, out_channels, bias, stride, residual=add)


def our_weight_grad_applies(x: torch.Tensor) -> bool:
    """Whether `pointwise_gemm.weight_grad` computes the weight gradient for input `x`."""
    return (
        x.dtype == torch.bfloat16
        and pointwise_gemm.takes_weight_grad(x.shape[1])
        and pointwise_gemm.unavailable_reason() is None
    )


def _key(x: torch.Tensor, weight: torch.Tensor, stride: int, fp16: bool) -> tuple:
    # fp16: the float16 products compete, so a choice made without them is not reused with them
    return (tuple(x.shape), tuple(weight.shape[:2]), stride, x.dtype) + (("fp16",) if fp16 else ())


def rows(t: torch.Tensor) -> torch.Tensor:
    """The (N·H·W) × C pixel rows of a channels-last tensor (a view where it is dense)."""
    return t.permute(0, 2, 3, 1).reshape(-1, t.shape[1])


def gemm_weight_grad(x: torch.Tensor, grad: torch.Tensor, stride: int) -> torch.Tensor:
    """The weight gradient (C_out, C_in, 1, 1) of a bias-free 1×1 convolution, as one GEMM.

    `x` is the convolution's input and `grad` the gradient of its output, both channels-last.
    """
    if stride != 1:
        x = x[:, :, ::stride, ::stride]
    return (rows(grad).t() @ rows(x))[:, :, None, None]


def from_rows(r: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Pixel rows back as a channels-last (N, C, H, W) tensor with `like`'s batch and map size."""
    n, _, h, w = like.shape
    return r.view(n, h, w, r.shape[1]).permute(0, 3, 1, 2)


def subsampled(x: torch.Tensor, stride: int) -> torch.Tensor:
    """x's pixels a strided 1×1 convolution reads, as a dense channels-last tensor."""
    if stride == 1:
        return x
    return x[:, :, ::stride, ::stride].contiguous(memory_format=torch.channels_last)


def spread(dense: torch.Tensor, like: torch.Tensor, stride: int) -> torch.Tensor:
    """A strided 1×1 convolution's input gradient from its value at the pixels it read (`dense`):
    zero at every other pixel of an input shaped like `like`."""
    if stride == 1:
        return dense
    dx = torch.zeros_like(like, dtype=dense.dtype, memory_format=torch.channels_last)
    dx[:, :, ::stride, ::stride] = dense
    return dx


def _matrix(w: torch.Tensor) -> torch.Tensor:
    return w.reshape(w.shape[0], w.shape[1])  # (C_out, C_in)


def gemm_forward(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """conv2d(x, w) of a stride-1 1×1 convolution as one GEMM of x's pixel rows with wᵀ."""
    return from_rows(rows(x) @ _matrix(w).t(), x)


def gemm_input_grad(
    grad: torch.Tensor, w: torch.Tensor, x: torch.Tensor, add: torch.Tensor | None = None
) -> torch.Tensor:
    """The input gradient of a stride-1 1×1 convolution as one GEMM, grad's rows times w; with
    `add` (a gradient of the same input from elsewhere) summed in by the GEMM as it writes."""
    if add is None:
        return from_rows(rows(grad) @ _matrix(w), x)
    return from_rows(torch.addmm(rows(add), rows(grad), _matrix(w)), x)


def _onednn_backward(
    grad: torch.Tensor, x: torch.Tensor, w: torch.Tensor, stride: int, which: int
) -> torch.Tensor:
    """oneDNN's input (which=0) or weight (which=1) gradient of conv2d(x, w, stride)."""
    return onednn_gradient(grad, x, w, stride, 0, 1, which)


def forward_candidates(
    x: torch.Tensor, weight: torch.Tensor, w: torch.Tensor, stride: int, fp16: bool = False
) -> dict[str, Callable[[], torch.Tensor]]:
    """The forward's implementations (`w` is `weight` in x's dtype), oneDNN's first; with
    `fp16`, float16 products among them."""
    candidates = {
        "onednn": lambda: F.conv2d(x, w, None, stride).contiguous(memory_format=torch.channels_last)
    }
    if stride == 1:
        candidates["gemm"] = lambda: gemm_forward(x, w)
    if our_product_applies(x.dtype, weight):
        # Packed straight from the parameter, rounded to bf16 while packing.
        candidates["ours"] = lambda: pointwise_gemm.matmul_channels(
            subsampled(x, stride), pointwise_gemm.pack_forward(weight)
        )
    if fma_product_applies(x.dtype, w, stride):
        candidates["ours-fma"] = lambda: fma_product(x, w, stride)
    if fp16_product_applies(fp16, x.dtype, w.shape[0]):
        candidates["ours-fp16"] = lambda: fp16_product(x, w, stride)
    return candidates


def input_grad_candidates(
    grad: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    w: torch.Tensor,
    stride: int,
    fp16: bool = False,
) -> dict[str, Callable[[], torch.Tensor]]:
    """The input gradient's implementations, oneDNN's first; with `fp16`, float16 products."""
    candidates = {"onednn": lambda: _onednn_backward(grad, x, w, stride, 0)}
    if stride == 1:
        candidates["gemm"] = lambda: gemm_input_grad(grad, w, x)
    if our_product_applies(x.dtype, weight):
        candidates["ours"] = lambda: spread(
            pointwise_gemm.matmul_channels(grad, pointwise_gemm.pack_input_grad(weight)), x, stride
        )
    if stride == 1 and fma_product_applies(grad.dtype, w.transpose(0, 1), 1):
        candidates["ours-fma"] = lambda: fma_product(grad, w.transpose(0, 1), 1)
    if fp16_product_applies(fp16, grad.dtype, w.shape[1]):
        candidates["ours-fp16"] = lambda: spread(
            fp16_product(grad, w, 1, transposed=True), x, stride
        )
    return candidates


def weight_grad_candidates(
    grad: torch.Tensor, x: torch.Tensor, w: torch.Tensor, stride: int, fp16: bool = False
) -> dict[str, Callable[[], torch.Tensor]]:
    """The weight gradient's implementations, oneDNN's first; with `fp16`, float16 products."""
    candidates = {
        "onednn": lambda: _onednn_backward(grad, x, w, stride, 1),
        "gemm": lambda: gemm_weight_grad(x, grad, stride),
    }
    if our_weight_grad_applies(x):
        candidates["ours"] = lambda: pointwise_gemm.weight_grad(x[:, :, ::stride, ::stride], grad)
    if pointwise_wgrad_amx.unavailable_reason() is None and pointwise_wgrad_amx.applies(x, grad):
        candidates["ours-amx"] = lambda: pointwise_wgrad_amx.weight_grad(x, grad, stride)
    if fp16_product_applies(fp16, x.dtype, w.shape[1]):  # its panels are of input channels
        candidates["ours-fp16"] = lambda: pointwise_fp16.weight_grad(x, grad, stride)
    return candidates


def fork_input_grad_candidates(
    grad: torch.Tensor,
    shortcut_grad: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    w: torch.Tensor,
    fp16: bool = False,
) -> dict[str, Callable[[], torch.Tensor]]:
    """The input gradient of a stride-1 1×1 convolution plus the gradient that reached its input
    along the block's shortcut: oneDNN's then an addition (what autograd does for a tensor used
    twice), or one product that adds the shortcut's gradient as it writes (one GEMM; in bf16 our
    product, the sum rounded once; with `fp16`, float16 products)."""
    candidates = {
        "onednn": lambda: _onednn_backward(grad, x, w, 1, 0) + shortcut_grad,
        "gemm": lambda: gemm_input_grad(grad, w, x, add=shortcut_grad),
    }
    if our_product_applies(grad.dtype, weight) and shortcut_grad.dtype == torch.bfloat16:
        candidates["ours"] = lambda: pointwise_gemm.conv1x1(
            grad,
            pointwise_gemm.pack_conv_input_grad(weight),
            torch.zeros(weight.shape[1]),  # no bias: made only when this way runs
            False,
            shortcut_grad,
        )
    if fma_product_applies(grad.dtype, w.transpose(0, 1), 1):
        candidates["ours-fma"] = lambda: fma_product(grad, w.transpose(0, 1), 1, shortcut_grad)
    if fp16_product_applies(fp16, grad.dtype, w.shape[1]):
        candidates["ours-fp16"] = lambda: fp16_product(grad, w, 1, shortcut_grad, transposed=True)
    return candidates


def _forward(
    ctx: torch.autograd.function.FunctionCtx,
    x: torch.Tensor,
    weight: torch.Tensor,
    stride: int,
    fp16: bool,
) -> torch.Tensor:
    """The chosen forward; saves x, the parameter and its cast for the backward."""
    ctx.weight_dtype = weight.dtype
    ctx.fp16 = fp16
    w = weight.to(x.dtype)
    ctx.save_for_backward(x, weight, w)
    key = _key(x, weight, stride, fp16)
    return autotune.run("conv1x1.forward", key, forward_candidates(x, weight, w, stride, fp16))


def _weight_grad(
    ctx: torch.autograd.function.FunctionCtx,
    grad: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    w: torch.Tensor,
    stride: int,
) -> torch.Tensor:
    """The chosen weight gradient, in the parameter's dtype."""
    candidates = weight_grad_candidates(grad, x, w, stride, ctx.fp16)
    dw = autotune.run("conv1x1.weight_grad", _key(x, weight, stride, ctx.fp16), candidates)
    return dw.to(ctx.weight_dtype)


class _PointwiseConv(torch.autograd.Function):
    """conv2d(x, weight, stride) with a 1×1 weight; each product by the implementation that
    `autotune` found fastest for this shape (float16 products among them if `fp16`)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        x: torch.Tensor,
        weight: torch.Tensor,
        stride: int,
        fp16: bool,
    ) -> torch.Tensor:
        ctx.stride = stride
        return _forward(ctx, x, weight, stride, fp16)

    @staticmethod
    @once_differentiable
    def backward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor
    ) -> tuple[torch.Tensor | None, ...]:
        x, weight, w = ctx.saved_tensors
        stride = ctx.stride
        grad = grad.contiguous(memory_format=torch.channels_last)
        want_x, want_w = ctx.needs_input_grad[:2]
        dx = dw = None
        if want_x:
            candidates = input_grad_candidates(grad, x, weight, w, stride, ctx.fp16)
            key = _key(x, weight, stride, ctx.fp16)
            dx = autotune.run("conv1x1.input_grad", key, candidates)
        if want_w:
            dw = _weight_grad(ctx, grad, x, weight, w, stride)
        return dx, dw, None, None


class _PointwiseConvFork(torch.autograd.Function):
    """(conv2d(x, weight), x) for a stride-1 1×1 convolution whose input also feeds the block's
    shortcut: both gradients of x arrive here and are summed inside the input gradient's GEMM,
    instead of in a separate pass over the block's input."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, x: torch.Tensor, weight: torch.Tensor, fp16: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        y = _forward(ctx, x, weight, 1, fp16)
        return y, x.view_as(x)  # a view: autograd hands its gradient to backward separately

    @staticmethod
    @once_differentiable
    def backward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        grad: torch.Tensor | None,
        shortcut_grad: torch.Tensor | None,
    ) -> tuple[torch.Tensor | None, ...]:
        x, weight, w = ctx.saved_tensors
        want_x, want_w = ctx.needs_input_grad[:2]
        fp16 = ctx.fp16
        key = _key(x, weight, 1, fp16)
        if grad is None:  # only the shortcut was used
            return shortcut_grad if want_x else None, None, None
        grad = grad.contiguous(memory_format=torch.channels_last)
        dx = dw = None
        if want_x and shortcut_grad is None:
            dx = autotune.run(
                "conv1x1.input_grad", key, input_grad_candidates(grad, x, weight, w, 1, fp16)
            )
        elif want_x:
            shortcut_grad = shortcut_grad.contiguous(memory_format=torch.channels_last)
            candidates = fork_input_grad_candidates(grad, shortcut_grad, x, weight, w, fp16)
            dx = autotune.run("conv1x1.input_grad+shortcut", key, candidates)
        if want_w:
            dw = _weight_grad(ctx, grad, x, weight, w, 1)
        return dx, dw, None


class TrainingPointwiseConv2d(TrainingFastConv2d):
    """A 1×1 Conv2d whose training products each run the fastest implementation for its shape."""

    # Whether float16 products (float32 in and out, `pointwise_fp16`) compete for float32
    # products: set by the subclass `use_gemm_weight_grad(model, fp16_products=True)` swaps in.
    fp16_products = False

    def _fast_forward(self, x: torch.Tensor) -> torch.Tensor:
        return _PointwiseConv.apply(x, self.weight, self.stride[0], self.fp16_products)

    def fork(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(self(x), x) for a block whose shortcut also takes x (as it is, or through a projection):
        the fast path sums the two gradients of x in one GEMM (`resnext.models.blocks` calls this
        where it exists)."""
        dtype = self._fast_dtype(x)
        if dtype is None or dtype != x.dtype or self.stride != (1, 1):
            return self(x), x  # casting x here would change the shortcut's dtype too
        with torch.autocast("cpu", enabled=False):
            return _PointwiseConvFork.apply(x, self.weight, self.fp16_products)

    def _fast_dtype(self, x: torch.Tensor) -> torch.dtype | None:
        """The dtype the fast path computes `x` in (autocast's, else x's), or None for torch's."""
        dtype = training_input_dtype(self, x)
        if dtype is None or not self.weight.requires_grad:
            return None
        if dtype not in DTYPES or not x.is_floating_point():
            return None
        return dtype


def takes_module(conv: nn.Module) -> bool:
    """Whether `conv` is a 1×1 convolution the training fast path takes."""
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


class Fp16TrainingPointwiseConv2d(TrainingPointwiseConv2d):
    """`TrainingPointwiseConv2d` whose float32 products may also run with float16 products and
    float32 sums (`pointwise_fp16`), where they time faster: float16-precise, not float32-exact."""

    fp16_products = True


def use_gemm_weight_grad(model: nn.Module, fp16_products: bool = False) -> int:
    """Make every 1×1 `nn.Conv2d` the fast path takes a `TrainingPointwiseConv2d` (with
    `fp16_products`, the float16-products class); how many."""
    new = Fp16TrainingPointwiseConv2d if fp16_products else TrainingPointwiseConv2d
    return swap_class(model, nn.Conv2d, new, takes_module)


def use_plain_pointwise_conv(model: nn.Module) -> int:
    """Undo `use_gemm_weight_grad`: every `TrainingPointwiseConv2d` becomes an `nn.Conv2d` again."""
    return swap_class(model, TrainingPointwiseConv2d, nn.Conv2d) + swap_class(
        model, Fp16TrainingPointwiseConv2d, nn.Conv2d
    )
