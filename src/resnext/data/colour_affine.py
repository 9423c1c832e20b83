"""The batch stage's per-image colour map from uint8 NHWC to float NCHW in one pass (`kernels/colour_affine.c`).

Built on first use like the other C parts (`resnext.native`); runs on torch's OpenMP threads.
`BatchPipeline` uses it for CPU batches when it builds and keeps its torch path otherwise.
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import torch

from resnext import native

SOURCE = Path(__file__).with_name("kernels") / "colour_affine.c"
FLAGS = ("-O3", "-mavx2", "-mfma", "-fopenmp")


@functools.lru_cache(maxsize=1)
def _library() -> ctypes.CDLL:
    lib = native.load(SOURCE, FLAGS, cpu_needs=frozenset({"avx2", "fma"}))
    lib.rgb_channel_sums.argtypes = [ctypes.c_void_p, ctypes.c_long, ctypes.c_long]
    lib.rgb_channel_sums.argtypes += [ctypes.c_void_p, ctypes.c_int]
    lib.rgb_channel_sums.restype = None
    lib.rgb_affine_planes.argtypes = [ctypes.c_void_p, ctypes.c_long, ctypes.c_long]
    lib.rgb_affine_planes.argtypes += [ctypes.c_void_p] * 3 + [ctypes.c_int]
    lib.rgb_affine_planes.restype = None
    return lib


@functools.lru_cache(maxsize=1)
def unavailable_reason() -> str | None:
    """None if the kernel can run here, else why not (one line; decided once per process)."""
    return native.problem(_library)


def takes(batch: torch.Tensor) -> bool:
    """Whether `batch` is one the kernel reads as it is: a contiguous CPU (N, H, W, 3) uint8."""
    return (
        batch.device.type == "cpu"
        and batch.dtype == torch.uint8
        and batch.dim() == 4
        and batch.shape[-1] == 3
        and batch.is_contiguous()
    )


def _check(batch: torch.Tensor) -> None:
    if not takes(batch):
        raise ValueError(
            "batch: expected a contiguous CPU (N, H, W, 3) uint8 tensor, got "
            f"{batch.dtype} {tuple(batch.shape)} on {batch.device}"
        )


def channel_means(batch: torch.Tensor) -> torch.Tensor:
    """(N, 3) float32 mean of each image's R, G, B values, in [0, 255]."""
    _check(batch)
    n, h, w, _ = batch.shape
    sums = torch.empty(n, 3, dtype=torch.float64)
    _library().rgb_channel_sums(
        batch.data_ptr(), n, h * w, sums.data_ptr(), torch.get_num_threads()
    )
    return (sums / (h * w)).to(torch.float32)


def affine_planes(batch: torch.Tensor, matrix: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Float (N, 3, H, W) with out[i, :, y, x] = matrix[i] @ batch[i, y, x, :] + shift[i]."""
    _check(batch)
    n, h, w, _ = batch.shape
    if matrix.shape != (n, 3, 3) or shift.shape != (n, 3):
        raise ValueError(
            f"matrix/shift: expected ({n}, 3, 3) and ({n}, 3), got "
            f"{tuple(matrix.shape)} and {tuple(shift.shape)}"
        )
    m = matrix.to(torch.float32).contiguous()
    s = shift.to(torch.float32).contiguous()
    out = torch.empty(n, 3, h, w, dtype=torch.float32)
    _library().rgb_affine_planes(
        batch.data_ptr(), n, h * w, m.data_ptr(), s.data_ptr(), out.data_ptr(),
        torch.get_num_threads(),
    )  # fmt: skip
    return out
