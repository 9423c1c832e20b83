"""Synthetic photo-like images and JPEG flavours shared by the JPEG decoding tests."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

# JPEG flavours: chroma 4:2:0, 4:4:4, 4:2:2, greyscale, progressive (Pillow save options).
JPEG_KINDS: dict[str, dict[str, object]] = {
    "420": {"quality": 90},
    "444": {"quality": 90, "subsampling": 0},
    "422": {"quality": 85, "subsampling": 1},
    "grey": {"quality": 90, "mode": "L"},
    "progressive": {"quality": 90, "progressive": True},
    # restart markers every 5 MCUs, as some cameras write them: not aligned to MCU rows at the
    # tests' sizes (13, 21 and 27 MCUs a row), so not the markers `jpeg_restart` writes
    "restart": {"quality": 90, "restart_marker_blocks": 5},
}


def photo(
    width: int,
    height: int,
    seed: int = 0,
    periods: tuple[float, float, float, float] = (17.0, 23.0, 31.0, 9.0),
    noise: float = 8.0,
) -> Image.Image:
    """A smooth colour image with texture and noise: JPEG-friendly, yet no two blocks alike."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    px, py, pg, pb = periods
    r = 127 + 100 * np.sin(xx / px) * np.cos(yy / py)
    g = 127 + 100 * np.cos((xx + 2 * yy) / pg)
    b = 127 + 60 * np.sin(yy / pb) + rng.normal(0, noise, (height, width))
    return Image.fromarray(np.clip(np.stack([r, g, b], -1), 0, 255).astype(np.uint8))


def jpeg_bytes(img: Image.Image, kind: str) -> bytes:
    """`img` saved as a JPEG of flavour `kind` (a key of JPEG_KINDS)."""
    options = dict(JPEG_KINDS[kind])
    if options.pop("mode", None) == "L":
        img = img.convert("L")
    buf = io.BytesIO()
    img.save(buf, "JPEG", **options)
    return buf.getvalue()
