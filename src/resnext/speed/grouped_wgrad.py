"""The grouped 3×3 convolution's weight gradient: `kernels/grouped3x3_wgrad*.c` via ctypes.

Built on first use like the other C parts (`resnext.native`); runs on torch's OpenMP threads.
Takes channels-last float32 or bfloat16 CPU tensors with 4 or 8 channels per group and returns
the float32 gradient; `resnext.speed.grouped_train` decides when it applies. bf16 tensors with a
multiple of 32 channels use AVX512-BF16's pair dot product where the CPU has it, which also takes
16, 32 or 64 channels per group (as the AVX2 build does in float32). Like the
forward kernel it has an AVX-512 build and an AVX2 one (float32 only); it runs the build of the
forward kernel's `grouped_kernel.ISA`, whose channel blocks it shares.
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import torch

from resnext import native
from resnext.speed import grouped_kernel
from resnext.speed.capability import has_avx512_bf16

KERNELS = Path(__file__).with_name("kernels")
# Each build, by the forward kernel's ISA name: its flags and CPU needs.
BUILDS = {
    isa.name: native.Build(isa.name, KERNELS / source, isa.flags, isa.cpu_needs, headers=KERNELS)
    for isa, source in (
        (grouped_kernel.AVX512, "grouped3x3_wgrad.c"),
        (grouped_kernel.AVX2, "grouped3x3_wgrad_avx2.c"),
    )
}
SUPPORTED_CPG = (4, 8)
# Groups also taken as small matrix products: by the AVX2 build in float32 (its `wgrad_wide`), by
# the AVX-512 build in bf16 with pair dot products (`wgrad_pairs`, which needs C % 32 == 0).
WIDE_CPG = (16, 32, 64)
DTYPES = {torch.float32: 0, torch.bfloat16: 1}


def load(isa: grouped_kernel.Isa, source: Path | None = None) -> ctypes.CDLL:
    """`isa`'s build of the kernel (from this package's source, or another revision's `source`
    for `benchmarks/bench_network_ab.py`) loaded, its C signature declared."""
    lib = BUILDS[isa.name].load(source)
    lib.grouped3x3_wgrad_nhwc.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int] * 9
    lib.grouped3x3_wgrad_nhwc.restype = ctypes.c_int
    return lib


@functools.cache
def _library_for(isa: grouped_kernel.Isa) -> ctypes.CDLL:
    return load(isa)


def _library() -> ctypes.CDLL:
    return _library_for(grouped_kernel.ISA)


@functools.cache
def _library_problem(isa: grouped_kernel.Isa) -> str | None:
    return native.problem(lambda: _library_for(isa))


def unavailable_reason(dtype: torch.dtype = torch.float32) -> str | None:
    """None if the kernel can run here for `dtype`, else why not (one line; builds decided once
    per process)."""
    if dtype not in DTYPES:
        return f"dtype {dtype} is not float32 or bfloat16"
    if dtype == torch.bfloat16 and not grouped_kernel.ISA.bf16:
        return f"the {grouped_kernel.ISA.name} build of the kernel takes float32 only"
    return _library_problem(grouped_kernel.ISA)


def wide_takes(dtype: torch.dtype) -> bool:
    """Whether this process's build takes 16–64 channels per group in `dtype`: the AVX2 build in
    float32, the AVX-512 one in bf16 where the CPU has AVX512-BF16 (the pair kernel only)."""
    if grouped_kernel.ISA.name == "avx2":
        return dtype == torch.float32
    return dtype == torch.bfloat16 and has_avx512_bf16()


def group_widths(dtype: torch.dtype = torch.float32) -> tuple[int, ...]:
    """The channels per group this process's build takes in `dtype`: 4 and 8, and the wide
    widths where `wide_takes` says so."""
    return SUPPORTED_CPG + (WIDE_CPG if wide_takes(dtype) else ())


def supports(channels: int, groups: int, stride: int, dtype: torch.dtype = torch.float32) -> bool:
    """Whether the kernel takes a 3×3 conv with this many channels (in = out), groups and stride
    in `dtype`."""
    # The forward kernel's shapes (its channel blocks, strides 1 and 2), maybe fewer group widths.
    if not grouped_kernel.supports(channels, groups, stride):
        return False
    cpg = channels // groups
    if cpg in WIDE_CPG and grouped_kernel.ISA.name != "avx2" and channels % 32:
        return False  # the pair kernel's 32-channel lines
    return cpg in group_widths(dtype)


def widening_takes(channels: int, groups: int) -> bool:
    """Whether a bf16 gradient of this shape can also be computed by widening to float32 FMAs
    (`weight_grad(..., pairs=False)`): 4 or 8 channels per group, on the AVX-512 build."""
    return grouped_kernel.ISA.name == "avx512" and channels // groups in SUPPORTED_CPG


def check_output_grad(x: torch.Tensor, grad: torch.Tensor, stride: int) -> None:
    """A ValueError naming `grad` unless its shape is the output of a padding-1 3×3 convolution
    of `x` at `stride` (channels in = out)."""
    n, c, h, w = x.shape
    size = grouped_kernel.output_size
    want = (n, c, size(h, stride), size(w, stride))
    if tuple(grad.shape) != want:
        raise ValueError(
            f"grad: expected shape {want} for x {tuple(x.shape)}, got {tuple(grad.shape)}"
        )


def pairs_apply(x: torch.Tensor) -> bool:
    """Whether the AVX512-BF16 pair kernel can take input `x` (bf16, C % 32 == 0, CPU has it)."""
    return x.dtype == torch.bfloat16 and x.shape[1] % 32 == 0 and has_avx512_bf16()


def weight_grad(
    x: torch.Tensor, grad: torch.Tensor, groups: int, stride: int, pairs: bool | None = None
) -> torch.Tensor:
    """float32 gradient of ``conv2d(x, w, stride=stride, padding=1, groups=groups)`` w.r.t. w.

    `pairs`: use AVX512-BF16's pair dot product where it applies (`pairs_apply`); None: wherever
    the CPU has it. False widens bf16 to float32 FMAs, on any AVX-512 CPU, for 4 or 8 channels
    per group (`widening_takes`); wider groups in bf16 have the pair kernel only.
    """
    n, c, h, w = x.shape
    # bf16 only on a build that takes it (a library that fails to build is `_library()`'s to say)
    dtypes = "float32/bfloat16" if grouped_kernel.ISA.bf16 else "float32"
    unsupported_bf16 = x.dtype == torch.bfloat16 and not grouped_kernel.ISA.bf16
    if (
        x.dtype not in DTYPES
        or unsupported_bf16
        or grad.dtype != x.dtype
        or not supports(c, groups, stride, x.dtype)
    ):
        raise ValueError(
            f"x: expected {dtypes} with C % {grouped_kernel.ISA.lanes} == 0, C/groups in "
            f"{group_widths(x.dtype) if x.dtype in DTYPES else SUPPORTED_CPG}, stride 1 or 2 and "
            f"a gradient of the same dtype; got {tuple(x.shape)} {x.dtype}, groups={groups}, "
            f"stride={stride}, gradient {grad.dtype}"
        )
    check_output_grad(x, grad, stride)
    use_pairs = pairs_apply(x) if pairs is None else pairs and pairs_apply(x)
    if x.dtype == torch.bfloat16 and not use_pairs and not widening_takes(c, groups):
        raise ValueError(
            f"pairs: {c // groups} channels per group in bf16 take the pair kernel only "
            f"(pairs=True or None on a CPU with AVX512-BF16), got pairs={pairs}"
        )
    x = x.contiguous(memory_format=torch.channels_last)
    grad = grad.contiguous(memory_format=torch.channels_last)
    dw = torch.empty(c, c // groups, 3, 3, dtype=torch.float32)
    if n == 0 or h == 0 or w == 0:
        return dw.zero_()
    rc = _library().grouped3x3_wgrad_nhwc(
        x.data_ptr(), grad.data_ptr(), dw.data_ptr(), DTYPES[x.dtype], int(use_pairs),
        n, h, w, c, c // groups, stride, torch.get_num_threads(),
    )  # fmt: skip
    if rc == 2:
        raise MemoryError("grouped3x3_wgrad: could not allocate the per-thread sums")
    if rc != 0:
        raise ValueError(f"grouped3x3_wgrad refused shape {tuple(x.shape)}, groups={groups}")
    return dw
