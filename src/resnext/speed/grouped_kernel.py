"""Our AVX-512 grouped 3×3 convolution: built from `kernels/grouped3x3.c` on first use, called via ctypes.

The C source is compiled once per machine with the system C compiler (`resnext.native`) and
loaded with ctypes; nothing is downloaded. It runs on the OpenMP threads torch already uses (the
library links ``libgomp.so.1``, which torch has loaded by then). The kernel is exposed as the
torch operator ``torch.ops.resnext.grouped_conv3x3`` so that torch.compile and torch.jit treat it
as one opaque call.
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import torch

from resnext import native
from resnext.native import NativeUnavailable
from resnext.speed import operators
from resnext.speed.capability import has_avx512_bf16

SOURCE = Path(__file__).with_name("kernels") / "grouped3x3.c"
FLAGS = (
    "-O3",
    "-mavx512f",
    "-mavx512bw",
    "-mavx512vl",
    "-mavx512bf16",
    "-mfma",
    "-fopenmp",
)
REQUIRED_FLAGS = frozenset({"avx512f", "avx512bw", "avx512vl"})
SUPPORTED_CPG = (4, 8, 16, 32, 64)


KernelUnavailable = NativeUnavailable  # the name this module's callers and tests use


def build(out_dir: Path | None = None) -> Path:
    """Compile the kernel (unless this source, these flags and this compiler already were)."""
    return native.build(SOURCE, FLAGS, out_dir=out_dir)


@functools.lru_cache(maxsize=1)
def _library() -> ctypes.CDLL:
    lib = native.load(SOURCE, FLAGS, cpu_needs=REQUIRED_FLAGS)
    fn = lib.grouped3x3_nhwc
    fn.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int] * 10
    fn.restype = ctypes.c_int
    return lib


def unavailable_reason(dtype: torch.dtype = torch.float32) -> str | None:
    """None if the kernel can run here for `dtype`, else why not (one line)."""
    if dtype not in (torch.float32, torch.bfloat16):
        return f"dtype {dtype} is not float32 or bfloat16"
    if dtype == torch.bfloat16 and not has_avx512_bf16():
        return "this CPU lacks avx512_bf16"
    return _library_problem()


@functools.lru_cache(maxsize=1)
def _library_problem() -> str | None:
    # Cached, failures included: a machine without a compiler must not retry on every layer.
    return native.problem(_library)


def supports(channels: int, groups: int, stride: int) -> bool:
    """Whether the kernel takes a 3×3 conv with this many channels (in = out), groups and stride."""
    if groups < 1 or channels % groups:
        return False
    cpg = channels // groups
    return channels % 16 == 0 and cpg in SUPPORTED_CPG and stride in (1, 2)


def _layout(cpg: int) -> tuple[int, int]:
    """(input registers per 16 outputs, block shuffles) of the diagonal kernel for `cpg`."""
    return max(cpg // 16, 1), 1 if cpg == 4 else 2 if cpg == 8 else 4


def takes_pairs(channels: int, groups: int, dtype: torch.dtype) -> bool:
    """Whether bf16 activations of this shape use the pair-dot-product kernel (4 channels per
    group, channels a multiple of 32), which needs its own weight packing."""
    return dtype == torch.bfloat16 and channels % 32 == 0 and channels == 4 * groups


def pack_weights(weight: torch.Tensor, groups: int, pairs: bool = False) -> torch.Tensor:
    """The (C, C/groups, 3, 3) weight rearranged as the kernel reads it.

    Default: fp32 [C/16][9][M][R][4][16]; for output block cb, lane l = 4b + i of diagonal j under
    block shuffle r holds the weight from input lane 4·σ_r(b) + i (of input register m) to
    output lane 4b + (i − j) mod 4. With `pairs` (bf16 activations, 4 channels per group; see
    `takes_pairs`): bf16 [C/32][9][4][32], where value 2l + k of output o's vector is the weight
    from input channel 2l + k of the 32-channel block to output o of that channel's group.
    """
    out_ch, cpg, kh, kw = weight.shape
    if (kh, kw) != (3, 3) or out_ch != cpg * groups or not supports(out_ch, groups, 1):
        raise ValueError(
            f"weight: expected a (C, C/groups, 3, 3) grouped weight with C % 16 == 0 and "
            f"C/groups in {SUPPORTED_CPG}, got shape {tuple(weight.shape)} with groups={groups}"
        )
    if pairs:
        if not takes_pairs(out_ch, groups, torch.bfloat16):
            raise ValueError(
                f"weight: pair packing needs 4 channels per group and C % 32 == 0, got shape "
                f"{tuple(weight.shape)} with groups={groups}"
            )
        block = torch.arange(out_ch // 32).view(-1, 1, 1)
        o = torch.arange(4).view(1, -1, 1)
        q = torch.arange(32).view(1, 1, -1)
        channel = block * 32 + q  # input channel of value q
        out_idx = (channel // 4) * 4 + o
        out_idx, in_idx = torch.broadcast_tensors(out_idx, channel % 4)
        taps = weight.detach().float().reshape(out_ch, 4, 9)[out_idx, in_idx]  # (C/32, 4, 32, 9)
        return taps.permute(0, 3, 1, 2).contiguous().to(torch.bfloat16)
    inputs, shuffles = _layout(cpg)
    cb = torch.arange(out_ch // 16).view(-1, 1, 1, 1, 1)
    m = torch.arange(inputs).view(1, -1, 1, 1, 1)
    r = torch.arange(shuffles).view(1, 1, -1, 1, 1)
    j = torch.arange(4).view(1, 1, 1, -1, 1)
    lane = torch.arange(16).view(1, 1, 1, 1, -1)
    block, i = lane // 4, lane % 4
    out_idx = cb * 16 + 4 * block + (i - j) % 4
    sigma = block ^ r if shuffles == 2 else (block + r) % 4
    in_lane = 4 * sigma + i
    in_idx = m * 16 + in_lane if cpg >= 16 else in_lane % cpg
    out_idx, in_idx = torch.broadcast_tensors(out_idx, in_idx)
    taps = weight.detach().float().reshape(out_ch, cpg, 9)[out_idx, in_idx]
    return taps.permute(0, 5, 1, 2, 3, 4).contiguous()


def output_size(size: int, stride: int) -> int:
    """Output height/width of a 3×3 convolution with padding 1."""
    return (size - 1) // stride + 1


def output_for(x: torch.Tensor, stride: int, channels: int | None = None) -> torch.Tensor:
    """An uninitialised channels-last output of the 3×3 convolution of `x` (also for fake
    tensors), with `channels` outputs where they differ from x's (a 1×1 fused in front)."""
    n, c, h, w = x.shape
    shape = (n, c if channels is None else channels, output_size(h, stride), output_size(w, stride))
    return torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=torch.channels_last)


def check_bias(bias: torch.Tensor | None, channels: int) -> None:
    """A ValueError naming `bias` unless it is None or `channels` float32 values."""
    if bias is not None and (bias.dtype != torch.float32 or bias.numel() != channels):
        raise ValueError(
            f"bias: expected {channels} float32 values, got {bias.dtype} with {bias.numel()}"
        )


def run_kernel(
    x: torch.Tensor,
    packed: torch.Tensor,
    bias: torch.Tensor | None,
    groups: int,
    stride: int,
    relu: bool = False,
) -> torch.Tensor:
    """``conv2d(x, w, bias, stride, padding=1, groups)`` (then ReLU) with `packed` = pack_weights(w)."""
    if x.dim() != 4 or x.dtype not in (torch.float32, torch.bfloat16) or x.device.type != "cpu":
        raise ValueError(
            f"x: expected a 4-d float32 or bfloat16 CPU tensor, got {tuple(x.shape)} "
            f"{x.dtype} on {x.device}"
        )
    operators.check_no_grad("the grouped kernel", x)
    n, c, h, w = x.shape
    if not supports(c, groups, stride):
        raise ValueError(
            f"x: {c} channels in {groups} groups with stride {stride} is not a shape the kernel "
            f"takes (C % 16 == 0, C/groups in {SUPPORTED_CPG}, stride 1 or 2)"
        )
    want = packed_numel(c, groups)
    pairs = packed.dtype == torch.bfloat16
    if pairs and not takes_pairs(c, groups, x.dtype):
        raise ValueError(
            f"packed: pair-packed (bf16) weights need bf16 activations with 4 channels per group "
            f"and C % 32 == 0, got {x.dtype} x with {c} channels in {groups} groups"
        )
    if (
        packed.dtype not in (torch.float32, torch.bfloat16)
        or not packed.is_contiguous()
        or packed.numel() != want
    ):
        raise ValueError(
            f"packed: expected a contiguous tensor of {want} values from pack_weights, "
            f"got {packed.dtype} with {packed.numel()}"
        )
    check_bias(bias, c)
    x = x.contiguous(memory_format=torch.channels_last)
    y = output_for(x, stride)
    if y.numel():
        bias_c = None if bias is None else bias.contiguous()
        rc = _library().grouped3x3_nhwc(
            x.data_ptr(),
            packed.data_ptr(),
            None if bias_c is None else bias_c.data_ptr(),
            y.data_ptr(),
            int(x.dtype == torch.bfloat16),
            int(pairs),
            n,
            h,
            w,
            c,
            c // groups,
            stride,
            int(relu),
            torch.get_num_threads(),
        )
        if rc != 0:
            raise ValueError(f"grouped3x3 kernel refused shape {tuple(x.shape)}, groups={groups}")
    return y


def packed_numel(channels: int, groups: int) -> int:
    """How many values pack_weights makes for this many channels and groups (either packing)."""
    inputs, shuffles = _layout(channels // groups)
    return (channels // 16) * 9 * inputs * shuffles * 4 * 16


def _fake(
    x: torch.Tensor,
    packed: torch.Tensor,
    bias: torch.Tensor | None,
    groups: int,
    stride: int,
    relu: bool,
) -> torch.Tensor:
    """The output's shape, dtype and layout without running the kernel (for torch.compile)."""
    return output_for(x, stride)


# The kernel as the operator torch.ops.resnext.grouped_conv3x3 (see `run_kernel`).
operators.define(
    "grouped_conv3x3(Tensor x, Tensor packed, Tensor? bias, int groups, int stride, bool relu)"
    " -> Tensor",
    run_kernel,
    _fake,
)
