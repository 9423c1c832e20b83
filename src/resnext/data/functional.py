"""Deterministic image operations on PIL images and CHW tensors, shared by the transforms."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from resnext.errors import ConfigError

Img = Image.Image | torch.Tensor

_PIL_MODES = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
}


def pil_interpolation(name: str) -> Image.Resampling:
    """The Pillow filter for 'nearest', 'bilinear' or 'bicubic'."""
    try:
        return _PIL_MODES[name]
    except KeyError:
        raise ConfigError(f"interpolation {name!r} is not one of {sorted(_PIL_MODES)}") from None


def image_size(img: Img) -> tuple[int, int]:
    """(width, height) of a PIL image or a CHW tensor."""
    if isinstance(img, torch.Tensor):
        return int(img.shape[-1]), int(img.shape[-2])
    return img.size


def to_tensor(img: Img) -> torch.Tensor:
    """RGB PIL image (H, W, 3 uint8) to a float32 CHW tensor in [0, 1]; tensors pass through."""
    if isinstance(img, torch.Tensor):
        return img if img.is_floating_point() else img.float().div(255.0)
    if img.mode != "RGB":
        img = img.convert("RGB")
    array = np.asarray(img, dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div_(255.0)


def shorter_side_size(width: int, height: int, size: int) -> tuple[int, int]:
    """(w, h) after scaling so that the shorter side is `size` (the longer side truncated)."""
    if width <= height:
        return size, int(size * height / width)
    return int(size * width / height), size


def resize(img: Img, size: tuple[int, int], interpolation: str, antialias: bool = True) -> Img:
    """Resize to (w, h). PIL images are always antialiased; antialias=False goes via torch."""
    if image_size(img) == tuple(size):
        return img
    if isinstance(img, Image.Image) and antialias:
        return img.resize(size, pil_interpolation(interpolation))
    pil_interpolation(interpolation)  # validate the name
    tensor = to_tensor(img)
    mode = interpolation
    out = F.interpolate(
        tensor.unsqueeze(0),
        size=(size[1], size[0]),
        mode=mode,
        antialias=antialias and mode != "nearest",
        align_corners=None if mode == "nearest" else False,
    )
    return out.squeeze(0)


def crop(img: Img, left: int, top: int, width: int, height: int) -> Img:
    """The region [top, top+height) x [left, left+width), zero-filled where it leaves the image."""
    if isinstance(img, Image.Image):
        return img.crop((left, top, left + width, top + height))  # Pillow fills outside with 0
    w, h = image_size(img)
    if left >= 0 and top >= 0 and left + width <= w and top + height <= h:
        return img[..., top : top + height, left : left + width]
    padded = F.pad(
        img, (max(0, -left), max(0, left + width - w), max(0, -top), max(0, top + height - h))
    )
    return padded[..., max(0, top) : max(0, top) + height, max(0, left) : max(0, left) + width]


def center_crop_box(width: int, height: int, crop_w: int, crop_h: int) -> tuple[int, int]:
    """(left, top) of a centred crop; odd margins put the extra pixel on the left/top side."""
    return math.ceil((width - crop_w) / 2), math.ceil((height - crop_h) / 2)


def center_crop(img: Img, size: tuple[int, int]) -> Img:
    """The centred (w, h) crop, zero-padded if the image is smaller."""
    w, h = image_size(img)
    left, top = center_crop_box(w, h, size[0], size[1])
    return crop(img, left, top, size[0], size[1])


def hflip(img: Img) -> Img:
    """Mirror left-right."""
    if isinstance(img, Image.Image):
        return img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return img.flip(-1)


def grayscale(img: torch.Tensor) -> torch.Tensor:
    """ITU-R 601 luma (0.299 R + 0.587 G + 0.114 B) as a 1xHxW tensor."""
    return (0.299 * img[0] + 0.587 * img[1] + 0.114 * img[2]).unsqueeze(0)


def blend(img: torch.Tensor, other: torch.Tensor, alpha: float) -> torch.Tensor:
    """alpha * img + (1 - alpha) * other, unclamped as in fb.resnet.torch."""
    return img * alpha + other * (1.0 - alpha)


def normalize(img: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """(img - mean) / std per channel."""
    m = torch.tensor(mean, dtype=img.dtype).view(-1, 1, 1)
    s = torch.tensor(std, dtype=img.dtype).view(-1, 1, 1)
    return (img - m) / s
