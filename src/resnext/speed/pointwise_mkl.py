"""Float32 1×1 convolutions on MKL's packed product (`kernels/pointwise_mkl.c`) via ctypes.

A 1×1 convolution of a channels-last tensor is one matrix product of its pixels with the transposed
weight (with a stride, of the pixels it reads, which the kernel gathers first). MKL (the one
inside torch) can pack that weight once for a given number of pixel rows and then skip repacking
it on every call (`cblas_sgemm_pack` / `cblas_sgemm_compute`, what inductor's freezing uses for
float32 linear layers). The kernel runs that product and then
the bias, optionally a residual, and optionally a ReLU in one pass over the output; the residual
may be the output itself (`in_place`). Exposed as ``torch.ops.resnext.pointwise_mkl`` and
``pointwise_mkl_`` (written over the residual). `MklConv1x1` is the module the fast path swaps
in where it measures faster than oneDNN (`conv_x3_swap.swap_convs_mkl`).

MKL's functions are looked up in torch's own library (`libtorch_cpu`), since torch loads its MKL
privately; a torch built without MKL, or one that does not export them, leaves the kernel
unavailable with the reason.
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from resnext import native
from resnext.speed import operators
from resnext.speed.conv1x1_kernel import Conv1x1Kernel, float32_cpu_inference

SOURCE = Path(__file__).with_name("kernels") / "pointwise_mkl.c"
FLAGS = ("-O3", "-mavx2", "-fopenmp")
REQUIRED_FLAGS = frozenset({"avx2"})
_MKL_FUNCTIONS = ("cblas_sgemm_compute", "cblas_sgemm_pack", "cblas_sgemm_pack_get_size")


def torch_mkl_functions() -> tuple[int, int, int]:
    """The addresses of MKL's packed-product functions in torch's library, or NativeUnavailable
    saying why there are none."""
    if not torch.backends.mkl.is_available():
        raise native.NativeUnavailable("this torch is built without MKL")
    path = Path(torch.__file__).parent / "lib" / "libtorch_cpu.so"
    try:
        library = ctypes.CDLL(str(path))  # already loaded by torch: this only finds it
        found = [getattr(library, name) for name in _MKL_FUNCTIONS]
    except (OSError, AttributeError) as exc:
        raise native.NativeUnavailable(
            f"torch's {path.name} does not export MKL's packed product ({exc})"
        ) from exc
    return tuple(ctypes.cast(f, ctypes.c_void_p).value or 0 for f in found)  # type: ignore[return-value]


def load(source: Path = SOURCE) -> ctypes.CDLL:
    """The kernel built and loaded, its functions' C signatures declared (not yet bound to MKL)."""
    lib = native.load(source, FLAGS, cpu_needs=REQUIRED_FLAGS)
    lib.pointwise_mkl_bind.argtypes = [ctypes.c_void_p] * 3
    lib.pointwise_mkl_bind.restype = ctypes.c_int
    lib.pointwise_mkl_packed_bytes.argtypes = [ctypes.c_int] * 3
    lib.pointwise_mkl_packed_bytes.restype = ctypes.c_size_t
    lib.pointwise_mkl_pack.argtypes = [ctypes.c_void_p] * 2 + [ctypes.c_int] * 3
    lib.pointwise_mkl_pack.restype = ctypes.c_int
    lib.pointwise_mkl.argtypes = [ctypes.c_void_p] * 5 + [ctypes.c_int] * 8
    lib.pointwise_mkl.restype = ctypes.c_int
    return lib


@functools.lru_cache(maxsize=1)
def _library() -> ctypes.CDLL:
    return load()


@functools.lru_cache(maxsize=1)
def _bound() -> ctypes.CDLL:
    """The kernel with MKL's functions handed to it (once per process)."""
    lib = _library()
    if lib.pointwise_mkl_bind(*torch_mkl_functions()) != 0:
        raise native.NativeUnavailable("MKL's packed-product functions could not be bound")
    return lib


@functools.lru_cache(maxsize=1)
def unavailable_reason() -> str | None:
    """None if the kernel can run here, else why not (one line; decided once per process)."""
    return native.problem(_bound)


def pack(weight: torch.Tensor, rows: int) -> torch.Tensor:
    """A (C, Cin, 1, 1) float32 weight packed by MKL for products of `rows` pixel rows (bytes,
    uint8; MKL's layout, which it may make larger than the weight)."""
    if weight.dim() != 4 or weight.shape[2:] != (1, 1):
        raise ValueError(f"weight: expected a (C, Cin, 1, 1) weight, got {tuple(weight.shape)}")
    if rows < 1:
        raise ValueError(f"rows: expected a positive integer, got {rows}")
    out_ch, in_ch = weight.shape[:2]
    w = weight.detach().float().reshape(out_ch, in_ch).contiguous()
    lib = _bound()
    size = lib.pointwise_mkl_packed_bytes(rows, out_ch, in_ch)
    packed = torch.empty(size, dtype=torch.uint8)
    if lib.pointwise_mkl_pack(w.data_ptr(), packed.data_ptr(), rows, out_ch, in_ch) != 0:
        raise RuntimeError(f"MKL refused to pack a {out_ch}×{in_ch} weight for {rows} rows")
    return packed


def output_pixels(x_shape: tuple[int, ...], stride: int) -> int:
    """How many output pixels (the product's rows) an input of `x_shape` gives at `stride`."""
    n, _, h, w = operators.pointwise_output_shape(x_shape, 1, stride)
    return n * h * w


def run(
    x: torch.Tensor,
    packed: torch.Tensor,
    rows: int,
    out_channels: int,
    bias: torch.Tensor,
    stride: int = 1,
    relu: bool = False,
    residual: torch.Tensor | None = None,
    in_place: bool = False,
) -> torch.Tensor:
    """``relu?(conv2d(x, w, bias, stride) + residual)`` in float32 for a 1×1 weight `w` of
    `out_channels` outputs with `packed` = pack(w, rows), the output holding `rows` pixels;
    written over `residual` (channels_last, then returned) if `in_place`."""
    operators.check_no_grad("pointwise_mkl", x, residual)
    operators.check_float32_4d("x", x)
    n, cin, h, w = x.shape
    if stride < 1:
        raise ValueError(f"stride: expected a positive integer, got {stride}")
    if output_pixels(tuple(x.shape), stride) != rows:
        raise ValueError(
            f"x: packed for {rows} output pixels, got {tuple(x.shape)} at stride {stride} "
            f"({output_pixels(tuple(x.shape), stride)})"
        )
    if packed.dtype != torch.uint8 or packed.dim() != 1 or not packed.is_contiguous():
        raise ValueError(f"packed: expected pointwise_mkl.pack's bytes, got {packed.dtype}")
    x, y, residual = operators.pointwise_operands(x, out_channels, stride, bias, residual, in_place)
    rc = _bound().pointwise_mkl(
        x.data_ptr(),
        packed.data_ptr(),
        bias.contiguous().data_ptr(),
        None if residual is None else residual.data_ptr(),
        y.data_ptr(),
        n,
        h,
        w,
        cin,
        out_channels,
        stride,
        int(relu),
        torch.get_num_threads(),
    )
    if rc != 0:
        raise RuntimeError(
            f"pointwise_mkl refused {tuple(x.shape)} → {out_channels}, stride {stride}"
            + (" (no memory to gather the strided pixels)" if rc == 2 else "")
        )
    return y


def _output_shape(
    x: torch.Tensor,
    packed: torch.Tensor,
    rows: int,
    out_channels: int,
    bias: torch.Tensor,
    stride: int,
    relu: bool,
) -> tuple[int, ...]:
    return operators.pointwise_output_shape(tuple(x.shape), out_channels, stride)


operators.define_over_residual(
    "pointwise_mkl",
    "Tensor x, Tensor packed, int rows, int out_channels, Tensor bias, int stride, bool relu",
    run,
    _output_shape,
)


class MklConv1x1(Conv1x1Kernel):
    """A float32 1×1 convolution (any stride) with its bias, then optionally a residual add and a
    ReLU, on MKL's product with the weight packed for the output pixels of inputs of
    `input_shape`.
    With `in_place` the result is written over the residual (which the pass allows only where it
    is dead after). Inputs giving another output pixel count, and inputs needing a gradient, take
    torch's product on the unpacked weight and separate operators (`fallback`): the same
    function."""

    OP = torch.ops.resnext.pointwise_mkl
    OP_IN_PLACE = torch.ops.resnext.pointwise_mkl_

    def __init__(
        self, conv: nn.Conv2d, relu: bool, in_place: bool, input_shape: tuple[int, ...]
    ) -> None:
        if not eligible(conv):
            raise ValueError(
                "conv: expected a float32 1×1 convolution with equal strides, no padding and "
                f"groups 1, got {conv}"
            )
        stride = conv.stride[0]
        rows = output_pixels(tuple(input_shape), stride)
        weight = conv.weight.detach().float().contiguous()
        super().__init__(conv, pack(weight, rows), relu, in_place)
        self.rows, self.weight = rows, weight

    def __getstate__(self) -> dict[str, object]:
        # MKL's packed layout belongs to this process's MKL and CPU: a copy packs again
        state = self.__dict__.copy()
        state["packed"] = None
        return state

    def __setstate__(self, state: dict[str, object]) -> None:
        super().__setstate__(state)
        self.packed = pack(self.weight, self.rows)

    def _args(self, x: torch.Tensor) -> tuple:
        return (x, self.packed, self.rows, self.out_channels, self.bias, self.stride, self.relu)

    def takes(self, x: torch.Tensor) -> bool:
        return float32_cpu_inference(x) and output_pixels(tuple(x.shape), self.stride) == self.rows

    def fallback(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """The same function as torch's product (MKL, weight not packed) and separate operators:
        not `F.conv2d`, which has oneDNN reorder the weight on every call and may pick a slow
        algorithm for a size it was not packed for (14–19 ms instead of ~1 for a 14² layer at
        batch 1, `prepacked.onednn_weights`)."""
        x = x[:, :, :: self.stride, :: self.stride]
        n, _, h, w = x.shape
        pixels = x.permute(0, 2, 3, 1).reshape(-1, self.in_channels)
        weight = self.weight.reshape(self.out_channels, self.in_channels).t().to(x.dtype)
        y = torch.addmm(self.bias.to(x.dtype), pixels, weight)
        y = y.view(n, h, w, self.out_channels).permute(0, 3, 1, 2)
        if residual is not None:
            y = y + residual
        return F.relu(y) if self.relu else y

    def kind(self) -> str:
        return f"mkl, packed for {self.rows} output pixels"


def eligible(module: nn.Module) -> bool:
    """Whether `module` is a float32 Conv2d the kernel computes (1×1, equal strides, no padding,
    groups 1, no dilation)."""
    return (
        isinstance(module, nn.Conv2d)
        and module.weight.dtype == torch.float32
        and module.kernel_size == (1, 1)
        and module.padding == (0, 0)
        and module.padding_mode == "zeros"
        and module.groups == 1
        and module.dilation == (1, 1)
        and module.stride[0] == module.stride[1]
    )
