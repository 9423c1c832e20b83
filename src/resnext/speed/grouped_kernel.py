"""Our grouped 3×3 convolution (AVX-512, or AVX2 + FMA): built from `kernels/` on first use, called via ctypes.

The C source is compiled once per machine with the system C compiler (`resnext.native`) and
loaded with ctypes; nothing is downloaded. It runs on the OpenMP threads torch already uses (the
library links ``libgomp.so.1``, which torch has loaded by then). The kernel is exposed as the
torch operator ``torch.ops.resnext.grouped_conv3x3`` so that torch.compile and torch.jit treat it
as one opaque call.

Two builds of one scheme: `grouped3x3.c` on 16-lane AVX-512 registers (float32 and bf16), and
`grouped3x3_avx2.c` on 8-lane AVX2 registers (float32) for CPUs without AVX-512. `ISA` is the one
this CPU runs; the weight packing follows its register width (`Isa.lanes`).
"""

from __future__ import annotations

import ctypes
import functools
from dataclasses import dataclass
from pathlib import Path

import torch

from resnext import native
from resnext.native import NativeUnavailable
from resnext.speed import operators
from resnext.speed.capability import cpu_flags, has_avx512_bf16
from resnext.speed.operators import check_bias

KERNELS = Path(__file__).with_name("kernels")
SUPPORTED_CPG = (4, 8, 16, 32, 64)


@dataclass(frozen=True)
class Isa(native.Build):
    """One build of the kernel (`native.Build`) and what its callers need: its lanes, its dtypes."""

    lanes: int  # float32 lanes of a register: the packing's channel block
    bf16: bool  # whether it takes bf16 activations (with the CPU's avx512_bf16)


AVX512 = Isa(
    "avx512",
    KERNELS / "grouped3x3.c",
    ("-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16", "-mfma", "-fopenmp"),
    frozenset({"avx512f", "avx512bw", "avx512vl"}),
    16,
    True,
    headers=KERNELS,
)
AVX2 = Isa(
    "avx2",
    KERNELS / "grouped3x3_avx2.c",
    ("-O3", "-mavx2", "-mfma", "-fopenmp"),
    frozenset({"avx2", "fma"}),
    8,
    False,
    headers=KERNELS,
)


def choose_isa(flags: set[str]) -> Isa:
    """The widest build a CPU with these flags runs (AVX-512 where it has neither, which then
    reports what it lacks)."""
    if AVX512.cpu_needs <= flags or not AVX2.cpu_needs <= flags:
        return AVX512
    return AVX2


ISA = choose_isa(cpu_flags())  # this CPU's build; fixed for the process


KernelUnavailable = NativeUnavailable  # the name this module's callers and tests use


def build(out_dir: Path | None = None) -> Path:
    """Compile the kernel (unless this source, these flags and this compiler already were)."""
    return native.build(ISA.source, ISA.flags, out_dir=out_dir)


@functools.cache
def _library_for(isa: Isa) -> ctypes.CDLL:
    lib = isa.load()
    fn = lib.grouped3x3_nhwc
    fn.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int] * 10
    fn.restype = ctypes.c_int
    if isa.source.parent == KERNELS:  # ours only: another revision's may predate it (stop 43)
        dgrad = lib.grouped3x3_dgrad_s2
        dgrad.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int] * 8
        dgrad.restype = ctypes.c_int
    if isa.source == AVX512.source:  # ours only: another revision's may predate it (stop 41)
        fused = lib.pointwise_grouped3x3_bf16
        fused.argtypes = (
            [ctypes.c_void_p] * 3 + [ctypes.c_int] + [ctypes.c_void_p] * 4 + [ctypes.c_int] * 10
        )
        fused.restype = ctypes.c_int
        block = lib.bottleneck_dot_bf16
        block.argtypes = [ctypes.c_void_p] * 7 + [ctypes.c_int] * 9
        block.restype = ctypes.c_int
    return lib


def library() -> ctypes.CDLL:
    """This CPU's build of the kernel, loaded (compiled on first use)."""
    return _library_for(ISA)


def unavailable_reason(dtype: torch.dtype = torch.float32) -> str | None:
    """None if the kernel can run here for `dtype`, else why not (one line)."""
    if dtype not in (torch.float32, torch.bfloat16):
        return f"dtype {dtype} is not float32 or bfloat16"
    if dtype == torch.bfloat16 and not ISA.bf16:
        return f"the {ISA.name} build of the kernel takes float32 only"
    if dtype == torch.bfloat16 and not has_avx512_bf16():
        return "this CPU lacks avx512_bf16"
    return _library_problem(ISA)


@functools.cache
def _library_problem(isa: Isa) -> str | None:
    # Cached, failures included: a machine without a compiler must not retry on every layer.
    return native.problem(lambda: _library_for(isa))


def supports(channels: int, groups: int, stride: int) -> bool:
    """Whether the kernel takes a 3×3 conv with this many channels (in = out), groups and stride."""
    if groups < 1 or channels % groups:
        return False
    cpg = channels // groups
    return channels % ISA.lanes == 0 and cpg in SUPPORTED_CPG and stride in (1, 2)


def _layout(cpg: int, lanes: int) -> tuple[int, int]:
    """(input registers per `lanes` outputs, block shuffles) of the diagonal kernel for `cpg`."""
    return max(cpg // lanes, 1), min(cpg // 4, lanes // 4)


NARROW_PAIR_CPG = (4, 8)  # the pair kernels whose groups share a 32-channel register
WIDE_PAIR_CPG = (16, 32, 64)  # the wide-group pair kernel's channels per group


def takes_pairs(channels: int, groups: int, dtype: torch.dtype) -> bool:
    """Whether bf16 activations of this shape have a pair-dot-product kernel (4, 8, 16, 32 or 64
    channels per group, channels a multiple of 32), which needs its own weight packing."""
    if not (ISA.bf16 and dtype == torch.bfloat16 and groups >= 1 and channels % 32 == 0):
        return False
    return channels % groups == 0 and channels // groups in (*NARROW_PAIR_CPG, *WIDE_PAIR_CPG)


def pack_weights(weight: torch.Tensor, groups: int, pairs: bool = False) -> torch.Tensor:
    """The (C, C/groups, 3, 3) weight rearranged as the kernel reads it.

    Default: fp32 [C/L][9][M][R][4][L] for this CPU's build's L lanes (`ISA.lanes`: 16 or 8);
    for output block cb, lane l = 4b + i of diagonal j under block shuffle r holds the weight
    from input lane 4·σ_r(b) + i (of input register m) to output lane 4b + (i − j) mod 4. With
    `pairs` (bf16 activations; see `takes_pairs`), 4 or 8 channels per group: bf16
    [C/32][9][cpg][32], where value 2l + k of output o's vector is the weight from input channel
    2l + k of the 32-channel block to output o of that channel's group; 16-64 channels per group: bf16
    [C/16][9][cpg/2][16][2], value k of output l's pair j the weight from group input 2j + k to
    output 16·block + l.
    """
    out_ch, cpg, kh, kw = weight.shape
    if (kh, kw) != (3, 3) or out_ch != cpg * groups or not supports(out_ch, groups, 1):
        raise ValueError(
            f"weight: expected a (C, C/groups, 3, 3) grouped weight with C % {ISA.lanes} == 0 "
            f"and C/groups in {SUPPORTED_CPG}, got shape {tuple(weight.shape)} with groups={groups}"
        )
    if pairs:
        if not takes_pairs(out_ch, groups, torch.bfloat16):
            raise ValueError(
                f"weight: pair packing needs 4, 8, 16, 32 or 64 channels per group and C % 32 == 0, "
                f"got shape {tuple(weight.shape)} with groups={groups}"
            )
        if cpg in WIDE_PAIR_CPG:
            w = weight.detach().float().reshape(out_ch // 16, 16, cpg // 2, 2, 9)
            return w.permute(0, 4, 2, 1, 3).contiguous().to(torch.bfloat16)
        block = torch.arange(out_ch // 32).view(-1, 1, 1)
        o = torch.arange(cpg).view(1, -1, 1)
        q = torch.arange(32).view(1, 1, -1)
        channel = block * 32 + q  # input channel of value q
        out_idx = (channel // cpg) * cpg + o
        out_idx, in_idx = torch.broadcast_tensors(out_idx, channel % cpg)
        taps = (
            weight.detach().float().reshape(out_ch, cpg, 9)[out_idx, in_idx]
        )  # (C/32, cpg, 32, 9)
        return taps.permute(0, 3, 1, 2).contiguous().to(torch.bfloat16)
    lanes = ISA.lanes
    inputs, shuffles = _layout(cpg, lanes)
    cb = torch.arange(out_ch // lanes).view(-1, 1, 1, 1, 1)
    m = torch.arange(inputs).view(1, -1, 1, 1, 1)
    r = torch.arange(shuffles).view(1, 1, -1, 1, 1)
    j = torch.arange(4).view(1, 1, 1, -1, 1)
    lane = torch.arange(lanes).view(1, 1, 1, 1, -1)
    block, i = lane // 4, lane % 4
    out_idx = cb * lanes + 4 * block + (i - j) % 4
    # the shuffles: swap blocks within pairs (R = 2), else rotate the 4 blocks by r
    sigma = block ^ r if shuffles == 2 else (block + r) % 4
    in_lane = 4 * sigma + i
    in_idx = m * lanes + in_lane if cpg >= lanes else in_lane % cpg
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


def check_activation(x: torch.Tensor, name: str) -> None:
    """A ValueError naming `name` unless x is a 4-d CPU tensor of a dtype this build takes."""
    dtypes = (torch.float32, torch.bfloat16) if ISA.bf16 else (torch.float32,)
    if x.dim() != 4 or x.dtype not in dtypes or x.device.type != "cpu":
        names = " or ".join(str(t).removeprefix("torch.") for t in dtypes)
        raise ValueError(
            f"{name}: expected a 4-d {names} CPU tensor (the {ISA.name} build), got "
            f"{tuple(x.shape)} {x.dtype} on {x.device}"
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
    check_activation(x, "x")
    operators.check_no_grad("the grouped kernel", x)
    packing = packing_of(x.shape[1], groups, stride, packed, bias, x.dtype)
    return call_kernel(x, packed, bias, groups, stride, relu, packing)


def packing_of(
    channels: int,
    groups: int,
    stride: int,
    packed: torch.Tensor,
    bias: torch.Tensor | None,
    dtype: torch.dtype,
) -> int:
    """The C entry's packing number (0 widening, 1 and 2 pairs) for `packed` = pack_weights(w)
    of this shape, after checking the shape, the packed weight and the bias (a ValueError
    naming the one that does not fit) for activations of `dtype`."""
    c = channels  # the messages' name for it
    if not supports(c, groups, stride):
        raise ValueError(
            f"x: {c} channels in {groups} groups with stride {stride} is not a shape the kernel "
            f"takes (C % {ISA.lanes} == 0, C/groups in {SUPPORTED_CPG}, stride 1 or 2)"
        )
    want = packed_numel(c, groups)
    pairs = packed.dtype == torch.bfloat16
    if pairs and not takes_pairs(c, groups, dtype):
        raise ValueError(
            f"packed: pair-packed (bf16) weights need bf16 activations with 4, 8, 16, 32 or 64 "
            f"channels per group and C % 32 == 0, got {dtype} x with {c} channels in {groups} "
            "groups"
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
    return (1 if c // groups in NARROW_PAIR_CPG else 2) if pairs else 0


def call_kernel(
    x: torch.Tensor,
    packed: torch.Tensor,
    bias: torch.Tensor | None,
    groups: int,
    stride: int,
    relu: bool,
    packing: int,
) -> torch.Tensor:
    """The C entry on arguments already checked (`run_kernel`, `grouped_split.run_split`):
    packing 0 (widening), 1 and 2 (pairs in channel order), 3 (pairs in the split order)."""
    n, c, h, w = x.shape
    x = x.contiguous(memory_format=torch.channels_last)
    y = output_for(x, stride)
    if y.numel():
        bias_c = None if bias is None else bias.contiguous()
        rc = library().grouped3x3_nhwc(
            x.data_ptr(), packed.data_ptr(), None if bias_c is None else bias_c.data_ptr(),
            y.data_ptr(), int(x.dtype == torch.bfloat16), packing, n, h, w, c, c // groups,
            stride, int(relu), torch.get_num_threads(),
        )  # fmt: skip
        if rc != 0:
            raise ValueError(f"grouped3x3 kernel refused shape {tuple(x.shape)}, groups={groups}")
    return y


def call_pointwise_kernel(
    x: torch.Tensor,
    pointwise: torch.Tensor,
    pointwise_bias: torch.Tensor,
    packed: torch.Tensor,
    bias: torch.Tensor | None,
    groups: int,
    stride: int,
    relu: bool,
    packing: int,
    ahead: int,
) -> torch.Tensor:
    """The fused C entry (a 1×1 + ReLU, then the grouped 3×3 of `packing`) on bf16 arguments
    already checked (`dot_grouped.run_fused`); `ahead`: the 1×1 pixels computed per step."""
    n, k, h, w = x.shape
    c = pointwise_bias.numel()
    x = x.contiguous(memory_format=torch.channels_last)
    threads = torch.get_num_threads()
    y = output_for(x, stride, c)
    if y.numel():
        bias_c = None if bias is None else bias.contiguous()
        rc = library().pointwise_grouped3x3_bf16(
            # the 1×1's output: a buffer per thread, or where threads share images one the
            # call allocates (None)
            x.data_ptr(), pointwise.data_ptr(), pointwise_bias.contiguous().data_ptr(), k, None,
            packed.data_ptr(),
            None if bias_c is None else bias_c.data_ptr(), y.data_ptr(), packing, n, h, w, c,
            c // groups, stride, int(relu), ahead, threads,
        )  # fmt: skip
        if rc == 2:
            raise MemoryError("pointwise_grouped3x3_bf16: could not allocate its buffers")
        if rc != 0:
            raise ValueError(
                f"pointwise_grouped3x3_bf16 refused x {tuple(x.shape)} → {c} channels in "
                f"{groups} groups, stride {stride}, packing {packing}"
            )
    return y


def block_kernel_takes(images: int, threads: int) -> bool:
    """Whether `call_block_kernel` takes a batch of `images` on `threads` threads: it gives each
    thread whole images (the C entry's own rule, pinned by a test)."""
    return threads >= 1 and images % threads == 0


def call_block_kernel(
    x: torch.Tensor,
    pointwise: torch.Tensor,
    pointwise_bias: torch.Tensor,
    packed: torch.Tensor,
    bias: torch.Tensor | None,
    last: torch.Tensor,
    last_bias: torch.Tensor,
    groups: int,
    packing: int,
    ahead: int,
) -> bool:
    """The whole-bottleneck C entry on checked bf16 arguments (`dot_block.run_block_`), written
    over the channels-last `x`; False (nothing written) where it does not take the call: images
    not a multiple of the threads (`block_kernel_takes`)."""
    n, k, h, w = x.shape
    c = pointwise_bias.numel()
    bias_c = None if bias is None else bias.contiguous()
    rc = library().bottleneck_dot_bf16(
        x.data_ptr(), pointwise.data_ptr(), pointwise_bias.contiguous().data_ptr(),
        packed.data_ptr(), None if bias_c is None else bias_c.data_ptr(), last.data_ptr(),
        last_bias.contiguous().data_ptr(), packing, n, h, w, k, c, c // groups, ahead,
        torch.get_num_threads(),
    )  # fmt: skip
    if rc == 2:
        raise MemoryError("bottleneck_dot_bf16: could not allocate a thread's buffers")
    return rc == 0


def packed_numel(channels: int, groups: int) -> int:
    """How many values pack_weights makes for this many channels and groups (either packing)."""
    inputs, shuffles = _layout(channels // groups, ISA.lanes)
    return (channels // ISA.lanes) * 9 * inputs * shuffles * 4 * ISA.lanes


def fake_grouped(
    x: torch.Tensor,
    packed: torch.Tensor,
    bias: torch.Tensor | None,
    groups: int,
    stride: int,
    relu: bool,
) -> torch.Tensor:
    """The output's shape, dtype and layout without running the kernel (for torch.compile): the
    fake of every grouped 3×3 operator of this signature (ours, the split order's, AMX's)."""
    return output_for(x, stride)


# The kernel as the operator torch.ops.resnext.grouped_conv3x3 (see `run_kernel`).
operators.define(
    "grouped_conv3x3(Tensor x, Tensor packed, Tensor? bias, int groups, int stride, bool relu)"
    " -> Tensor",
    run_kernel,
    fake_grouped,
)
