"""The ImageNet stem (conv, bias, ReLU, 3×3/2 max pooling) in one AMX kernel (`kernels/stem_amx.c`).

The convolution's rows are computed into a small ring of float32 rows, each finished 3×3 window
is pooled, and only the pooled output (a quarter of the convolution's) goes to memory. bf16
inputs take one tile product per step; float32 inputs three (hi·hi + hi·lo + lo·hi, as
`conv_x3`: float32 to ~1e-5 of each product). Exposed as ``torch.ops.resnext.stem``. Runs only on
CPUs with AMX-BF16 whose OS grants the tile state; `unavailable_reason` says why not elsewhere.
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Callable
from pathlib import Path

import torch

from resnext import native
from resnext.speed import operators
from resnext.speed.conv_x3 import check_bias, check_fits, check_rc, tiles
from resnext.speed.conv_x3 import output_shape as conv_output_shape
from resnext.speed.grouped_amx import FLAGS, load_amx

SOURCE = Path(__file__).with_name("kernels") / "stem_amx.c"
POOL = (3, 2, 1)  # the max pooling the kernel applies: window, stride, padding


def build(out_dir: Path | None = None) -> Path:
    """Compile the kernel (unless this source, these flags and this compiler already were)."""
    return native.build(SOURCE, FLAGS, out_dir=out_dir)


@functools.lru_cache(maxsize=1)
def _library() -> ctypes.CDLL:
    lib = load_amx(SOURCE, "stem_amx_allowed")
    lib.stem_amx.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int] * 12
    lib.stem_amx.restype = ctypes.c_int
    return lib


@functools.lru_cache(maxsize=1)
def unavailable_reason() -> str | None:
    """None if the kernel can run here, else why not (one line; decided once per process)."""
    return native.problem(_library)


def supports(
    in_channels: int, out_channels: int, kernel: int, stride: int, padding: int, multiple: int = 32
) -> bool:
    """Whether the kernel takes this square convolution (groups 1, zero padding) as a stem: its
    outputs a multiple of `multiple` (the AMX kernel's 32; `stem_dot` asks 64)."""
    return (
        in_channels >= 1
        and out_channels >= multiple
        and out_channels % multiple == 0
        and kernel >= 1
        and stride >= 1
        and 0 <= padding < kernel
    )


def row_steps(in_channels: int, kernel: int) -> int:
    """32-deep K steps per kernel row: its kernel·in_channels values, rounded up to 32."""
    return -(-kernel * in_channels // 32)


def pack(weight: torch.Tensor) -> torch.Tensor:
    """A (C, Cin, k, k) weight as the kernel reads it: bf16 [C/16][k·steps][2][16][16][2]
    (16-output tile, 32-deep K step, hi then lo, K pair, output, pair member). Kernel row i's
    steps cover its k·Cin values (columns, then channels) and zeros up to a multiple of 32; the
    hi and lo halves as `conv_x3.tiles` splits them (lo is zero for a bf16 weight)."""
    if weight.dim() != 4 or weight.shape[2] != weight.shape[3] or weight.shape[0] % 32:
        raise ValueError(
            "weight: expected a (C, Cin, k, k) weight with C a multiple of 32, got shape "
            f"{tuple(weight.shape)}"
        )
    out_ch, in_ch, k, _ = weight.shape
    per_row = row_steps(in_ch, k) * 32
    rows = weight.detach().float().permute(0, 2, 3, 1).reshape(out_ch, k, k * in_ch)
    return tiles(torch.nn.functional.pad(rows, (0, per_row - k * in_ch)).reshape(out_ch, -1))


def _check_packed(packed: torch.Tensor, in_ch: int, kernel: int) -> int:
    """The output channels of `packed`, a ValueError naming it unless it is `pack`'s output for
    `in_ch` input channels and this kernel size."""
    steps = kernel * row_steps(in_ch, kernel)
    if (
        packed.dtype != torch.bfloat16
        or packed.dim() != 6
        or packed.shape[0] % 2
        or packed.shape[1:] != (steps, 2, 16, 16, 2)
        or not packed.is_contiguous()
    ):
        raise ValueError(
            f"packed: expected a contiguous bf16 stem.pack weight for {in_ch} input channels and "
            f"a {kernel}×{kernel} kernel ({steps} K steps, an even number of 16-output tiles), "
            f"got {packed.dtype} {tuple(packed.shape)}"
        )
    return packed.shape[0] * 16


def output_shape(
    x_shape: tuple[int, ...], out_channels: int, kernel: int, stride: int, padding: int
) -> tuple[int, int, int, int]:
    """(N, C, Hp, Wp): the convolution's output size, then the 3×3/2 pooling's (padding 1)."""
    n, _, h, w = conv_output_shape(x_shape, out_channels, kernel, stride, padding)
    window, pool_stride, pool_pad = POOL
    pooled = [(d + 2 * pool_pad - window) // pool_stride + 1 for d in (h, w)]
    return (n, out_channels, pooled[0], pooled[1])


def check_input(name: str, x: torch.Tensor) -> None:
    """A ValueError naming x unless it is an image batch a fused stem kernel `name` reads."""
    operators.check_no_grad(name, x)
    if x.dtype not in (torch.bfloat16, torch.float32) or x.dim() != 4 or x.device.type != "cpu":
        raise ValueError(
            f"x: expected a 4-d bf16 or float32 CPU tensor, got {x.dtype} {tuple(x.shape)} on "
            f"{x.device}"
        )


def checked_io(
    x: torch.Tensor,
    c: int,
    kernel: int,
    stride: int,
    padding: int,
    bias: torch.Tensor,
    dtype: torch.dtype,
    takes: Callable[[int, int, int, int, int], bool] = supports,
    multiple: int = 32,
) -> tuple[torch.Tensor, bool, torch.Tensor]:
    """What a fused stem kernel reads and writes, for `check_input`'s x and c outputs: x as given
    if NCHW, else channels_last; whether it is NCHW; the uninitialised pooled output in `dtype`.
    ValueErrors name a bad argument: the geometry (which `takes`, with outputs a multiple of
    `multiple`), the image's size, the bias."""
    _, cin, h, w = x.shape
    if not takes(cin, c, kernel, stride, padding):
        raise ValueError(
            f"kernel, stride, padding: expected a stem the kernel takes (outputs a multiple of "
            f"{multiple}, 0 <= padding < kernel), got {kernel}×{kernel}, stride {stride}, padding "
            f"{padding}, {c} outputs"
        )
    check_fits(h, w, kernel, padding)
    check_bias(bias, c)
    nchw = x.is_contiguous()
    if not nchw:
        x = x.contiguous(memory_format=torch.channels_last)
    shape = output_shape(tuple(x.shape), c, kernel, stride, padding)
    return x, nchw, torch.empty(shape, dtype=dtype, memory_format=torch.channels_last)


def run(
    x: torch.Tensor,
    packed: torch.Tensor,
    bias: torch.Tensor,
    kernel: int,
    stride: int,
    padding: int,
    bf16: bool | None = None,
) -> torch.Tensor:
    """``max_pool2d(relu(conv2d(x, w, bias, stride, padding)), 3, 2, 1)`` with `packed` =
    pack(w), channels_last, in bf16 (`bf16`, one product per step) or float32 (bf16×3);
    `bf16` None follows x's dtype. x may be bf16 or float32, NCHW or channels_last, whatever
    the output's dtype: the kernel converts each input value once as it reads it."""
    check_input("stem", x)
    c = _check_packed(packed, x.shape[1], kernel)
    if bf16 is None:
        bf16 = x.dtype == torch.bfloat16
    dtype = torch.bfloat16 if bf16 else torch.float32
    x, nchw, y = checked_io(x, c, kernel, stride, padding, bias, dtype)
    n, cin, h, w = x.shape
    if y.numel():
        rc = _library().stem_amx(
            x.data_ptr(),
            packed.data_ptr(),
            bias.contiguous().data_ptr(),
            y.data_ptr(),
            int(bf16),
            int(x.dtype == torch.bfloat16),
            int(nchw),
            n,
            h,
            w,
            cin,
            c,
            kernel,
            stride,
            padding,
            torch.get_num_threads(),
        )
        check_rc(rc, "stem_amx", f"{tuple(x.shape)} → {c}, {kernel}×{kernel}, stride {stride}")
    return y


def _fake(
    x: torch.Tensor,
    packed: torch.Tensor,
    bias: torch.Tensor,
    kernel: int,
    stride: int,
    padding: int,
    bf16: bool,
) -> torch.Tensor:
    shape = output_shape(tuple(x.shape), packed.shape[0] * 16, kernel, stride, padding)
    dtype = torch.bfloat16 if bf16 else torch.float32
    return torch.empty(shape, dtype=dtype, device=x.device, memory_format=torch.channels_last)


operators.define(
    "stem(Tensor x, Tensor packed, Tensor bias, int kernel, int stride, int padding, bool bf16) "
    "-> Tensor",
    run,
    _fake,
)
