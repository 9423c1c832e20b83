"""Decode any common image file to an 8-bit RGB PIL image, refusing decompression bombs."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from resnext.errors import DataError

DraftHint = Callable[[int, int], "tuple[int, int] | None"]
WHITE = (255, 255, 255)


def _sixteen_bit_to_rgb(img: Image.Image) -> Image.Image:
    # Pillow's own 'I' -> 'RGB' conversion clips at 255; scale the 16-bit range instead.
    array = np.asarray(img).astype(np.float64)
    grey = np.clip(np.rint(array / 257.0), 0, 255).astype(np.uint8)
    return Image.fromarray(np.repeat(grey[:, :, None], 3, axis=2))


def _flatten_alpha(img: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    rgba = img.convert("RGBA")
    base = Image.new("RGBA", rgba.size, (*background, 255))
    return Image.alpha_composite(base, rgba).convert("RGB")


def to_rgb(img: Image.Image, background: tuple[int, int, int] = WHITE) -> Image.Image:
    """Any Pillow mode to 8-bit RGB: transparency is composited over `background`."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("I", "I;16", "I;16B", "I;16L", "I;16N"):
        return _sixteen_bit_to_rgb(img)
    if mode == "F":
        return Image.fromarray(np.clip(np.asarray(img), 0, 255).astype(np.uint8)).convert("RGB")
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        mode in ("P", "L", "RGB") and "transparency" in img.info
    ):
        return _flatten_alpha(img, background)
    return img.convert("RGB")  # L, 1, P, CMYK, YCbCr, LAB, HSV, RGBX


def check_pixel_limit(path: str | Path, width: int, height: int, max_pixels: int | None) -> None:
    """DataError if a width x height image exceeds `max_pixels` (default: Pillow's bomb limit)."""
    limit = Image.MAX_IMAGE_PIXELS if max_pixels is None else max_pixels
    if limit is not None and width * height > limit:
        raise DataError(
            f"{path}: {width}x{height} = {width * height} pixels exceeds the decompression-bomb "
            f"limit of {limit} pixels; refused"
        )


def load_rgb(
    path: str | Path,
    *,
    draft: DraftHint | None = None,
    max_pixels: int | None = None,
    background: tuple[int, int, int] = WHITE,
) -> Image.Image:
    """Open, check and fully decode an image file as 8-bit RGB.

    `draft(w, h)` may return the smallest (w, h) the caller needs; JPEGs are then decoded at a
    reduced DCT scale that still covers it. Images over `max_pixels` (default: Pillow's
    decompression-bomb limit) are refused before decoding. Any failure is a DataError.
    """
    path = Path(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                w, h = img.size
                check_pixel_limit(path, w, h, max_pixels)
                wanted = draft(w, h) if draft is not None and img.format == "JPEG" else None
                if wanted is not None:
                    img.draft("RGB", wanted)
                img.load()
                return to_rgb(img, background)
    except DataError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise DataError(f"{path}: refused as a decompression bomb ({exc})") from None
    except UnidentifiedImageError:
        raise DataError(f"{path}: not an image file Pillow can identify") from None
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        raise DataError(f"{path}: corrupt or truncated image ({exc})") from None
