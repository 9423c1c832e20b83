"""Pillow's bilinear/bicubic box resampling of packed RGB uint8 arrays, faster (`kernels/resample.c`).

Built on first use like the other C parts (`resnext.native`). The arithmetic is Pillow's (weights
in double from the box as float32, 22-bit fixed point, each pass clipped to uint8); the order of
the two passes is the caller's choice or the cheaper one, while Pillow 13 picks it by a rule of its
own, so a result can differ from Pillow's in the last bits of some pixels.
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import numpy as np

from resnext import native

SOURCE = Path(__file__).with_name("kernels") / "resample.c"
FLAGS = ("-O3", "-mavx2", "-mfma")
LIBS = ("-lm",)
FILTERS = {"bilinear": 0, "bicubic": 1}
ORDERS = {"auto": -1, "horizontal-first": 0, "vertical-first": 1}


@functools.cache
def _library(source: Path = SOURCE) -> ctypes.CDLL:
    lib = native.load(source, FLAGS, LIBS, cpu_needs=frozenset({"avx2", "fma"}))
    fn = lib.resample_rgb
    fn.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    fn.argtypes += [ctypes.c_float] * 4 + [ctypes.c_int] * 5 + [ctypes.c_void_p]
    fn.restype = ctypes.c_int
    return lib


@functools.lru_cache(maxsize=1)
def unavailable_reason() -> str | None:
    """None if the resampler can run here, else why not (one line; decided once per process)."""
    return native.problem(_library)


def resize_box(
    image: np.ndarray,
    box: tuple[float, float, float, float],
    size: tuple[int, int],
    interpolation: str,
    flip: bool = False,
    order: str = "auto",
    *,
    source: Path = SOURCE,
) -> np.ndarray:
    """The (h, w, 3) uint8 result of resampling `box` of `image` to `size` = (w, h), then mirroring.

    `image` is an (H, W, 3) uint8 array whose rows may be strided (a view into a larger buffer
    works) but whose pixels are packed. `source` is the kernel file to build and run: another
    revision of it only for side-by-side benchmarks (`benchmarks/bench_resample.py`).
    """
    if interpolation not in FILTERS:
        raise ValueError(f"interpolation: expected one of {sorted(FILTERS)}, got {interpolation!r}")
    if order not in ORDERS:
        raise ValueError(f"order: expected one of {sorted(ORDERS)}, got {order!r}")
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(
            f"image: expected an (H, W, 3) uint8 array, got {image.dtype} {image.shape}"
        )
    if image.strides[1:] != (3, 1):
        raise ValueError("image: pixels must be packed (strides (row, 3, 1))")
    w, h = size
    out = np.empty((h, w, 3), dtype=np.uint8)
    rc = _library(source).resample_rgb(
        image.ctypes.data,
        image.shape[1],
        image.shape[0],
        image.strides[0],
        *box,
        w,
        h,
        FILTERS[interpolation],
        ORDERS[order],
        int(flip),
        out.ctypes.data,
    )
    if rc != 0:
        raise ValueError(f"resample failed for image {image.shape}, box {box}, size {size}")
    return out
