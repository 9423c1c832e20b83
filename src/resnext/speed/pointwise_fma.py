"""Our float32 1×1 convolution on FMAs (`kernels/pointwise_fma512.c` on AVX-512, else
`kernels/pointwise_fma.c` on AVX2) via ctypes.

A 1×1 convolution of a channels-last tensor is one matrix product of its pixels with the weight;
the kernel computes it from a weight packed in panels of 16 output channels, adds the bias and
optionally a residual, applies an optional ReLU, and takes a stride (a projection shortcut)
by reading every s-th pixel. The residual may be the output itself (`in_place`), as oneDNN's
1×1 adds into its residual in the frozen graph. Exposed as ``torch.ops.resnext.pointwise_fma``
and ``torch.ops.resnext.pointwise_fma_`` (written over the residual). Both builds take the same
packed weight and arguments; the first of `BUILDS` this CPU runs is used. Built on first use
like the project's other C parts (`resnext.native`), on torch's OpenMP threads.
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
from pathlib import Path

import torch

from resnext import native
from resnext.speed import operators

KERNELS = Path(__file__).with_name("kernels")
BUILDS = (
    # 7 pixels × 64 outputs a register tile: at batch 1 on an AVX-512 AMD EPYC, ResNeXt-50's 1×1s
    # alone in 0.91× oneDNN's time, level with it at batch 16 (benchmarks/RESULTS.md, stop 68)
    native.Build(
        "avx512",
        KERNELS / "pointwise_fma512.c",
        ("-O3", "-mavx512f", "-mfma", "-fopenmp"),
        frozenset({"avx512f", "fma"}),
        headers=KERNELS,
    ),
    native.Build(
        "avx2",
        KERNELS / "pointwise_fma.c",
        ("-O3", "-mavx2", "-mfma", "-fopenmp"),
        frozenset({"avx2", "fma"}),
        headers=KERNELS,
    ),
)
PANEL = 16  # output channels per packed panel


def load(
    defines: tuple[str, ...] = (), source: Path | None = None, build: native.Build | None = None
) -> ctypes.CDLL:
    """`build` (default: the first of `BUILDS` this CPU runs) compiled and loaded, its
    function's C signature declared: with extra `-D` compiler defines (other blocking
    constants, for `benchmarks/bench_pointwise_fma.py`) or from another revision's copy of its
    `source` (for `benchmarks/bench_network_ab.py`)."""
    build = active_build() if build is None else build
    if defines:
        build = dataclasses.replace(build, flags=(*build.flags, *defines))
    lib = build.load(source)
    lib.pointwise_fma.argtypes = [ctypes.c_void_p] * 5 + [ctypes.c_int] * 8
    lib.pointwise_fma.restype = ctypes.c_int
    return lib


# each build as this package has it, loaded once; the first this CPU runs is the one used
CHOICE = native.Builds(BUILDS, lambda build: load(build=build))
library, build_problem, active_build = CHOICE.library, CHOICE.problem, CHOICE.active


@functools.lru_cache(maxsize=1)
def _library() -> ctypes.CDLL:
    # the library `active_build` already loaded while it checked the build, not a second copy
    return library(active_build())


@functools.lru_cache(maxsize=1)
def unavailable_reason() -> str | None:
    """None if the kernel can run here, else why not (one line; decided once per process)."""
    return native.problem(_library)


def supports(in_channels: int, out_channels: int, kernel: int, stride: int, padding: int) -> bool:
    """Whether the kernel takes this convolution (groups 1): 1×1, no padding, any stride, output
    channels a multiple of 16."""
    return (
        kernel == 1
        and padding == 0
        and stride >= 1
        and in_channels >= 1
        and out_channels >= PANEL
        and out_channels % PANEL == 0
    )


def pack(weight: torch.Tensor) -> torch.Tensor:
    """A (C, Cin, 1, 1) weight as the kernel reads it: float32 (C/16, Cin, 16), each panel's 16
    output channels adjacent for every input channel."""
    if weight.dim() != 4 or weight.shape[2:] != (1, 1) or weight.shape[0] % PANEL:
        raise ValueError(
            f"weight: expected a (C, Cin, 1, 1) weight with C a multiple of {PANEL}, got shape "
            f"{tuple(weight.shape)}"
        )
    out_ch, in_ch = weight.shape[:2]
    panels = weight.detach().float().reshape(out_ch // PANEL, PANEL, in_ch)
    return panels.transpose(1, 2).contiguous()


def _check_packed(packed: torch.Tensor, in_ch: int) -> int:
    """The output channels of `packed`, a ValueError naming it unless it is `pack`'s output for
    `in_ch` input channels."""
    if (
        packed.dtype != torch.float32
        or packed.dim() != 3
        or packed.shape[1:] != (in_ch, PANEL)
        or not packed.is_contiguous()
    ):
        raise ValueError(
            f"packed: expected a contiguous float32 pointwise_fma.pack weight for {in_ch} input "
            f"channels, got {packed.dtype} {tuple(packed.shape)}"
        )
    return packed.shape[0] * PANEL


def run(
    x: torch.Tensor,
    packed: torch.Tensor,
    bias: torch.Tensor,
    stride: int = 1,
    relu: bool = False,
    residual: torch.Tensor | None = None,
    in_place: bool = False,
) -> torch.Tensor:
    """``relu?(conv2d(x, w, bias, stride) + residual)`` in float32 for a 1×1 weight `w` with
    `packed` = pack(w), written over `residual` (channels_last, then returned) if `in_place`."""
    operators.check_no_grad("pointwise_fma", x, residual)
    operators.check_float32_4d("x", x)
    n, cin, h, w = x.shape
    c = _check_packed(packed, cin)
    if stride < 1:
        raise ValueError(f"stride: expected a positive integer, got {stride}")
    x, y, residual = operators.pointwise_operands(x, c, stride, bias, residual, in_place)
    if y.numel():
        rc = _library().pointwise_fma(
            x.data_ptr(),
            packed.data_ptr(),
            bias.contiguous().data_ptr(),
            None if residual is None else residual.data_ptr(),
            y.data_ptr(),
            n,
            h,
            w,
            cin,
            c,
            stride,
            int(relu),
            torch.get_num_threads(),
        )
        if rc != 0:
            raise RuntimeError(f"pointwise_fma refused {tuple(x.shape)} → {c}, stride {stride}")
    return y


def _output_shape(
    x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor, stride: int, relu: bool
) -> tuple[int, ...]:
    return operators.pointwise_output_shape(tuple(x.shape), packed.shape[0] * PANEL, stride)


operators.define_over_residual(
    "pointwise_fma",
    "Tensor x, Tensor packed, Tensor bias, int stride, bool relu",
    run,
    _output_shape,
)
