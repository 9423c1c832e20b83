"""Our int8 grouped 3×3 convolution (AVX512-VNNI, else AVX2) in place of torch's quantized one.

`kernels/grouped3x3_int8.c` (AVX512-VNNI: uint8 × int8 products summed in int32) or, on x86 CPUs
without it, `kernels/grouped3x3_int8_avx2.c` (int16 products summed in int32) is compiled on
first use (`resnext.native`) and called through ctypes on uint8 channels-last maps; both compute
the same codes. `GroupedInt8` is built from a converted torch.ao quantized convolution (`Conv2d`
or `ConvReLU2d`, int8 weights symmetric per output channel) and computes what it computes,
reading that module's weights, bias and output scale: `Int8Bottleneck` calls it in place of its
`conv2` where it takes the layer, so the module tree and its state-dict keys stay torchvision's.
"""

from __future__ import annotations

import ctypes
import functools
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from resnext import native

KERNELS = Path(__file__).with_name("kernels")
SUPPORTED_CPG = (4, 8, 16, 32, 64)


@dataclass(frozen=True)
class Build(native.Build):
    """One instruction set's build of the kernel (`native.Build`) and its output blocks' width in
    channels, which sets how its weights are packed."""

    lanes: int


VNNI = Build(
    "avx512-vnni",
    KERNELS / "grouped3x3_int8.c",
    ("-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni", "-fopenmp"),
    frozenset({"avx512f", "avx512bw", "avx512vl", "avx512_vnni"}),
    16,
    headers=KERNELS,
)
AVX2 = Build(
    "avx2",
    KERNELS / "grouped3x3_int8_avx2.c",
    ("-O3", "-mavx2", "-mfma", "-fopenmp"),
    frozenset({"avx2", "fma"}),
    8,
    headers=KERNELS,
)
BUILDS = (VNNI, AVX2)  # the first this CPU runs is used


def load(build: Build, source: Path | None = None) -> ctypes.CDLL:
    """`build` compiled for this CPU and loaded, its C signature declared (NativeUnavailable
    where it cannot be); from another revision's `source` of it for
    `benchmarks/bench_int8_kernels.py --against`."""
    lib = build.load(source)
    source = build.source if source is None else source
    try:
        fn = lib.grouped3x3_u8s8
    except AttributeError:
        raise native.NativeUnavailable(f"{source} defines no grouped3x3_u8s8") from None
    fn.argtypes = [ctypes.c_void_p] * 5 + [ctypes.c_int] * 10
    fn.restype = ctypes.c_int
    return lib


# each build from this checkout's source, loaded once; the first this CPU runs is the one used
CHOICE = native.Builds(BUILDS, load)
library, build_problem, active = CHOICE.library, CHOICE.problem, CHOICE.active


def _library(build: Build) -> ctypes.CDLL:
    """The library a kernel packed for `build` calls (a benchmark swaps in another revision's)."""
    return library(build)


@functools.cache
def unavailable_reason() -> str | None:
    """None where the kernel runs on this machine, else why not (one line: each build's missing
    CPU flags, or why it could not be built); checked once."""
    return native.problem(active)


def supports(conv: nn.Module) -> bool:
    """Whether `conv` is a quantized grouped 3×3 (padding 1, stride 1 or 2, channels in = out, a
    multiple of 16, 4–64 per group, at least 2 groups) with symmetric per-channel int8 weights.
    A dense 3×3 (one group) stays on torch's engine, whose dense int8 rate is above ours."""
    from torch.ao.nn.quantized import Conv2d as QConv2d  # ConvReLU2d derives from it

    if not isinstance(conv, QConv2d):
        return False
    channels, groups = conv.out_channels, conv.groups
    if conv.in_channels != channels or groups < 2 or channels % groups or channels % 16:
        return False
    shape_ok = (
        conv.kernel_size == (3, 3)
        and conv.padding == (1, 1)
        and conv.dilation == (1, 1)
        and conv.stride in ((1, 1), (2, 2))
        and conv.padding_mode == "zeros"
        and channels // groups in SUPPORTED_CPG
    )
    if not shape_ok:
        return False
    w = conv.weight()
    return w.qscheme() == torch.per_channel_affine and bool(
        (w.q_per_channel_zero_points() == 0).all()
    )


def pack_weights(codes: torch.Tensor, lanes: int = 16) -> torch.Tensor:
    """(C, cpg, 3, 3) int8 weight codes as a build with `lanes`-channel output blocks reads them.

    16 lanes (AVX512-VNNI), int8 [C/16][9][R][16][4]: value k of register r's lane j at tap t is
    the weight from input i to output o of output block cb, where
    - 4 channels a group (R = 1): o = 16 cb + 4 (j % 4) + j / 4, i = k;
    - 8 channels a group (R = 2, a register per group): o = 16 cb + 8 r + j / 2, i = 4 (j % 2) + k;
    - 16 or more (R = cpg / 4 quads): o = 16 cb + j, i = 4 r + k.
    8 lanes (AVX2), int16 [C/8][9][R][8][2], R pair passes:
    - 4 channels a group (R = 2): o = 8 cb + 4 (j % 2) + j / 2, i = 2 r + k;
    - 8 or more (R = cpg / 2): o = 8 cb + j, i = 2 r + k; then, for rows of 7-bit codes, the same
      weights as int8 quads [C/8][9][cpg/4][8][4], o = 8 cb + j, i = 4 r + k (its bytes in the
      int16 tensor's tail)."""
    cpg = codes.shape[1]
    if lanes not in (8, 16):
        raise ValueError(f"lanes: expected 8 or 16, got {lanes}")
    j = torch.arange(lanes)
    per = 4 if lanes == 16 else 2  # input channels a lane sums per register
    if cpg == 4:
        groups = lanes // 4  # in one block
        r = torch.arange(4 // per).view(-1, 1, 1)
        o = (4 * (j % groups) + j // groups).view(1, lanes, 1)
        i = per * r + torch.arange(per).view(1, 1, per)
    elif cpg == 8 and lanes == 16:
        r = torch.arange(2).view(2, 1, 1)
        o = 8 * r + (j // 2).view(1, 16, 1)
        i = 4 * (j % 2).view(1, 16, 1) + torch.arange(4).view(1, 1, 4)
    else:
        return _one_group_blocks(codes, lanes)
    packed = _gathered(codes, lanes, o, i)
    return packed if lanes == 16 else packed.to(torch.int16)


def _one_group_blocks(codes: torch.Tensor, lanes: int) -> torch.Tensor:
    """The packing where every lane of a block is in one group (8 or more channels a group):
    lane j is output j, register r sums inputs n·r … n·r + n − 1: with 16 lanes the int8 quads
    (n = 4), with 8 the int16 pairs (n = 2) and then the int8 quads."""
    cpg = codes.shape[1]
    lane = torch.arange(lanes).view(1, lanes, 1)

    def inputs(n: int) -> torch.Tensor:  # n a register: (cpg / n, 1, n)
        return n * torch.arange(cpg // n).view(-1, 1, 1) + torch.arange(n).view(1, 1, n)

    if lanes == 16:
        return _gathered(codes, lanes, lane, inputs(4))
    pairs = _gathered(codes, lanes, lane, inputs(2)).to(torch.int16)
    quads = _gathered(codes, lanes, lane, inputs(4))
    return torch.cat([pairs.flatten(), quads.flatten().view(torch.int16)])


def _gathered(codes: torch.Tensor, lanes: int, o: torch.Tensor, i: torch.Tensor) -> torch.Tensor:
    """codes[block·lanes + o, i, tap] as int8 [C/lanes][9][R][lanes][per], o and i broadcast to
    (R, lanes, per)."""
    out_ch, cpg = codes.shape[:2]
    o, i = torch.broadcast_tensors(o, i)
    blocks = torch.arange(out_ch // lanes).view(-1, 1, 1, 1) * lanes
    taps = codes.reshape(out_ch, cpg, 9)[blocks + o, i]  # (C/lanes, R, lanes, per, 9)
    return taps.permute(0, 4, 1, 2, 3).contiguous()


class GroupedInt8:
    """One quantized grouped 3×3's int8 weights packed for a build of the kernel, with the
    per-channel constants of its requantization. Not a module: it holds nothing the quantized
    convolution it was built from does not already save."""

    def __init__(self, conv: nn.Module, build: Build | None = None) -> None:
        if not supports(conv):
            raise ValueError(
                f"conv: expected a quantized grouped 3×3 the int8 kernel takes, got {conv!r}"
            )
        w = conv.weight()
        codes = w.int_repr()
        self.build = active() if build is None else build  # the one this machine runs first
        self.weights = pack_weights(codes, self.build.lanes)
        self.wsum = codes.sum(dim=(1, 2, 3), dtype=torch.int32).contiguous()
        self.weight_scale = w.q_per_channel_scales().double()
        bias = conv.bias()
        self.bias = (
            torch.zeros(conv.out_channels, dtype=torch.float64) if bias is None else bias.double()
        )
        self.cpg = conv.out_channels // conv.groups
        self.stride = conv.stride[0]
        self.relu = type(conv).__name__ == "ConvReLU2d"
        # (input scale and zero point, output scale and zero point): their (m, b), made once
        self._constants: tuple[tuple, torch.Tensor, torch.Tensor] | None = None

    def _requant(
        self, in_scale: float, in_zero: int, out_scale: float, out_zero: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(m, b) per output channel: the kernel's y = round(sum x w · m + b) (see its source)."""
        key = (in_scale, in_zero, out_scale, out_zero)
        if self._constants is None or self._constants[0] != key:
            m = self.weight_scale * (in_scale / out_scale)
            b = self.bias / out_scale + out_zero - in_zero * self.wsum.double() * m
            self._constants = (key, m.float().contiguous(), b.float().contiguous())
        return self._constants[1], self._constants[2]

    def __call__(self, x: torch.Tensor, out_scale: float, out_zero_point: int) -> torch.Tensor:
        """The convolution of `x` (quint8, (N, C, H, W), per-tensor scale), requantized to
        `out_scale` and `out_zero_point` as the source convolution's output is."""
        if x.dtype != torch.quint8 or x.qscheme() != torch.per_tensor_affine:
            raise ValueError(f"x: expected a per-tensor quint8 map, got {x.dtype}")
        x = x.contiguous(memory_format=torch.channels_last)
        n, c, h, w = x.shape
        s = self.stride
        y = torch._empty_affine_quantized(
            (n, c, (h - 1) // s + 1, (w - 1) // s + 1),
            scale=out_scale,
            zero_point=out_zero_point,
            dtype=torch.quint8,
            memory_format=torch.channels_last,
        )
        m, b = self._requant(x.q_scale(), x.q_zero_point(), out_scale, out_zero_point)
        rc = _library(self.build).grouped3x3_u8s8(
            x.data_ptr(), self.weights.data_ptr(), m.data_ptr(), b.data_ptr(), y.data_ptr(),
            n, h, w, c, self.cpg, s, x.q_zero_point(), out_zero_point, int(self.relu),
            torch.get_num_threads(),
        )  # fmt: skip
        if rc != 0:
            raise RuntimeError(f"grouped3x3_u8s8 failed ({rc}) on {tuple(x.shape)}, cpg {self.cpg}")
        return y


def reference(conv: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The codes a quantized (grouped) 3×3 `conv` should give for the quint8 map `x`, by its
    definition in float64: dequantize the input and weights, convolve with zero padding, add the
    bias, ReLU if fused, requantize to the output's scale (round half to even, clamp to uint8).
    Independent of the kernel and of torch's engines: what tests and the fuzzer check both by."""
    bias = conv.bias()
    y = nn.functional.conv2d(
        x.dequantize().double(),
        conv.weight().dequantize().double(),
        None if bias is None else bias.double(),
        conv.stride,
        conv.padding,
        conv.dilation,
        conv.groups,
    )
    if type(conv).__name__ == "ConvReLU2d":
        y = y.clamp(min=0)
    return (torch.round(y / conv.scale) + conv.zero_point).clamp(0, 255)
