"""Accepted image inputs (paths, PIL images, HWC uint8 arrays, CHW float tensors) as RGB PIL images."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image

from resnext.data.images import load_rgb, to_rgb
from resnext.errors import ConfigError, DataError

if TYPE_CHECKING:
    from resnext.weights.preprocess import Preprocessing

ImageInput = str | Path | Image.Image | np.ndarray | torch.Tensor
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm")


def open_image(path: str | Path) -> Image.Image:
    """The RGB image stored at `path`; unreadable files end in a DataError naming them."""
    path = Path(path)
    if path.is_dir():
        raise DataError(
            f"image {path}: a folder; expected an image file (resnext predict, or "
            "resnext.inference.inputs.expand_paths, takes folders and recurses into them)"
        )
    if not path.is_file():
        raise DataError(f"image {path}: no such file")
    # The training loader's decoder: the same pixels for 16-bit, palette and transparent images,
    # and decompression bombs refused before decoding.
    return load_rgb(path)


def to_pil(item: ImageInput) -> Image.Image:
    """One input as an RGB PIL image.

    Tensors are CHW RGB with values in [0, 1]; they are rounded to 8 bits so every input kind goes
    through the same PIL resize and gives the same prediction for the same picture.
    """
    if isinstance(item, (str, Path)):
        return open_image(item)
    if isinstance(item, Image.Image):
        return to_rgb(item)
    if isinstance(item, np.ndarray):
        if item.dtype != np.uint8 or item.ndim != 3 or item.shape[2] not in (1, 3, 4):
            raise ConfigError(
                f"array image: expected HWC uint8 with 1, 3 or 4 channels, "
                f"got {item.dtype} {item.shape}"
            )
        arr = item[:, :, 0] if item.shape[2] == 1 else item
        # to_rgb as for paths and PIL images: alpha composited over white, not dropped, so the
        # same picture gives the same prediction whatever form it comes in.
        return to_rgb(Image.fromarray(np.ascontiguousarray(arr)))
    if isinstance(item, torch.Tensor):
        if item.ndim != 3 or item.shape[0] not in (1, 3) or not item.is_floating_point():
            raise ConfigError(
                f"tensor image: expected CHW float with 1 or 3 channels, got "
                f"{item.dtype} {tuple(item.shape)}"
            )
        x = item.detach().cpu().float()
        if not torch.isfinite(x).all():  # NaN passes the range test and would become black
            raise ConfigError("tensor image: expected finite values, got NaN or infinity")
        if x.min() < 0 or x.max() > 1:
            raise ConfigError("tensor image: expected values in [0, 1] (unnormalised RGB)")
        x = x.expand(3, -1, -1) if x.shape[0] == 1 else x
        arr = (x * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
        return Image.fromarray(np.ascontiguousarray(arr))
    raise ConfigError(
        f"image input: expected a path, PIL image, HWC uint8 array or CHW float tensor, "
        f"got {type(item).__name__}"
    )


def describe(item: ImageInput, index: int) -> str:
    """A short label for an input in result listings: its path, or its kind and position."""
    if isinstance(item, (str, Path)):
        return str(item)
    return f"<{type(item).__name__} #{index}>"


def expand_paths(paths: Iterable[str | Path]) -> Iterator[Path]:
    """Files as given; folders recursed (sorted) for image files."""
    for p in paths:
        p = Path(p)
        if p.is_dir():
            yield from sorted(
                f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES
            )
        elif p.exists():
            yield p
        else:
            raise DataError(f"{p}: no such file or folder")


def preprocessed_images(
    paths: Sequence[str | Path],
    prep: Preprocessing,
    option: str,
    *,
    size: int | None = None,
    limit: int | None = None,
) -> torch.Tensor:
    """The first `limit` images under `paths` (all without a limit), centre-cropped and
    normalised as `prep` says (at side `size` if given), stacked; none is a DataError naming the
    command-line `option` they came from."""
    from resnext.evaluate.views import ViewTransform

    views = ViewTransform.center_of(option, prep, size)
    files = list(expand_paths(paths))[:limit]
    if not files:
        raise DataError(f"{option}: no image files under {', '.join(map(str, paths))}")
    return torch.stack([views(to_pil(f)) for f in files])  # type: ignore[misc]
