"""The grouped 3×3 convolution's weight gradient on AMX tiles (`kernels/grouped3x3_wgrad_amx.c`).

For bf16 channels-last tensors with 1-8 channels per group (the block-diagonal scheme of
`resnext.speed.grouped_amx`) or a multiple of 16, strides 1 and 2; returns the float32 gradient.
`resnext.speed.grouped_train` offers it to the training chooser next to the AVX-512 kernels of
`resnext.speed.grouped_wgrad`. Runs only where the CPU has AMX-BF16 and the OS grants the tile
state; `unavailable_reason` says why not elsewhere.
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import torch

from resnext import native
from resnext.speed import grouped_amx, grouped_wgrad

SOURCE = Path(__file__).with_name("kernels") / "grouped3x3_wgrad_amx.c"


@functools.lru_cache(maxsize=1)
def _library() -> ctypes.CDLL:
    lib = grouped_amx.load_amx(SOURCE, "grouped3x3_wgrad_amx_allowed")
    lib.grouped3x3_wgrad_amx.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int] * 7
    lib.grouped3x3_wgrad_amx.restype = ctypes.c_int
    return lib


@functools.lru_cache(maxsize=1)
def unavailable_reason() -> str | None:
    """None if the kernel can run here, else why not (one line; decided once per process)."""
    return native.problem(_library)


def supports(channels: int, groups: int, stride: int) -> bool:
    """Whether the kernel takes a 3×3 conv with this many channels (in = out), groups and stride:
    the shapes of the forward AMX kernel, whose channel blocks it shares."""
    return grouped_amx.supports(channels, groups, stride)


def weight_grad(x: torch.Tensor, grad: torch.Tensor, groups: int, stride: int) -> torch.Tensor:
    """float32 gradient of ``conv2d(x, w, stride=stride, padding=1, groups=groups)`` w.r.t. w,
    given the output gradient `grad`."""
    n, c, h, w = x.shape
    ok = x.dtype == grad.dtype == torch.bfloat16 and supports(c, groups, stride)
    if not ok:
        raise ValueError(
            f"x: expected bfloat16 with C % 16 == 0, C/groups in {grouped_amx.SMALL_CPG} or a "
            f"multiple of 16 up to {grouped_amx.MAX_CPG}, stride 1 or 2 "
            f"and a bfloat16 gradient; got {tuple(x.shape)} {x.dtype}, groups={groups}, "
            f"stride={stride}, gradient {grad.dtype}"
        )
    grouped_wgrad.check_output_grad(x, grad, stride)
    x = x.contiguous(memory_format=torch.channels_last)
    grad = grad.contiguous(memory_format=torch.channels_last)
    dw = torch.empty(c, c // groups, 3, 3, dtype=torch.float32)
    if n == 0 or h == 0 or w == 0:
        return dw.zero_()
    rc = _library().grouped3x3_wgrad_amx(
        x.data_ptr(), grad.data_ptr(), dw.data_ptr(), n, h, w, c, c // groups, stride,
        torch.get_num_threads(),
    )  # fmt: skip
    grouped_amx.check_rc(rc, f"grouped3x3_wgrad_amx on {tuple(x.shape)}, groups={groups}")
    return dw
