"""The evaluation preprocessing that a set of weights expects: resize, crop, interpolation, normalisation."""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

from resnext.errors import WeightsError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# The same statistics on the 0–255 scale, RGB order (mmpretrain, torchvision-converted detectron2).
IMAGENET_MEAN_255 = (123.675, 116.28, 103.53)
IMAGENET_STD_255 = (58.395, 57.12, 57.375)


def _is_number(v: object) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def channel_stats_problem(mean: Any, std: Any) -> str | None:
    """Why `mean` and `std` cannot normalise RGB input, or None when they can.

    Each must be 3 finite numbers, one per channel (the pipeline always feeds RGB), and every std
    positive: a zero would turn the scores into NaN or infinity.
    """
    for key, values in (("mean", mean), ("std", std)):
        try:
            items = None if isinstance(values, (str, bytes, Mapping)) else list(values)
        except TypeError:
            items = None
        if (
            items is None
            or len(items) != 3
            or not all(_is_number(v) and math.isfinite(v) for v in items)
        ):
            return f"{key}: expected 3 finite numbers (one per RGB channel), got {values!r}"
    if any(v <= 0 for v in std):
        return f"std: expected 3 values > 0, got {list(std)!r}"
    return None


@dataclass(frozen=True)
class Preprocessing:
    """Resize the short side to `resize`, centre-crop `crop`, scale to `value_range`, normalise.

    `channel_order` is the order the network expects ("RGB" or "BGR"); `mean` and `std` are given in
    that order and on the `value_range` scale (1.0 for [0, 1] inputs, 255.0 for [0, 255] inputs).
    """

    resize: int
    crop: int
    interpolation: str = "bilinear"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    channel_order: str = "RGB"
    value_range: float = 1.0

    def __post_init__(self) -> None:
        if self.channel_order not in ("RGB", "BGR"):
            raise WeightsError(
                f"channel_order: expected 'RGB' or 'BGR', got {self.channel_order!r}"
            )
        if self.value_range not in (1.0, 255.0):
            raise WeightsError(f"value_range: expected 1.0 or 255.0, got {self.value_range!r}")
        if self.interpolation not in ("bilinear", "bicubic", "nearest"):
            raise WeightsError(
                f"interpolation: expected bilinear, bicubic or nearest, got {self.interpolation!r}"
            )
        if self.crop < 1 or self.resize < self.crop:
            raise WeightsError(
                f"resize {self.resize} / crop {self.crop}: expected 1 <= crop <= resize"
            )
        problem = channel_stats_problem(self.mean, self.std)
        if problem is not None:
            raise WeightsError(f"preprocessing {problem}")

    def transforms(self, crop: int | None = None) -> Callable[[Any], Any]:
        """PIL image → the normalised (3, S, S) tensor these weights were evaluated on
        (torchvision's `weights.transforms()`): the short side resized, the centre cropped to
        `crop` (default: this crop; another keeps the resize-to-crop ratio), scaled, normalised,
        in the channel order the network expects."""
        from resnext.evaluate.views import ViewTransform  # evaluation builds on the weights

        if crop is not None and (not isinstance(crop, int) or isinstance(crop, bool) or crop < 1):
            raise WeightsError(f"crop: expected an int >= 1, got {crop!r}")
        return ViewTransform.center_of("center", self, crop)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        out = asdict(self)
        out["mean"], out["std"] = list(self.mean), list(self.std)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Preprocessing:
        """Rebuild from `to_dict` output; unknown or missing fields are a WeightsError."""
        fields = set(cls.__dataclass_fields__)
        if (
            not isinstance(data, Mapping)
            or set(data) - fields
            or not {"resize", "crop"} <= set(data)
        ):
            raise WeightsError(
                f"preprocessing: expected a mapping with resize, crop and optional "
                f"{', '.join(sorted(fields - {'resize', 'crop'}))}; got {data!r}"
            )
        values = dict(data)
        for key in ("resize", "crop"):
            if not isinstance(values[key], int) or isinstance(values[key], bool):
                raise WeightsError(
                    f"preprocessing: {key}: expected an integer, got {values[key]!r}"
                )
        for key in ("mean", "std"):
            # Anything but a list of numbers is left for __post_init__ to refuse by name.
            raw = values.get(key)
            if isinstance(raw, (list, tuple)) and all(_is_number(v) for v in raw):
                values[key] = tuple(float(v) for v in raw)
        for key in ("interpolation", "channel_order"):
            if key in values and not isinstance(values[key], str):
                raise WeightsError(f"preprocessing: {key}: expected a string, got {values[key]!r}")
        if "value_range" in values and not isinstance(values["value_range"], (int, float)):
            raise WeightsError(
                f"preprocessing: value_range: expected 1.0 or 255.0, got {values['value_range']!r}"
            )
        return cls(**values)


def imagenet(resize: int = 256, crop: int = 224, interpolation: str = "bilinear") -> Preprocessing:
    """RGB in [0, 1] normalised with the ImageNet statistics (torchvision, timm, pycls, Lua)."""
    return Preprocessing(resize=resize, crop=crop, interpolation=interpolation)


def timm_crop_pct(size: int, crop_pct: float, interpolation: str) -> Preprocessing:
    """timm's eval pipeline: resize to floor(size / crop_pct), then centre-crop `size`."""
    return Preprocessing(resize=int(size / crop_pct), crop=size, interpolation=interpolation)


MMPRETRAIN = Preprocessing(
    resize=256, crop=224, mean=IMAGENET_MEAN_255, std=IMAGENET_STD_255, value_range=255.0
)
# detectron2's Caffe2-trained FAIR ResNeXt: BGR, 0–255, mean/std in BGR order (X-101 configs).
DETECTRON2_CAFFE2 = Preprocessing(
    resize=256,
    crop=224,
    mean=(103.53, 116.28, 123.675),
    std=(57.375, 57.12, 58.395),
    channel_order="BGR",
    value_range=255.0,
)
# A torchvision model converted by convert-torchvision-to-d2.py: RGB, 0–255 (its docstring).
DETECTRON2_FROM_TORCHVISION = Preprocessing(
    resize=256, crop=224, mean=IMAGENET_MEAN_255, std=IMAGENET_STD_255, value_range=255.0
)
