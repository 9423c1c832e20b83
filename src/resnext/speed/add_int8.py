"""Our int8 residual add-and-ReLU (AVX-512, else AVX2) in place of torch's `quantized::add_relu`.

`kernels/add_relu_int8.c` is compiled on first use (`resnext.native`), for AVX-512 where the CPU
has it, else for AVX2, and called through ctypes on two uint8 maps of the same shape and memory
layout; `add_relu` computes what torch's `FloatFunctional.add_relu` computes once converted (the
two real values added, requantized to the output's scale and zero point, the ReLU as a clamp at
the zero point), to within one code at rounding ties. `Int8Bottleneck` calls it for its residual
where it runs.
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import torch

from resnext import native

SOURCE = Path(__file__).with_name("kernels") / "add_relu_int8.c"
# one source, compiled for AVX-512 or for AVX2: the first this CPU runs is used
BUILDS = (
    native.Build(
        "avx512",
        SOURCE,
        ("-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-fopenmp"),
        frozenset({"avx512f", "avx512bw", "avx512vl"}),
    ),
    native.Build(
        "avx2", SOURCE, ("-O3", "-mavx2", "-mfma", "-fopenmp"), frozenset({"avx2", "fma"})
    ),
)


def _load(build: native.Build) -> ctypes.CDLL:
    """One build of the kernel, loaded and its C signature declared (NativeUnavailable where
    this CPU lacks its flags or it cannot be built)."""
    lib = build.load()
    fn = lib.add_relu_u8
    fn.argtypes = (
        [ctypes.c_void_p] * 3 + [ctypes.c_long] + [ctypes.c_float] * 3 + [ctypes.c_int] * 2
    )
    fn.restype = ctypes.c_int
    return lib


_CHOICE = native.Builds(BUILDS, _load)  # each build loaded once, the first that runs used


@functools.cache
def _library() -> ctypes.CDLL:
    """The first of `BUILDS` this CPU runs, loaded once (NativeUnavailable where none can be,
    with each one's reason)."""
    return _CHOICE.library(_CHOICE.active())


@functools.cache
def unavailable_reason() -> str | None:
    """None where the kernel runs on this machine, else why not (one line: the CPU flags it
    lacks, or why it could not be built); checked once."""
    return native.problem(_library)


def takes(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether the kernel adds these two: per-tensor quint8 maps of one shape, both dense in the
    same memory order (so that their bytes pair up one to one)."""
    return _shared_layout(a, b) is not None


def _shared_layout(a: torch.Tensor, b: torch.Tensor) -> torch.memory_format | None:
    """The memory order both maps are dense in where the kernel takes them (`takes`), else None."""
    if not (a.is_quantized and b.is_quantized) or a.shape != b.shape:
        return None
    if a.dtype != torch.quint8 or b.dtype != torch.quint8:
        return None
    if a.qscheme() != torch.per_tensor_affine or b.qscheme() != torch.per_tensor_affine:
        return None
    for fmt in (torch.channels_last, torch.contiguous_format):
        if a.is_contiguous(memory_format=fmt) and b.is_contiguous(memory_format=fmt):
            return fmt if a.stride() == b.stride() else None
    return None


def add_relu(
    a: torch.Tensor, b: torch.Tensor, scale: float, zero_point: int, relu: bool = True
) -> torch.Tensor:
    """a + b (and ReLU) requantized to `scale` and `zero_point`, in a's memory layout."""
    y = add_relu_if_taken(a, b, scale, zero_point, relu)
    if y is None:
        raise ValueError(
            "a, b: expected two per-tensor quint8 maps of one shape and memory layout, got "
            f"{a.dtype} {tuple(a.shape)} and {b.dtype} {tuple(b.shape)}"
        )
    return y


def add_relu_if_taken(
    a: torch.Tensor, b: torch.Tensor, scale: float, zero_point: int, relu: bool = True
) -> torch.Tensor | None:
    """`add_relu(a, b, …)`, or None where the kernel does not take the pair (`takes`): the
    network's residual asks once per call, then falls back to torch's add."""
    fmt = _shared_layout(a, b)
    if fmt is None:
        return None
    y = torch._empty_affine_quantized(
        a.shape, scale=scale, zero_point=zero_point, dtype=torch.quint8, memory_format=fmt
    )
    sa, sb = a.q_scale() / scale, b.q_scale() / scale
    c = zero_point - a.q_zero_point() * sa - b.q_zero_point() * sb
    rc = _library().add_relu_u8(
        a.data_ptr(), b.data_ptr(), y.data_ptr(), a.numel(), sa, sb, c,
        zero_point if relu else 0, torch.get_num_threads(),
    )  # fmt: skip
    if rc != 0:
        raise RuntimeError(f"add_relu_u8 failed ({rc}) on {tuple(a.shape)}")
    return y


def reference(
    a: torch.Tensor, b: torch.Tensor, scale: float, zero_point: int, relu: bool = True
) -> torch.Tensor:
    """The codes of a + b (and ReLU) requantized, by definition in float64: independent of the
    kernel and of torch's engines."""
    y = a.dequantize().double() + b.dequantize().double()
    if relu:
        y = y.clamp(min=0)
    return (torch.round(y / scale) + zero_point).clamp(0, 255)
