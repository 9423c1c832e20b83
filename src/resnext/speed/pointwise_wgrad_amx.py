"""The 1×1 convolution's weight gradient on AMX tiles (`kernels/pointwise_wgrad_amx.c`).

dW = Gᵀ·X over the pixel rows of the output gradient G and the input X (bf16, channels-last),
returned in float32. `resnext.speed.pointwise_train` offers it to the training chooser next to
oneDNN and one `torch.mm`. Runs only where the CPU has AMX-BF16 and the OS grants the tile
state; `unavailable_reason` says why not elsewhere.
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import torch

from resnext import native
from resnext.speed.grouped_amx import check_rc, load_amx

SOURCE = Path(__file__).with_name("kernels") / "pointwise_wgrad_amx.c"


def load(source: Path = SOURCE) -> ctypes.CDLL:
    """The kernel built from `source` (this checkout's by default; the benches' A/Bs pass
    another) and loaded."""
    lib = load_amx(source, "pointwise_wgrad_amx_allowed")
    lib.pointwise_wgrad_amx.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_long] + [ctypes.c_int] * 3
    lib.pointwise_wgrad_amx.restype = ctypes.c_int
    return lib


@functools.lru_cache(maxsize=1)
def _library() -> ctypes.CDLL:
    return load()


@functools.lru_cache(maxsize=1)
def unavailable_reason() -> str | None:
    """None if the kernel can run here, else why not (one line; decided once per process)."""
    return native.problem(_library)


def applies(x: torch.Tensor, grad: torch.Tensor) -> bool:
    """Whether the kernel takes this input and output gradient (bf16, channels multiples of 16)."""
    return (
        x.dtype == grad.dtype == torch.bfloat16
        and x.dim() == grad.dim() == 4
        and x.shape[1] % 16 == 0
        and grad.shape[1] % 16 == 0
    )


def _rows(t: torch.Tensor) -> torch.Tensor:
    return (
        t.contiguous(memory_format=torch.channels_last).permute(0, 2, 3, 1).reshape(-1, t.shape[1])
    )


def weight_grad(x: torch.Tensor, grad: torch.Tensor, stride: int = 1) -> torch.Tensor:
    """float32 gradient (C_out, C_in, 1, 1) of a bias-free 1×1 ``conv2d(x, w, stride=stride)``
    w.r.t. w, given the output gradient `grad`."""
    if not applies(x, grad):
        raise ValueError(
            "x, grad: expected 4-d bfloat16 tensors with channel counts divisible by 16, got "
            f"{tuple(x.shape)} {x.dtype} and {tuple(grad.shape)} {grad.dtype}"
        )
    if stride != 1:
        x = x[:, :, ::stride, ::stride]
    if x.shape[0] != grad.shape[0] or x.shape[2:] != grad.shape[2:]:
        raise ValueError(
            f"grad: expected the output shape of a stride-{stride} 1×1 convolution of x "
            f"{tuple(x.shape)}, got {tuple(grad.shape)}"
        )
    # G is the operand transposed while packing, so that the sums come out as (C_out, C_in). (X
    # transposed where it has fewer channels, then the sums transposed back, was slower on 4 of
    # ResNeXt-50's 9 shapes and faster on 2, ad hoc.)
    a, b = _rows(grad), _rows(x)
    out = torch.empty(a.shape[1], b.shape[1], dtype=torch.float32)
    rc = _library().pointwise_wgrad_amx(
        a.data_ptr(), b.data_ptr(), out.data_ptr(), a.shape[0], a.shape[1], b.shape[1],
        torch.get_num_threads(),
    )  # fmt: skip
    check_rc(rc, f"pointwise_wgrad_amx on rows {tuple(a.shape)} and {tuple(b.shape)}")
    return out[:, :, None, None]
