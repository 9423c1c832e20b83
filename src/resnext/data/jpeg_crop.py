"""Crop-region JPEG decoding with libjpeg: `kernels/jpeg_crop.c`, built on first use, called via ctypes.

Only the rows down to the crop's bottom are read and only the crop's columns (rounded out to whole
iMCUs) go through the inverse DCT and colour conversion. Needs a C compiler and libjpeg's header
(`jpeglib.h`, Debian's libjpeg62-turbo-dev); `unavailable_reason()` says what is missing.
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import numpy as np

from resnext import native

SOURCE = Path(__file__).with_name("kernels") / "jpeg_crop.c"
FLAGS = ("-O2",)
LIBS = ("-ljpeg",)
CMYK, YCCK = 4, 5  # libjpeg's J_COLOR_SPACE values Pillow converts but libjpeg cannot
_MSG = 200


class CropDecodeFailed(ValueError):
    """libjpeg refused the file or the region (corrupt data, CMYK, bad rectangle), with why."""


@functools.lru_cache(maxsize=1)
def _library() -> ctypes.CDLL:
    lib = native.load(SOURCE, FLAGS, LIBS)
    lib.jpeg_crop_header.argtypes = (
        [ctypes.c_char_p, ctypes.c_ulong]
        + [ctypes.POINTER(ctypes.c_int)] * 3
        + [ctypes.c_char_p, ctypes.c_int]
    )
    lib.jpeg_crop_header.restype = ctypes.c_int
    lib.jpeg_crop_decode.argtypes = [ctypes.c_char_p, ctypes.c_ulong] + [ctypes.c_int] * 5
    lib.jpeg_crop_decode.argtypes += [ctypes.c_void_p, ctypes.c_long, ctypes.c_char_p, ctypes.c_int]
    lib.jpeg_crop_decode.restype = ctypes.c_int
    return lib


@functools.lru_cache(maxsize=1)
def unavailable_reason() -> str | None:
    """None if the crop decoder can run here, else why not (one line; decided once per process)."""
    return native.problem(_library)


def read_header(data: bytes) -> tuple[int, int, int]:
    """(width, height, libjpeg colour space) of a JPEG, or CropDecodeFailed."""
    w, h, cs = ctypes.c_int(), ctypes.c_int(), ctypes.c_int()
    msg = ctypes.create_string_buffer(_MSG)
    rc = _library().jpeg_crop_header(
        data, len(data), ctypes.byref(w), ctypes.byref(h), ctypes.byref(cs), msg, _MSG
    )
    if rc != 0:
        raise CropDecodeFailed(msg.value.decode(errors="replace") or "unreadable JPEG header")
    return w.value, h.value, cs.value


def decode_region(
    data: bytes,
    denom: int,
    x0: int,
    y0: int,
    w: int,
    h: int,
    out: np.ndarray | None = None,
    at: tuple[int, int] | None = None,
) -> np.ndarray:
    """RGB uint8 pixels [x0, x0+w) × [y0, y0+h) of the image decoded at scale 1/denom.

    Into a new (h, w, 3) array, or into `out[y:y+h, x:x+w]` when `out` (an (H, W, 3) uint8
    C-contiguous array) is given, (x, y) being `at` (default (x0, y0): `out` holds the whole
    scaled image); the rest of `out` is left as it was.
    The region's edge columns can differ from a full decode's (chroma upsampling treats the
    region's edge as the image's), so callers ask for a margin beyond what they read.
    """
    if denom not in (1, 2, 4, 8):
        raise ValueError(f"denom: expected 1, 2, 4 or 8, got {denom}")
    if out is None:
        target, stride = np.empty((h, w, 3), dtype=np.uint8), w * 3
        pointer = target.ctypes.data
    else:
        if (
            out.dtype != np.uint8
            or out.ndim != 3
            or out.shape[2] != 3
            or not out.flags.c_contiguous
        ):
            raise ValueError(f"out: expected a C-contiguous (H, W, 3) uint8 array, got {out.shape}")
        ax, ay = (x0, y0) if at is None else at
        if ay + h > out.shape[0] or ax + w > out.shape[1] or ax < 0 or ay < 0:
            raise ValueError(f"out: region {ax},{ay} {w}x{h} does not fit {out.shape}")
        target, stride = out, out.shape[1] * 3
        pointer = out.ctypes.data + ay * stride + ax * 3
    msg = ctypes.create_string_buffer(_MSG)
    rc = _library().jpeg_crop_decode(
        data, len(data), denom, x0, y0, w, h, pointer, stride, msg, _MSG
    )
    if rc == -2:
        raise CropDecodeFailed("CMYK/YCCK JPEG: libjpeg cannot convert it to RGB")
    if rc == -3:
        raise CropDecodeFailed(f"region {x0},{y0} {w}x{h} is outside the image at scale 1/{denom}")
    if rc != 0:
        raise CropDecodeFailed(msg.value.decode(errors="replace") or "libjpeg failed")
    return target
