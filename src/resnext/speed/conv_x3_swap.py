"""Our dense-convolution kernels as the fast path puts them in place of oneDNN's: their modules,
the layers each takes, and one pass each (`dense_swap.swap_dense_convs` with the kernel's spec).

On the Intel Xeon with AMX, float32 inference is bound by float32 FMAs; 95 % of ResNeXt-50's
FLOPs are 1×1s, and its 7×7 stem and ResNet-50's dense 3×3s are the rest of the dense ones.
`conv_x3` computes them on the tile unit as three bf16 products per float32 product (~1e-5 of
each product, `kernels/conv_x3_amx.c`). On CPUs with AVX2 FMAs and no AMX, `pointwise_fma`
computes the 1×1s with register tiles where they time faster than oneDNN's float32 convolution
(`kernels/pointwise_fma.c` on AVX2, `kernels/pointwise_fma512.c` on AVX-512: at batch 1 most
of ResNeXt-50's on an AVX-512 AMD EPYC). On CPUs with AVX512-BF16, `pointwise_gemm`'s
product (pair dot products, `kernels/pointwise_gemm.c`) computes bf16 1×1s with the same
epilogues. `pointwise_mkl` (MKL's packed product) and `pointwise_fp16` (float16 products) take
float32 1×1s the passes before left to oneDNN.
"""

from __future__ import annotations

import torch
from torch import nn

from resnext.speed import (
    conv_x3,
    operators,
    pointwise_fma,
    pointwise_fp16,
    pointwise_gemm,
    pointwise_mkl,
)
from resnext.speed.conv1x1_kernel import Conv1x1Kernel, float_bias
from resnext.speed.dense_swap import (
    DEFAULT_OPTIONS,
    DenseKernel,
    DenseOptions,
    square_geometry,
    swap_dense_convs,
)
from resnext.speed.grouped_swap import LayerChoice
from resnext.speed.kernel_module import KernelModule


class ConvX3(KernelModule):
    """A float32 convolution (groups 1) with its bias, then optionally a residual add and a ReLU,
    computed by `conv_x3` (AMX, three bf16 products per float32 product).

    With `in_place` the result is written over the residual, which must then be dead after this
    call (the pass sets it only where the graph shows that). The packed weight and bias are plain
    attributes, as in `FastGroupedConv3x3`, so that a later ``.to(dtype)`` leaves them packed.
    """

    def __init__(self, conv: nn.Conv2d, relu: bool = False, in_place: bool = False) -> None:
        super().__init__()
        if not eligible(conv):
            raise ValueError(
                "conv: expected a float32 convolution the kernel takes (groups 1, square kernel, "
                "stride and zero padding, outputs a multiple of 16, inputs of 32 for a 1×1), got "
                f"{conv}"
            )
        self.packed = conv_x3.pack(conv.weight)
        self.bias = float_bias(conv)
        geometry = square_geometry(conv)
        assert geometry is not None  # eligible() checked it
        self.kernel, self.stride, self.padding = geometry
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.relu, self.in_place = relu, in_place

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        args = (x, self.packed, self.bias, self.kernel, self.stride, self.padding, self.relu)
        ops = torch.ops.resnext
        return operators.call_over_residual(
            ops.conv_x3, ops.conv_x3_, args, residual, self.in_place
        )

    def extra_repr(self) -> str:
        k = self.kernel
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size=({k}, {k}), "
            f"stride={self.stride}, padding={self.padding}, bf16x3"
            + (", relu" if self.relu else "")
            + (", in place" if self.in_place else "")
        )


class FmaConv1x1(Conv1x1Kernel):
    """A float32 1×1 convolution (any stride) and its epilogue, computed by `pointwise_fma`
    (AVX-512 or AVX2 FMAs)."""

    OP = torch.ops.resnext.pointwise_fma
    OP_IN_PLACE = torch.ops.resnext.pointwise_fma_
    KIND = "fma"

    def __init__(self, conv: nn.Conv2d, relu: bool = False, in_place: bool = False) -> None:
        if not fma_eligible(conv):
            raise ValueError(
                "conv: expected a float32 1×1 convolution the kernel takes (groups 1, no "
                f"padding, outputs a multiple of 16), got {conv}"
            )
        super().__init__(conv, pointwise_fma.pack(conv.weight), relu, in_place)

    def _args(self, x: torch.Tensor) -> tuple:
        return (x, self.packed, self.bias, self.stride, self.relu)


class DotConv1x1(Conv1x1Kernel):
    """A bf16 1×1 convolution and its epilogue, computed by `pointwise_gemm.conv1x1` (AVX512-BF16
    pair dot products, float32 sums, one rounding); a strided one (a projection shortcut) reads
    the input's every s-th pixel of every s-th row where it lies."""

    OP = torch.ops.resnext.pointwise_conv_bf16
    OP_IN_PLACE = torch.ops.resnext.pointwise_conv_bf16_
    KIND = "bf16 dot"

    def __init__(self, conv: nn.Conv2d, relu: bool = False, in_place: bool = False) -> None:
        if not dot_eligible(conv):
            raise ValueError(
                "conv: expected a bf16 1×1 convolution the kernel takes (groups 1, no padding, "
                f"inputs and outputs multiples of {pointwise_gemm.COLUMN_BLOCK}), got {conv}"
            )
        super().__init__(conv, pointwise_gemm.pack_conv(conv.weight), relu, in_place)

    def _args(self, x: torch.Tensor) -> tuple:
        return (x, self.packed, self.bias, self.stride, self.relu)


def eligible(module: nn.Module) -> bool:
    """Whether `module` is a float32 Conv2d `conv_x3` computes (groups 1, square, zero padding)."""
    geometry = square_geometry(module)
    return (
        geometry is not None
        and module.weight.dtype == torch.float32
        and conv_x3.supports(module.in_channels, module.out_channels, *geometry)
    )


def fma_eligible(module: nn.Module) -> bool:
    """Whether `module` is a float32 Conv2d `pointwise_fma` computes (1×1, groups 1, no padding)."""
    geometry = square_geometry(module)
    return (
        geometry is not None
        and module.weight.dtype == torch.float32
        and pointwise_fma.supports(module.in_channels, module.out_channels, *geometry)
    )


def dot_eligible(module: nn.Module) -> bool:
    """Whether `module` is a bf16 Conv2d `DotConv1x1` computes (1×1, groups 1, no padding,
    channels multiples of 64, any stride)."""
    geometry = square_geometry(module)
    return (
        geometry is not None
        and geometry[0] == 1
        and geometry[2] == 0
        and module.weight.dtype == torch.bfloat16
        and pointwise_gemm.takes(module.in_channels, module.out_channels)
    )


X3 = DenseKernel(
    "conv_x3",
    "bf16x3",
    eligible,
    lambda conv, relu, in_place, _: ConvX3(conv, relu, in_place),
    lambda: conv_x3.unavailable_reason(),
)
FMA = DenseKernel(
    "pointwise_fma",
    "fma",
    fma_eligible,
    lambda conv, relu, in_place, _: FmaConv1x1(conv, relu, in_place),
    lambda: pointwise_fma.unavailable_reason(),
)
DOT = DenseKernel(
    "pointwise_bf16",
    "dot",
    dot_eligible,
    lambda conv, relu, in_place, _: DotConv1x1(conv, relu, in_place),
    lambda: pointwise_gemm.unavailable_reason(),
    torch.bfloat16,
)
# packed for the output pixel count of the input it is timed on
MKL = DenseKernel(
    "pointwise_mkl",
    "mkl",
    pointwise_mkl.eligible,
    pointwise_mkl.MklConv1x1,
    lambda: pointwise_mkl.unavailable_reason(),
)

# float16 products: chosen only where `optimize` is asked for them (not float32-exact)
FP16 = DenseKernel(
    "pointwise_fp16",
    "fp16",
    pointwise_fp16.eligible,
    lambda conv, relu, in_place, _: pointwise_fp16.Fp16Conv1x1(conv, relu, in_place),
    lambda: pointwise_fp16.unavailable_reason(),
)


def swap_convs_x3(
    model: nn.Module,
    example: torch.Tensor,
    *,
    mode: str = "auto",
    options: DenseOptions = DEFAULT_OPTIONS,
) -> list[LayerChoice]:
    """Replace, in place, the float32 convolutions of `model` `conv_x3` takes by `ConvX3`.

    `example` is the model's input (float32, channels_last). 'auto' times each convolution with
    its epilogue both ways on its real input shape and keeps the faster (as `options` says);
    'on' swaps every one (a ConfigError if the kernel cannot run here); 'off' changes nothing.
    Each choice is returned as a `LayerChoice` (native_ms: oneDNN, kernel_ms: ours, chosen
    'kernel' or 'native', variant 'bf16x3' plus '+relu', '+add+relu' and ', in place' for what
    the kernel applies). The timed residuals are overwritten by the in-place runs, so their
    values drift from call to call; only the time is kept.
    """
    return swap_dense_convs(model, example, X3, mode=mode, options=options)


def swap_convs_fma(
    model: nn.Module,
    example: torch.Tensor,
    *,
    mode: str = "auto",
    options: DenseOptions = DEFAULT_OPTIONS,
) -> list[LayerChoice]:
    """Replace, in place, the float32 1×1 convolutions of `model` that `pointwise_fma` takes by
    `FmaConv1x1`; as `swap_convs_x3` otherwise (variant 'fma…'). Run after `swap_convs_x3`, so
    that on a CPU with AMX the 1×1s it took stay with it."""
    return swap_dense_convs(model, example, FMA, mode=mode, options=options)


def swap_convs_dot(
    model: nn.Module,
    example: torch.Tensor,
    *,
    mode: str = "auto",
    options: DenseOptions = DEFAULT_OPTIONS,
) -> list[LayerChoice]:
    """Replace, in place, the bf16 1×1 convolutions of `model` that `pointwise_gemm.conv1x1`
    takes by `DotConv1x1`; as `swap_convs_x3` otherwise (`example`
    bf16, variant 'dot…'). Run after the AMX block fusions, which take their 1×1s first."""
    return swap_dense_convs(model, example, DOT, mode=mode, options=options)


def swap_convs_mkl(
    model: nn.Module,
    example: torch.Tensor,
    *,
    mode: str = "auto",
    options: DenseOptions = DEFAULT_OPTIONS,
) -> list[LayerChoice]:
    """Replace, in place, the float32 1×1 convolutions of `model` that the passes before left to
    oneDNN by `pointwise_mkl.MklConv1x1` (MKL's product on a weight packed for the layer's output
    pixel count; a stride's pixels gathered first) where that is faster; as `swap_convs_x3` otherwise (variant 'mkl…').
    On the Xeon without AMX it took most of ResNeXt-50's 1×1s at batch 16 and, in a replay, all
    of them at batch 1 (RESULTS.md, stop 55)."""
    return swap_dense_convs(model, example, MKL, mode=mode, options=options)


def swap_convs_fp16(
    model: nn.Module,
    example: torch.Tensor,
    *,
    mode: str = "auto",
    options: DenseOptions = DEFAULT_OPTIONS,
) -> list[LayerChoice]:
    """Replace, in place, the float32 1×1 convolutions of `model` that the passes before left to
    oneDNN by `pointwise_fp16.Fp16Conv1x1` (float16 products, float32 sums every 64, AVX512-FP16)
    where that is faster; as `swap_convs_x3` otherwise (variant 'fp16…'). Its results are
    float16-precise, so `optimize` runs it only where asked. On the Xeon without AMX it ran
    ResNeXt-50's 1×1s in 0.67× oneDNN's time at batch 16 (RESULTS.md, stop 56)."""
    return swap_dense_convs(model, example, FP16, mode=mode, options=options)
