"""Our AMX grouped 3×3 convolution for bf16 (`kernels/grouped3x3_amx.c`), built on first use.

Grouped weights are packed into dense per-block matrices (block-diagonal for fewer than 16
channels per group) so that Intel's AMX tile product can run them; see the C source for the
scheme. Exposed as the torch operator ``torch.ops.resnext.grouped_conv3x3_amx`` so that
torch.compile and torch.jit treat it as one opaque call. Runs only on CPUs with AMX-BF16 whose OS
grants the tile state; `unavailable_reason` says why not elsewhere.
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Callable
from pathlib import Path

import torch

from resnext import native
from resnext.speed import operators
from resnext.speed.grouped_kernel import check_bias, fake_grouped, output_for, output_size
from resnext.speed.operators import overlap

SOURCE = Path(__file__).with_name("kernels") / "grouped3x3_amx.c"
FLAGS = (
    "-O3",
    "-mavx512f",
    "-mavx512bw",
    "-mavx512vl",
    "-mavx512bf16",
    "-mamx-tile",
    "-mamx-bf16",
    "-fopenmp",
)
REQUIRED_FLAGS = frozenset(
    {"avx512f", "avx512bw", "avx512vl", "avx512_bf16", "amx_tile", "amx_bf16"}
)
# every AMX kernel's build: this source's, or another of ours (`load_amx`)
BUILD = native.Build("amx-bf16", SOURCE, FLAGS, REQUIRED_FLAGS, headers=SOURCE.parent)
SMALL_CPG = (1, 2, 4, 8)  # groups packed block-diagonally, 16 channels per block
MAX_CPG = 256


def build(out_dir: Path | None = None) -> Path:
    """Compile the kernel (unless this source, these flags and this compiler already were)."""
    return native.build(SOURCE, FLAGS, out_dir=out_dir)


def load_amx(source: Path, allowed: str) -> ctypes.CDLL:
    """Build and load one of the AMX kernels' libraries (`FLAGS`, on CPUs with
    `REQUIRED_FLAGS`), or NativeUnavailable where the operating system refuses this process the
    tile state (the library's `allowed` function asks for it and returns 0)."""
    lib = BUILD.load(source)
    check = getattr(lib, allowed)
    check.restype = ctypes.c_int
    if not check():
        raise native.NativeUnavailable("the operating system refuses this process AMX tile state")
    return lib


@functools.lru_cache(maxsize=1)
def _library() -> ctypes.CDLL:
    lib = load_amx(SOURCE, "grouped3x3_amx_allowed")
    lib.grouped3x3_amx.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int] * 8
    lib.grouped3x3_amx.restype = ctypes.c_int
    lib.pointwise_grouped3x3_amx.argtypes = [ctypes.c_void_p] * 6 + [ctypes.c_int] * 9
    lib.pointwise_grouped3x3_amx.restype = ctypes.c_int
    lib.block_amx.argtypes = [ctypes.c_void_p] * 9 + [ctypes.c_int] * 9
    lib.block_amx.restype = ctypes.c_int
    lib.block_amx_shortcut.argtypes = [ctypes.c_void_p] * 10 + [ctypes.c_int] * 10
    lib.block_amx_shortcut.restype = ctypes.c_int
    lib.block_quads_amx.argtypes = lib.block_amx.argtypes
    lib.block_quads_amx.restype = ctypes.c_int
    lib.block_quads_amx_shortcut.argtypes = lib.block_amx_shortcut.argtypes
    lib.block_quads_amx_shortcut.restype = ctypes.c_int
    lib.grouped3x3_amx_pack.argtypes = [ctypes.c_void_p, ctypes.c_void_p] + [ctypes.c_int] * 3
    lib.grouped3x3_amx_pack.restype = ctypes.c_int
    return lib


@functools.lru_cache(maxsize=1)
def _library_problem() -> str | None:
    return native.problem(_library)


def unavailable_reason(dtype: torch.dtype = torch.bfloat16) -> str | None:
    """None if the kernel can run here for `dtype`, else why not (one line)."""
    if dtype != torch.bfloat16:
        return f"dtype {dtype} is not bfloat16 (the AMX kernel is bf16 only)"
    return _library_problem()


def block_channels(cpg: int) -> int:
    """Channels per dense block: 16 for up to 8 channels per group, else one whole group."""
    return 16 if cpg in SMALL_CPG else cpg


def supports(channels: int, groups: int, stride: int) -> bool:
    """Whether the kernel takes a 3×3 conv with this many channels (in = out), groups and stride."""
    if groups < 1 or channels % groups:
        return False
    cpg = channels // groups
    shape_ok = cpg in SMALL_CPG or (cpg % 16 == 0 and cpg <= MAX_CPG)
    return shape_ok and channels % block_channels(cpg) == 0 and stride in (1, 2)


def _k_steps(kc: int) -> int:
    return 6 if kc == 16 else 9 * -(-kc // 32)


def step_rows(kc: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For each K step and each of its 32 rows: the tap (kh·3 + kw) and block input channel it
    multiplies, −1 where the row is a zero (kw = 3 of a 16-channel block's tap pair, or channels
    past kc). The order is the kernel's: kernel rows, then tap pairs / taps and 32-channel parts."""
    k = torch.arange(32)
    taps, chans = [], []
    if kc == 16:
        for kh in range(3):
            for pair in range(2):
                kw = 2 * pair + k // 16
                taps.append(torch.where(kw < 3, kh * 3 + kw, -1))
                chans.append(torch.where(kw < 3, k % 16, -1))
    else:
        for tap in range(9):
            for part in range(-(-kc // 32)):
                ci = 32 * part + k
                taps.append(torch.where(ci < kc, torch.full_like(k, tap), -1))
                chans.append(torch.where(ci < kc, ci, -1))
    return torch.stack(taps), torch.stack(chans)


@functools.lru_cache(maxsize=64)
def pack_index(channels: int, cpg: int) -> torch.Tensor:
    """For each packed value, its index in the flattened (C, cpg, 3, 3) weight, or C·cpg·9 (a zero
    appended after it) where the packed weight is zero. Cached per shape: the training path packs
    its bf16 weight on every call."""
    kc = block_channels(cpg)
    blocks, tiles = channels // kc, kc // 16
    taps, chans = step_rows(kc)  # (steps, 32)
    steps = taps.shape[0]
    b = torch.arange(blocks).view(-1, 1, 1, 1)
    o = torch.arange(kc).view(1, 1, 1, -1)
    tap, ci = taps.view(1, steps, 32, 1), chans.view(1, steps, 32, 1)
    flat = ((b * kc + o) * cpg + ci % cpg) * 9 + tap  # (blocks, steps, 32, kc)
    keep = (tap >= 0) & ((ci // cpg) == (o // cpg))  # a real row, input and output share a group
    flat = torch.where(keep, flat, channels * cpg * 9)
    vnni = flat.reshape(blocks, steps, 16, 2, tiles, 16).permute(0, 4, 1, 2, 5, 3)
    return vnni.contiguous()


def pack_weights(weight: torch.Tensor, groups: int) -> torch.Tensor:
    """The (C, C/groups, 3, 3) weight as the kernel reads it: bf16 [C/kc][kc/16][steps][16][16][2].

    Block b's K step holds, for each of its 32 rows (a tap and an input channel of the block, see
    `step_rows`) and each output o of the block, the weight (rounded to bf16) where input and
    output share a group and 0 elsewhere; each step is stored with its K pairs interleaved per
    output (VNNI).
    """
    out_ch, cpg, kh, kw = weight.shape
    if (kh, kw) != (3, 3) or out_ch != cpg * groups or not supports(out_ch, groups, 1):
        raise ValueError(
            f"weight: expected a (C, C/groups, 3, 3) grouped weight with C/groups in {SMALL_CPG} "
            f"or a multiple of 16 up to {MAX_CPG}, got shape {tuple(weight.shape)} with "
            f"groups={groups}"
        )
    flat = weight.detach().to(torch.bfloat16).reshape(-1)
    if _library_problem() is None:  # the C loop: the training path packs on every call
        packed = torch.empty(packed_numel(out_ch, groups), dtype=torch.bfloat16)
        rc = _library().grouped3x3_amx_pack(
            flat.contiguous().data_ptr(), packed.data_ptr(), out_ch, cpg, torch.get_num_threads()
        )
        if rc != 0:
            raise RuntimeError(f"grouped3x3_amx_pack refused shape {tuple(weight.shape)}")
        return packed.view(pack_index(out_ch, cpg).shape)
    return pack_reference(flat, out_ch, cpg)


def pack_reference(flat_bf16: torch.Tensor, channels: int, cpg: int) -> torch.Tensor:
    """`pack_weights` by one gather of the flattened bf16 weight (where the C loop is not built)."""
    return torch.cat([flat_bf16, flat_bf16.new_zeros(1)])[pack_index(channels, cpg)]


def unpack_weights(packed: torch.Tensor, channels: int, groups: int) -> torch.Tensor:
    """The (C, C/groups, 3, 3) bf16 weight that pack_weights made `packed` from: its inverse
    (every weight value is in the pack once), for forms packed from an AMX module's weight."""
    check_packed(packed, packed_numel(channels, groups))
    cpg = channels // groups
    index = pack_index(channels, cpg).reshape(-1)
    real = index < channels * cpg * 9  # the rest are the pack's zeros
    flat = torch.zeros(channels * cpg * 9, dtype=torch.bfloat16)
    flat[index[real]] = packed.reshape(-1)[real]
    return flat.view(channels, cpg, 3, 3)


def packed_numel(channels: int, groups: int) -> int:
    """How many bf16 values pack_weights makes for this many channels and groups."""
    kc = block_channels(channels // groups)
    return (channels // kc) * (kc // 16) * _k_steps(kc) * 512


def _check_x(x: torch.Tensor, *more: torch.Tensor | None) -> None:
    """A ValueError naming `x` unless it is a 4-d bf16 CPU tensor, or if it or one of `more`
    needs a gradient (the kernels have none)."""
    operators.check_bf16_input("the AMX kernel", x, *more)


def _check_grouped(name: str, c: int, groups: int, stride: int, packed: torch.Tensor) -> None:
    """ValueErrors unless the kernel takes `c` channels in `groups` at `stride` (blamed on the
    argument `name` that gave c) and `packed` is pack_weights' output for them."""
    if not supports(c, groups, stride):
        raise ValueError(
            f"{name}: {c} channels in {groups} groups with stride {stride} is not a shape the AMX "
            f"kernel takes (C/groups in {SMALL_CPG} or a multiple of 16, stride 1 or 2)"
        )
    check_packed(packed, packed_numel(c, groups))


def check_packed(packed: torch.Tensor, want: int) -> None:
    """A ValueError naming `packed` unless it is a contiguous bf16 tensor of `want` values, as
    the AMX kernels' pack_weights make them."""
    if packed.dtype != torch.bfloat16 or not packed.is_contiguous() or packed.numel() != want:
        raise ValueError(
            f"packed: expected a contiguous bf16 tensor of {want} values from pack_weights, "
            f"got {packed.dtype} with {packed.numel()}"
        )


def check_rc(rc: int, what: str) -> None:
    """Nothing for 0, else the error an AMX C function's return code means for `what`: −3 a
    MemoryError (its scratch could not be allocated), −2 a RuntimeError (the OS refused the AMX
    tile state), anything else a RuntimeError (a shape the Python side should have refused)."""
    if rc == 0:
        return
    if rc == -3:
        raise MemoryError(f"{what}: could not allocate its scratch memory")
    why = "the OS refused the AMX tile state" if rc == -2 else f"shape refused (code {rc})"
    raise RuntimeError(f"{what}: {why}")


def run_kernel(
    x: torch.Tensor,
    packed: torch.Tensor,
    bias: torch.Tensor | None,
    groups: int,
    stride: int,
    relu: bool = False,
) -> torch.Tensor:
    """``conv2d(x, w, bias, stride, padding=1, groups)`` (then ReLU) in bf16, with
    `packed` = pack_weights(w); float32 accumulation, one rounding to bf16."""
    _check_x(x)
    _check_grouped("x", x.shape[1], groups, stride, packed)
    check_bias(bias, x.shape[1])
    return call_grouped(_library().grouped3x3_amx, x, packed, bias, groups, stride, relu)


def call_grouped(
    fn: Callable[..., int],
    x: torch.Tensor,
    packed: torch.Tensor,
    bias: torch.Tensor | None,
    groups: int,
    stride: int,
    relu: bool,
) -> torch.Tensor:
    """A grouped 3×3's output by C function `fn`, which takes (x, packed, bias or NULL, y, N, H,
    W, C, C/groups, stride, relu, threads), the arguments already checked."""
    x = x.contiguous(memory_format=torch.channels_last)
    y = output_for(x, stride)
    if y.numel():
        n, c, h, w = x.shape
        bias_c = None if bias is None else bias.contiguous()
        rc = fn(
            x.data_ptr(),
            packed.data_ptr(),
            None if bias_c is None else bias_c.data_ptr(),
            y.data_ptr(),
            n,
            h,
            w,
            c,
            c // groups,
            stride,
            int(relu),
            torch.get_num_threads(),
        )
        check_rc(rc, f"{fn.__name__} failed on {tuple(x.shape)}, groups={groups}")
    return y


def pack_pointwise(weight: torch.Tensor) -> torch.Tensor:
    """A (C, Cin, 1, 1) convolution weight as the fused kernel reads it: bf16
    [C/16][Cin/32][16][16][2] (16-output tile, 32-deep K step, K pair, output, pair member)."""
    out_ch, in_ch = weight.shape[:2]
    if weight.dim() != 4 or weight.shape[2:] != (1, 1) or out_ch % 16 or in_ch % 32:
        raise ValueError(
            f"pointwise weight: expected a (C, Cin, 1, 1) weight with C a multiple of 16 and Cin "
            f"of 32, got shape {tuple(weight.shape)}"
        )
    w = weight.detach().to(torch.bfloat16).reshape(out_ch // 16, 16, in_ch // 32, 16, 2)
    return w.permute(0, 2, 3, 1, 4).contiguous()


def _check_pointwise(name: str, packed: torch.Tensor, cin: int) -> int:
    """The output channels of `packed`, a ValueError naming it unless it is pack_pointwise's
    output for `cin` input channels."""
    if (
        packed.dtype != torch.bfloat16
        or packed.dim() != 5
        or packed.shape[1:] != (cin // 32, 16, 16, 2)
        or cin % 32
        or not packed.is_contiguous()
    ):
        raise ValueError(
            f"{name}: expected a contiguous bf16 pack_pointwise weight for {cin} input "
            f"channels (a multiple of 32), got {packed.dtype} {tuple(packed.shape)}"
        )
    return packed.shape[0] * 16


def _check_floats(name: str, t: torch.Tensor, n: int) -> None:
    """A ValueError naming `t` unless it holds `n` float32 values."""
    if t.dtype != torch.float32 or t.numel() != n:
        raise ValueError(f"{name}: expected {n} float32 values, got {t.dtype} with {t.numel()}")


def run_pointwise_kernel(
    x: torch.Tensor,
    pointwise: torch.Tensor,
    pointwise_bias: torch.Tensor,
    packed: torch.Tensor,
    bias: torch.Tensor | None,
    groups: int,
    stride: int,
    relu: bool = False,
) -> torch.Tensor:
    """``conv2d(relu(conv2d(x, w1, b1)), w, bias, stride, padding=1, groups)`` (then ReLU) in bf16
    with `pointwise` = pack_pointwise(w1), `packed` = pack_weights(w): a bottleneck's 1×1 and
    grouped 3×3 in one pass, the 1×1's output (rounded to bf16 as the unfused model rounds it)
    kept in cache instead of memory."""
    _check_x(x)
    n, cin, h, w = x.shape
    c = _check_pointwise("pointwise", pointwise, cin)
    _check_grouped("pointwise", c, groups, stride, packed)
    _check_floats("pointwise_bias", pointwise_bias, c)
    check_bias(bias, c)
    x = x.contiguous(memory_format=torch.channels_last)
    y = output_for(x, stride, c)
    if y.numel():
        b1 = pointwise_bias.contiguous()
        bias_c = None if bias is None else bias.contiguous()
        rc = _library().pointwise_grouped3x3_amx(
            x.data_ptr(),
            pointwise.data_ptr(),
            b1.data_ptr(),
            packed.data_ptr(),
            None if bias_c is None else bias_c.data_ptr(),
            y.data_ptr(),
            n,
            h,
            w,
            cin,
            c,
            c // groups,
            stride,
            int(relu),
            torch.get_num_threads(),
        )
        what = f"pointwise_grouped3x3_amx failed on {tuple(x.shape)} → {c} channels"
        check_rc(rc, f"{what}, groups={groups}")
    return y


def _check_block(
    cin: int,
    packed: torch.Tensor,
    bias: torch.Tensor,
    groups: int,
    stride: int,
    tail: torch.Tensor,
    tail_bias: torch.Tensor,
    pointwise: torch.Tensor | None,
    pointwise_bias: torch.Tensor | None,
    quads: bool,
) -> tuple[int, int]:
    """(grouped channels, output channels) of a block kernel's weights for `cin` input channels
    (`packed` in the quads form where `quads`), a ValueError naming the first argument that does
    not fit."""
    if pointwise is None:
        c = cin
        if pointwise_bias is not None:
            raise ValueError("pointwise_bias: given without a pointwise weight")
    else:
        c = _check_pointwise("pointwise", pointwise, cin)
        if pointwise_bias is None:
            raise ValueError(f"pointwise_bias: expected {c} float32 values, got None")
        _check_floats("pointwise_bias", pointwise_bias, c)
    source = "pointwise" if pointwise is not None else "x"
    if quads:
        from resnext.speed import grouped_quads  # it imports this module

        grouped_quads.check_grouped(source, c, groups, stride, packed)
    else:
        _check_grouped(source, c, groups, stride, packed)
    _check_floats("bias", bias, c)
    cout = _check_pointwise("tail", tail, c)
    _check_floats("tail_bias", tail_bias, cout)
    return c, cout


def run_block_kernel(
    x: torch.Tensor,
    packed: torch.Tensor,
    bias: torch.Tensor,
    groups: int,
    stride: int,
    tail: torch.Tensor,
    tail_bias: torch.Tensor,
    residual: torch.Tensor,
    pointwise: torch.Tensor | None = None,
    pointwise_bias: torch.Tensor | None = None,
    quads: bool = False,
    in_place: bool = False,
) -> torch.Tensor:
    """The rest of a bottleneck in one pass, in bf16: ``relu(conv2d(g, w3, tail_bias) + residual)``
    with ``g = relu(conv2d(s, w, bias, stride, padding=1, groups))`` and s = x, or, given
    `pointwise` = pack_pointwise(w1), ``s = relu(conv2d(x, w1, pointwise_bias))`` (the whole
    bottleneck). `packed` = pack_weights(w), `tail` = pack_pointwise(w3). Neither s nor g goes to
    memory; each is rounded to bf16 where the unfused bf16 model rounds it.

    `in_place` writes the result over `residual` (channels_last) and returns it: no new output
    to fill, as oneDNN's 1×1 adds into its residual. `residual` may be `x` itself (an identity
    shortcut); then each image is one work item, and x is overwritten.

    With `quads`, `packed` = grouped_quads.pack_weights(w) and the grouped convolution runs in
    that form (4 or 8 channels per group, stride 1): half the tile products; one image a work
    item.
    """
    _check_x(x, residual)
    n, cin, h, w = x.shape
    c, cout = _check_block(
        cin, packed, bias, groups, stride, tail, tail_bias, pointwise, pointwise_bias, quads
    )
    shape = (n, cout, output_size(h, stride), output_size(w, stride))
    if tuple(residual.shape) != shape or residual.dtype != torch.bfloat16:
        raise ValueError(
            f"residual: expected a bf16 tensor of the output's shape {shape}, got "
            f"{residual.dtype} {tuple(residual.shape)}"
        )
    same = residual is x or (
        residual.data_ptr() == x.data_ptr()
        and residual.shape == x.shape
        and residual.stride() == x.stride()
    )
    if in_place and not residual.is_contiguous(memory_format=torch.channels_last):
        raise ValueError(
            f"residual: written in place, so it must be channels_last contiguous, got strides "
            f"{residual.stride()}"
        )
    if in_place and not same and overlap(residual, x):
        raise ValueError("residual: written in place, so it must be x itself or not overlap it")
    x = x.contiguous(memory_format=torch.channels_last)
    residual = x if same else residual.contiguous(memory_format=torch.channels_last)
    y = residual if in_place else output_for(x, stride, cout)
    if y.numel():
        b1 = None if pointwise_bias is None else pointwise_bias.contiguous()
        lib = _library()
        rc = (lib.block_quads_amx if quads else lib.block_amx)(
            x.data_ptr(),
            None if pointwise is None else pointwise.data_ptr(),
            None if b1 is None else b1.data_ptr(),
            packed.data_ptr(),
            bias.contiguous().data_ptr(),
            tail.data_ptr(),
            tail_bias.contiguous().data_ptr(),
            residual.data_ptr(),
            y.data_ptr(),
            n,
            h,
            w,
            cin,
            c,
            cout,
            c // groups,
            stride,
            torch.get_num_threads(),
        )
        what = "block_quads_amx" if quads else "block_amx"
        check_rc(rc, f"{what} failed on {tuple(x.shape)} → {c} → {cout} channels")
    return y


def run_shortcut_block_kernel(
    x: torch.Tensor,
    packed: torch.Tensor,
    bias: torch.Tensor,
    groups: int,
    stride: int,
    tail: torch.Tensor,
    tail_bias: torch.Tensor,
    shortcut: torch.Tensor,
    shortcut_input: torch.Tensor,
    pointwise: torch.Tensor | None = None,
    pointwise_bias: torch.Tensor | None = None,
    quads: bool = False,
) -> torch.Tensor:
    """A bottleneck with a projection shortcut in one pass, in bf16:
    ``relu(conv2d(g, w3) + conv2d(shortcut_input, wsc, stride) + tail_bias)`` with g as in
    `run_block_kernel` (from x, or from the first 1×1 of x given `pointwise`), `shortcut` =
    pack_pointwise(wsc) and `tail_bias` the two 1×1s' biases summed. `shortcut_input` is the
    block's input: x itself where the first 1×1 is fused in, else the tensor that 1×1 read (same
    height and width as x). The shortcut's products are accumulated onto the last 1×1's, so
    neither its output nor a residual goes to memory. `quads` as in `run_block_kernel`."""
    _check_x(x, shortcut_input)
    n, cin, h, w = x.shape
    c, cout = _check_block(
        cin, packed, bias, groups, stride, tail, tail_bias, pointwise, pointwise_bias, quads
    )
    if shortcut_input.dim() != 4 or shortcut_input.dtype != torch.bfloat16:
        raise ValueError(
            f"shortcut_input: expected a 4-d bf16 tensor, got {shortcut_input.dtype} "
            f"{tuple(shortcut_input.shape)}"
        )
    csc = shortcut_input.shape[1]
    if (shortcut_input.shape[0], *shortcut_input.shape[2:]) != (n, h, w):
        raise ValueError(
            f"shortcut_input: expected {n} images of {h}×{w} like x, got "
            f"{tuple(shortcut_input.shape)}"
        )
    if _check_pointwise("shortcut", shortcut, csc) != cout:
        raise ValueError(
            f"shortcut: expected {cout} outputs like the tail, got {shortcut.shape[0] * 16}"
        )
    x = x.contiguous(memory_format=torch.channels_last)
    shortcut_input = shortcut_input.contiguous(memory_format=torch.channels_last)
    y = output_for(x, stride, cout)
    if y.numel():
        b1 = None if pointwise_bias is None else pointwise_bias.contiguous()
        lib = _library()
        rc = (lib.block_quads_amx_shortcut if quads else lib.block_amx_shortcut)(
            x.data_ptr(),
            None if pointwise is None else pointwise.data_ptr(),
            None if b1 is None else b1.data_ptr(),
            packed.data_ptr(),
            bias.contiguous().data_ptr(),
            tail.data_ptr(),
            tail_bias.contiguous().data_ptr(),
            shortcut.data_ptr(),
            shortcut_input.data_ptr(),
            y.data_ptr(),
            n,
            h,
            w,
            cin,
            c,
            cout,
            csc,
            c // groups,
            stride,
            torch.get_num_threads(),
        )
        what = "block_quads_amx_shortcut" if quads else "block_amx_shortcut"
        check_rc(rc, f"{what} failed on {tuple(x.shape)} → {c} → {cout} channels")
    return y


# The kernels as torch operators (torch.ops.resnext.*), each with a fake that gives the output's
# shape, dtype and layout without running the kernel (for torch.compile).


def _fake_pointwise(
    x: torch.Tensor,
    pointwise: torch.Tensor,
    pointwise_bias: torch.Tensor,
    packed: torch.Tensor,
    bias: torch.Tensor | None,
    groups: int,
    stride: int,
    relu: bool,
) -> torch.Tensor:
    return output_for(x, stride, pointwise.shape[0] * 16)


def _fake_block(
    x: torch.Tensor,
    packed: torch.Tensor,
    bias: torch.Tensor,
    groups: int,
    stride: int,
    tail: torch.Tensor,
    tail_bias: torch.Tensor,
    residual: torch.Tensor,
    pointwise: torch.Tensor | None = None,
    pointwise_bias: torch.Tensor | None = None,
    quads: bool = False,
) -> torch.Tensor:
    return output_for(x, stride, tail.shape[0] * 16)


def _block_in_place(
    x: torch.Tensor | None,
    packed: torch.Tensor,
    bias: torch.Tensor,
    groups: int,
    stride: int,
    tail: torch.Tensor,
    tail_bias: torch.Tensor,
    residual: torch.Tensor,
    pointwise: torch.Tensor | None = None,
    pointwise_bias: torch.Tensor | None = None,
    quads: bool = False,
) -> None:
    """`run_block_kernel` written over `residual`, for x, or for `residual` itself where x is
    None (an identity shortcut: one tensor in, the same out)."""
    run_block_kernel(
        residual if x is None else x,
        packed,
        bias,
        groups,
        stride,
        tail,
        tail_bias,
        residual,
        pointwise,
        pointwise_bias,
        in_place=True,
        quads=quads,
    )


def _fake_block_in_place(
    x: torch.Tensor | None,
    packed: torch.Tensor,
    bias: torch.Tensor,
    groups: int,
    stride: int,
    tail: torch.Tensor,
    tail_bias: torch.Tensor,
    residual: torch.Tensor,
    pointwise: torch.Tensor | None = None,
    pointwise_bias: torch.Tensor | None = None,
    quads: bool = False,
) -> None:
    return None


operators.define(
    "grouped_conv3x3_amx(Tensor x, Tensor packed, Tensor? bias, int groups, int stride, "
    "bool relu) -> Tensor",
    run_kernel,
    fake_grouped,
)
operators.define(
    "pointwise_grouped_conv3x3_amx(Tensor x, Tensor pointwise, Tensor pointwise_bias, "
    "Tensor packed, Tensor? bias, int groups, int stride, bool relu) -> Tensor",
    run_pointwise_kernel,
    _fake_pointwise,
)
# The block operators take run_block_kernel's arguments in its order (`in_place` aside).
_BLOCK_ARGS = (
    "Tensor packed, Tensor bias, int groups, int stride, Tensor tail, Tensor tail_bias, "
    "{residual} residual, Tensor? pointwise=None, Tensor? pointwise_bias=None, bool quads=False"
)
operators.define(
    f"block_amx(Tensor x, {_BLOCK_ARGS.format(residual='Tensor')}) -> Tensor",
    run_block_kernel,
    _fake_block,
)
operators.define(
    f"block_amx_(Tensor? x, {_BLOCK_ARGS.format(residual='Tensor(a!)')}) -> ()",
    _block_in_place,
    _fake_block_in_place,
)


def _fake_shortcut_block(
    x: torch.Tensor,
    packed: torch.Tensor,
    bias: torch.Tensor,
    groups: int,
    stride: int,
    tail: torch.Tensor,
    tail_bias: torch.Tensor,
    shortcut: torch.Tensor,
    shortcut_input: torch.Tensor,
    pointwise: torch.Tensor | None = None,
    pointwise_bias: torch.Tensor | None = None,
    quads: bool = False,
) -> torch.Tensor:
    return output_for(x, stride, tail.shape[0] * 16)


operators.define(
    "block_amx_shortcut(Tensor x, Tensor packed, Tensor bias, int groups, int stride, "
    "Tensor tail, Tensor tail_bias, Tensor shortcut, Tensor shortcut_input, "
    "Tensor? pointwise=None, Tensor? pointwise_bias=None, bool quads=False) -> Tensor",
    run_shortcut_block_kernel,
    _fake_shortcut_block,
)
