"""Our float32 convolution on AMX tiles as three bf16 products (`kernels/conv_x3_amx.c`).

Each float32 operand is split into a bf16 high part and a bf16 low part; the product keeps
hi·hi + hi·lo + lo·hi with float32 accumulation, which is float32 accuracy to ~1e-5 of each
product (the C source derives the bound) at the AMX tile rate, ~5× the float32 FMA rate of the
Intel Xeon it was written on. Takes square kernels with groups 1: 1×1 convolutions read their
input pixels in place, larger ones (the 7×7 stem, dense 3×3s) gather each output pixel's patch.
Exposed as ``torch.ops.resnext.conv_x3`` (a new output) and ``torch.ops.resnext.conv_x3_``
(written over the residual). Runs only on CPUs with AMX-BF16 whose OS grants the tile state;
`unavailable_reason` says why not elsewhere.
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import torch

from resnext import native
from resnext.speed import operators
from resnext.speed.grouped_amx import FLAGS, load_amx
from resnext.speed.operators import check_bias

SOURCE = Path(__file__).with_name("kernels") / "conv_x3_amx.c"


def build(out_dir: Path | None = None) -> Path:
    """Compile the kernel (unless this source, these flags and this compiler already were)."""
    return native.build(SOURCE, FLAGS, out_dir=out_dir)


@functools.lru_cache(maxsize=1)
def _library() -> ctypes.CDLL:
    lib = load_amx(SOURCE, "conv_x3_allowed")
    lib.conv_x3_amx.argtypes = [ctypes.c_void_p] * 5 + [ctypes.c_int] * 10
    lib.conv_x3_amx.restype = ctypes.c_int
    lib.conv_x3_amx_shortcut.argtypes = [ctypes.c_void_p] * 5 + [ctypes.c_int] * 11
    lib.conv_x3_amx_shortcut.restype = ctypes.c_int
    return lib


@functools.lru_cache(maxsize=1)
def unavailable_reason() -> str | None:
    """None if the kernel can run here, else why not (one line; decided once per process)."""
    return native.problem(_library)


def depth(in_channels: int, kernel: int) -> int:
    """The product's depth K: a patch's kernel²·in_channels values, rounded up to 32."""
    return -(-kernel * kernel * in_channels // 32) * 32


def supports(in_channels: int, out_channels: int, kernel: int, stride: int, padding: int) -> bool:
    """Whether the kernel takes a square convolution of this shape (groups 1, zero padding)."""
    shape_ok = (
        in_channels >= 1
        and out_channels >= 16
        and out_channels % 16 == 0
        and kernel >= 1
        and stride >= 1
        and 0 <= padding < kernel
    )
    if kernel == 1:  # read in place: whole 32-channel K steps
        return shape_ok and in_channels % 32 == 0 and padding == 0
    return shape_ok


def split_bf16(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 `t` as bf16 (hi, lo) with hi = bf16(t) and lo = bf16(t − hi), each rounded to
    nearest even, as the kernel splits its inputs."""
    hi = t.float().to(torch.bfloat16)
    return hi, (t.float() - hi.float()).to(torch.bfloat16)


def pack(weight: torch.Tensor) -> torch.Tensor:
    """A (C, Cin, k, k) float32 weight as the kernel reads it: bf16 [C/16][K/32][2][16][16][2]
    (16-output tile, 32-deep K step, hi then lo, K pair, output, pair member), K running over
    kernel rows, columns and input channels, zero past k²·Cin."""
    if (
        weight.dim() != 4
        or weight.shape[2] != weight.shape[3]
        or not supports(weight.shape[1], weight.shape[0], weight.shape[2], 1, 0)
    ):
        raise ValueError(
            "weight: expected a (C, Cin, k, k) weight with C a multiple of 16 (and Cin of 32 "
            f"for k = 1), got shape {tuple(weight.shape)}"
        )
    out_ch, in_ch, k, _ = weight.shape
    flat = weight.detach().float().permute(0, 2, 3, 1).reshape(out_ch, k * k * in_ch)
    return tiles(torch.nn.functional.pad(flat, (0, depth(in_ch, k) - k * k * in_ch)))


def tiles(flat: torch.Tensor) -> torch.Tensor:
    """A (C, K) float32 matrix (C a multiple of 16, K of 32) as AMX B tiles, split into bf16 hi
    and lo: [C/16][K/32][2][16][16][2] (16-output tile, 32-deep K step, hi then lo, K pair,
    output, pair member)."""
    parts = []
    for part in split_bf16(flat):
        w = part.reshape(flat.shape[0] // 16, 16, -1, 16, 2)
        parts.append(w.permute(0, 2, 3, 1, 4))  # (tile, step, pair, output, member)
    return torch.stack(parts, dim=2).contiguous()


def _check_packed(packed: torch.Tensor, in_ch: int, kernel: int) -> int:
    """The output channels of `packed`, a ValueError naming it unless it is `pack`'s output for
    `in_ch` input channels and this kernel size."""
    steps = depth(in_ch, kernel) // 32
    if (
        packed.dtype != torch.bfloat16
        or packed.dim() != 6
        or packed.shape[1:] != (steps, 2, 16, 16, 2)
        or not packed.is_contiguous()
    ):
        raise ValueError(
            f"packed: expected a contiguous bf16 conv_x3.pack weight for {in_ch} input channels "
            f"and a {kernel}×{kernel} kernel ({steps} K steps), got {packed.dtype} "
            f"{tuple(packed.shape)}"
        )
    return packed.shape[0] * 16


def check_fits(h: int, w: int, kernel: int, padding: int) -> None:
    """A ValueError naming x unless its padded h × w holds the kernel at least once."""
    if h + 2 * padding < kernel or w + 2 * padding < kernel:
        raise ValueError(f"x: {h}×{w} is smaller than the {kernel}×{kernel} kernel")


def check_rc(rc: int, function: str, what: str) -> None:
    """The C function's refusal (its return code, unless 0) as a MemoryError or RuntimeError."""
    if rc == -2:
        raise MemoryError(f"{function}: out of memory for its per-thread buffers")
    if rc != 0:
        raise RuntimeError(f"{function} refused {what}")


def output_shape(
    x_shape: tuple[int, ...], out_channels: int, kernel: int, stride: int, padding: int
) -> tuple[int, int, int, int]:
    """The convolution's output shape (N, C, Ho, Wo)."""
    n, _, h, w = x_shape
    size = [(d + 2 * padding - kernel) // stride + 1 for d in (h, w)]
    return (n, out_channels, size[0], size[1])


def run(
    x: torch.Tensor,
    packed: torch.Tensor,
    bias: torch.Tensor,
    kernel: int = 1,
    stride: int = 1,
    padding: int = 0,
    relu: bool = False,
    residual: torch.Tensor | None = None,
    in_place: bool = False,
) -> torch.Tensor:
    """``relu?(conv2d(x, w, bias, stride, padding) + residual)`` in float32 with `packed` =
    pack(w), written over `residual` (channels_last, which is then returned) if `in_place`."""
    operators.check_no_grad("conv_x3", x, residual)
    operators.check_float32_4d("x", x)
    n, cin, h, w = x.shape
    c = _check_packed(packed, cin, kernel)
    if not supports(cin, c, kernel, stride, padding):
        raise ValueError(
            f"kernel, stride, padding: expected a supported convolution, got {kernel}×{kernel}, "
            f"stride {stride}, padding {padding} on {cin} input channels"
        )
    check_fits(h, w, kernel, padding)
    check_bias(bias, c)
    expected = output_shape(tuple(x.shape), c, kernel, stride, padding)
    y, residual = operators.float32_output(x, expected, residual, in_place)
    x = x.contiguous(memory_format=torch.channels_last)
    if y.numel():
        rc = _library().conv_x3_amx(
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
            kernel,
            stride,
            padding,
            int(relu),
            torch.get_num_threads(),
        )
        check_rc(rc, "conv_x3_amx", f"{tuple(x.shape)} → {c}, {kernel}×{kernel}, stride {stride}")
    return y


def run_with_shortcut(
    x: torch.Tensor,
    packed: torch.Tensor,
    bias: torch.Tensor,
    shortcut: torch.Tensor,
    shortcut_stride: int,
    relu: bool = True,
) -> torch.Tensor:
    """``relu?(conv2d(x, w) + conv2d(shortcut, wsc, stride=shortcut_stride) + bias)`` in float32:
    a block's last 1×1 and its 1×1 projection shortcut as one product, with `packed` =
    pack(torch.cat([w, wsc], 1)) (x's channels first) and `bias` the two biases summed. The
    projection's output never goes to memory."""
    operators.check_no_grad("conv_x3", x, shortcut)
    operators.check_float32_4d("x", x)
    operators.check_float32_4d("shortcut", shortcut)
    n, cin, h, w = x.shape
    c2, h2, w2 = shortcut.shape[1:]
    if cin % 32 or c2 % 32:
        raise ValueError(
            f"x, shortcut: expected channels that are multiples of 32, got {cin} and {c2}"
        )
    c = _check_packed(packed, cin + c2, 1)
    if (
        shortcut_stride < 1
        or shortcut.shape[0] != n
        or output_shape(tuple(shortcut.shape), c, 1, shortcut_stride, 0)[2:] != (h, w)
    ):
        raise ValueError(
            f"shortcut: expected {n} images whose 1×1 projection at stride {shortcut_stride} is "
            f"{h}×{w}, got {tuple(shortcut.shape)}"
        )
    check_bias(bias, c)
    x = x.contiguous(memory_format=torch.channels_last)
    shortcut = shortcut.contiguous(memory_format=torch.channels_last)
    y = torch.empty((n, c, h, w), dtype=torch.float32, memory_format=torch.channels_last)
    if y.numel():
        rc = _library().conv_x3_amx_shortcut(
            x.data_ptr(),
            packed.data_ptr(),
            bias.contiguous().data_ptr(),
            shortcut.data_ptr(),
            y.data_ptr(),
            n,
            h,
            w,
            cin,
            c,
            h2,
            w2,
            c2,
            shortcut_stride,
            int(relu),
            torch.get_num_threads(),
        )
        check_rc(rc, "conv_x3_amx_shortcut", f"{tuple(x.shape)} → {c}")
    return y


def _output_shape(
    x: torch.Tensor,
    packed: torch.Tensor,
    bias: torch.Tensor,
    kernel: int,
    stride: int,
    padding: int,
    relu: bool,
) -> tuple[int, ...]:
    return output_shape(tuple(x.shape), packed.shape[0] * 16, kernel, stride, padding)


operators.define_over_residual(
    "conv_x3",
    "Tensor x, Tensor packed, Tensor bias, int kernel, int stride, int padding, bool relu",
    run,
    _output_shape,
)


def _fake_shortcut(
    x: torch.Tensor,
    packed: torch.Tensor,
    bias: torch.Tensor,
    shortcut: torch.Tensor,
    shortcut_stride: int,
    relu: bool,
) -> torch.Tensor:
    shape = (x.shape[0], packed.shape[0] * 16, x.shape[2], x.shape[3])
    return torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=torch.channels_last)


operators.define(
    "conv_x3_shortcut(Tensor x, Tensor packed, Tensor bias, Tensor shortcut, int shortcut_stride, "
    "bool relu) -> Tensor",
    run_with_shortcut,
    _fake_shortcut,
)
