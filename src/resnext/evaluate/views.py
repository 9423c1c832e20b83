"""Image views for each protocol: PIL resize of the shorter side, crops, ten-crop, tensor conversion."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from resnext.data.functional import center_crop_box, shorter_side_size
from resnext.errors import ConfigError
from resnext.evaluate.protocols import Protocol
from resnext.weights.preprocess import channel_stats_problem

_PIL_FILTERS = {
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "nearest": Image.Resampling.NEAREST,
}


class Normalization:
    """Pixel scaling, channel order and mean/std: the part of preprocessing after the geometry."""

    def __init__(
        self,
        mean: Sequence[float],
        std: Sequence[float],
        channel_order: str = "RGB",
        value_range: float = 1.0,
    ) -> None:
        if channel_order not in ("RGB", "BGR"):
            raise ConfigError(f"channel_order: expected 'RGB' or 'BGR', got {channel_order!r}")
        problem = channel_stats_problem(mean, std)
        if problem is not None:
            raise ConfigError(f"normalization {problem}")
        self.mean = torch.tensor([float(m) for m in mean]).view(3, 1, 1)
        self.std = torch.tensor([float(s) for s in std]).view(3, 1, 1)
        self.channel_order = channel_order
        self.value_range = float(value_range)

    @classmethod
    def from_preprocessing(cls, prep: object) -> Normalization:
        """From a `resnext.weights.preprocess.Preprocessing` (or anything with the same fields)."""
        return cls(prep.mean, prep.std, prep.channel_order, prep.value_range)  # type: ignore[attr-defined]

    def to_dict(self) -> dict[str, object]:
        """A JSON-ready description."""
        return {
            "mean": self.mean.flatten().tolist(),
            "std": self.std.flatten().tolist(),
            "channel_order": self.channel_order,
            "value_range": self.value_range,
        }

    def __call__(self, image: Image.Image) -> torch.Tensor:
        """An RGB PIL image as a normalised float CHW tensor."""
        array = np.asarray(image.convert("RGB"), dtype=np.float32)
        x = torch.from_numpy(array.copy()).permute(2, 0, 1) * (self.value_range / 255.0)
        if self.channel_order == "BGR":
            x = x.flip(0)
        return (x - self.mean) / self.std


def resize_shorter(image: Image.Image, size: int, interpolation: str = "bilinear") -> Image.Image:
    """Scale so the shorter side is `size`, keeping the aspect ratio (the long side truncated)."""
    new = shorter_side_size(*image.size, size)
    if new == image.size:
        return image
    return image.resize(new, _PIL_FILTERS[interpolation])


def crop_box(image: Image.Image, left: int, top: int, size: int) -> Image.Image:
    """The `size`×`size` square with its top-left corner at (left, top)."""
    return image.crop((left, top, left + size, top + size))


def center_crop(image: Image.Image, size: int) -> Image.Image:
    """The centred `size`×`size` square (odd margins put the extra pixel left/top, as in training)."""
    w, h = image.size
    if size > w or size > h:
        raise ConfigError(f"crop {size}: larger than the resized image {w}x{h}")
    return crop_box(image, *center_crop_box(w, h, size, size), size)


def ten_crops(image: Image.Image, size: int) -> list[Image.Image]:
    """Centre and the four corners, each followed by its horizontal mirror (10 views)."""
    w, h = image.size
    crops = [
        center_crop(image, size),
        crop_box(image, 0, 0, size),
        crop_box(image, w - size, 0, size),
        crop_box(image, 0, h - size, size),
        crop_box(image, w - size, h - size, size),
    ]
    out: list[Image.Image] = []
    for crop in crops:
        out += [crop, crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)]
    return out


class ViewTransform:
    """PIL image -> the tensors one protocol scores: (3,S,S), (10,3,S,S) or one (3,H,W) per scale."""

    def __init__(self, protocol: Protocol, normalization: Normalization) -> None:
        self.protocol = protocol
        self.normalize = normalization

    @classmethod
    def center_of(cls, name: str, prep: object, size: int | None = None) -> ViewTransform:
        """The centre crop a weights' `Preprocessing` describes (resize, crop, interpolation,
        normalisation), or of side `size` with the short side scaled in the same ratio."""
        crop = size or prep.crop  # type: ignore[attr-defined]
        resize = max(crop, round(crop * prep.resize / prep.crop))  # type: ignore[attr-defined]
        interpolation = prep.interpolation  # type: ignore[attr-defined]
        protocol = Protocol(name, "center", resize=resize, crop=crop, interpolation=interpolation)
        return cls(protocol, Normalization.from_preprocessing(prep))

    def __call__(self, image: Image.Image) -> torch.Tensor | tuple[torch.Tensor, ...]:
        p = self.protocol
        image = image.convert("RGB")
        if p.kind == "center":
            return self.normalize(
                center_crop(resize_shorter(image, p.resize, p.interpolation), p.crop)
            )
        if p.kind == "tencrop":
            resized = resize_shorter(image, p.resize, p.interpolation)
            return torch.stack([self.normalize(c) for c in ten_crops(resized, p.crop)])
        return tuple(self.normalize(resize_shorter(image, s, p.interpolation)) for s in p.scales)


def collate_views(
    batch: Sequence[tuple[torch.Tensor | tuple[torch.Tensor, ...], int]],
) -> tuple[torch.Tensor | list[tuple[torch.Tensor, ...]], torch.Tensor]:
    """Stack crop views; keep dense views as a list (their sizes differ from image to image)."""
    views = [item[0] for item in batch]
    targets = torch.tensor([int(item[1]) for item in batch], dtype=torch.long)
    if isinstance(views[0], torch.Tensor):
        return torch.stack(views), targets  # type: ignore[arg-type]
    return views, targets  # type: ignore[return-value]
