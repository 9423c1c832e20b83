"""Composable image transforms (PIL image -> float CHW tensor) with explicit random sources."""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence
from typing import Any

import torch

from resnext.data import functional as TF
from resnext.data.rng import RandomSource, normal, permutation, randint, uniform
from resnext.errors import ConfigError

# AlexNet-style PCA of ImageNet RGB pixels, as used by fb.resnet.torch (datasets/imagenet.lua).
IMAGENET_EIGVAL = (0.2175, 0.0188, 0.0045)
IMAGENET_EIGVEC = (
    (-0.5675, 0.7192, 0.4009),
    (-0.5808, -0.0045, -0.8140),
    (-0.5836, -0.6948, 0.4203),
)


def _is_int(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _pair(size: int | tuple[int, int], what: str = "size") -> tuple[int, int]:
    """(w, h) of an int or pair of sizes; a ConfigError naming `what` unless each is >= 1 (a
    size of 0 gave an empty image silently, a negative one PIL's error at the first image)."""
    pair = (size, size) if _is_int(size) else size
    if (
        not isinstance(pair, (tuple, list))
        or len(pair) != 2
        or not all(_is_int(s) and s >= 1 for s in pair)
    ):
        raise ConfigError(
            f"{what}: expected an int >= 1 or a (width, height) pair of them, got {size!r}"
        )
    return int(pair[0]), int(pair[1])


class Compose:
    """Apply transforms in order; asks the first one how small a JPEG may be decoded."""

    def __init__(self, transforms: Sequence[Callable[[Any], Any]]) -> None:
        self.transforms = list(transforms)

    def __call__(self, img: Any) -> Any:
        for t in self.transforms:
            img = t(img)
        return img

    def draft_size(self, width: int, height: int) -> tuple[int, int] | None:
        """The smallest (w, h) the source may be decoded at without losing output resolution."""
        if not self.transforms:
            return None
        first = getattr(self.transforms[0], "draft_size", None)
        return first(width, height) if first else None

    def __repr__(self) -> str:
        return "Compose(" + ", ".join(repr(t) for t in self.transforms) + ")"


class Resize:
    """Scale so that the shorter side equals `size` (aspect kept)."""

    def __init__(self, size: int, interpolation: str = "bilinear", antialias: bool = True) -> None:
        if not _is_int(size) or size < 1:
            raise ConfigError(f"Resize size: expected an int >= 1 (the shorter side), got {size!r}")
        TF.pil_interpolation(interpolation)
        self.size, self.interpolation, self.antialias = size, interpolation, antialias

    def __call__(self, img: TF.Img) -> TF.Img:
        w, h = TF.image_size(img)
        return TF.resize(
            img, TF.shorter_side_size(w, h, self.size), self.interpolation, self.antialias
        )

    def draft_size(self, width: int, height: int) -> tuple[int, int] | None:
        # Both sides at least `size` keeps the shorter side >= size after JPEG draft scaling.
        return (self.size, self.size) if min(width, height) > 2 * self.size else None

    def __repr__(self) -> str:
        return f"Resize({self.size}, {self.interpolation}, antialias={self.antialias})"


class CenterCrop:
    """The centred crop of (w, h) pixels."""

    def __init__(self, size: int | tuple[int, int]) -> None:
        self.size = _pair(size, "CenterCrop size")

    def __call__(self, img: TF.Img) -> TF.Img:
        return TF.center_crop(img, self.size)

    def __repr__(self) -> str:
        return f"CenterCrop({self.size})"


class RandomResizedCrop:
    """Inception-style crop: random area fraction and aspect, resized to `size`.

    Up to `tries` draws of (area in `scale`, aspect in `ratio`, log-uniform or fb.resnet.torch's
    uniform + random swap); when none fits, the centred square of the shorter side is used.
    """

    def __init__(
        self,
        size: int | tuple[int, int],
        scale: tuple[float, float] = (0.08, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        interpolation: str = "bicubic",
        tries: int = 10,
        aspect_sampling: str = "log-uniform",
        generator: RandomSource = None,
    ) -> None:
        if not (0 < scale[0] <= scale[1] <= 1) or not (0 < ratio[0] <= ratio[1]):
            raise ConfigError(f"RandomResizedCrop: bad scale {scale} or ratio {ratio}")
        if aspect_sampling not in ("log-uniform", "uniform-swap"):
            raise ConfigError(
                f"aspect_sampling {aspect_sampling!r} is not 'log-uniform' or 'uniform-swap'"
            )
        TF.pil_interpolation(interpolation)
        self.size, self.scale, self.ratio = _pair(size, "RandomResizedCrop size"), scale, ratio
        self.interpolation, self.tries = interpolation, tries
        self.aspect_sampling, self.generator = aspect_sampling, generator

    def _aspect(self) -> tuple[float, bool]:
        lo, hi = self.ratio
        if self.aspect_sampling == "log-uniform":
            return math.exp(uniform(self.generator, math.log(lo), math.log(hi))), False
        aspect = uniform(self.generator, lo, hi)
        # fb.resnet.torch swaps the sides of its 3/4–4/3 crops; a range not closed under
        # r -> 1/r would leave its bounds that way, so its crops keep their drawn ratio
        if not math.isclose(lo * hi, 1.0):
            return aspect, False
        return aspect, uniform(self.generator, 0.0, 1.0) < 0.5

    def get_params(self, width: int, height: int) -> tuple[int, int, int, int]:
        """(left, top, w, h) of the crop for an image of this size."""
        area = width * height
        for _ in range(self.tries):
            target = uniform(self.generator, *self.scale) * area
            aspect, swap = self._aspect()
            w = round(math.sqrt(target * aspect))
            h = round(math.sqrt(target / aspect))
            if swap:
                w, h = h, w
            if 0 < w <= width and 0 < h <= height:
                return (
                    randint(self.generator, 0, width - w),
                    randint(self.generator, 0, height - h),
                    w,
                    h,
                )
        side = min(width, height)
        left, top = TF.center_crop_box(width, height, side, side)
        return left, top, side, side

    def __call__(self, img: TF.Img) -> TF.Img:
        left, top, w, h = self.get_params(*TF.image_size(img))
        return TF.resize(TF.crop(img, left, top, w, h), self.size, self.interpolation)

    def draft_size(self, width: int, height: int) -> tuple[int, int] | None:
        # A crop of area a and aspect r (w/h, or h/w when swapped) has sides sqrt(a*r) and
        # sqrt(a/r): over the ratio range the smallest side is sqrt(min_area * min(r0, 1/r1)),
        # which must stay >= size (1/r1 alone holds only for a range symmetric about 1).
        smallest = math.sqrt(self.scale[0] * width * height * min(self.ratio[0], 1 / self.ratio[1]))
        factor = max(self.size) / smallest
        if factor >= 0.5:
            return None
        return math.ceil(width * factor), math.ceil(height * factor)

    def __repr__(self) -> str:
        return (
            f"RandomResizedCrop({self.size}, scale={self.scale}, ratio={self.ratio}, "
            f"{self.interpolation}, {self.aspect_sampling})"
        )


class RandomHorizontalFlip:
    """Mirror with probability p."""

    def __init__(self, p: float = 0.5, generator: RandomSource = None) -> None:
        self.p, self.generator = p, generator

    def __call__(self, img: TF.Img) -> TF.Img:
        return TF.hflip(img) if uniform(self.generator, 0.0, 1.0) < self.p else img

    def __repr__(self) -> str:
        return f"RandomHorizontalFlip(p={self.p})"


class RandomCrop:
    """Pad every side by `padding` zeros (of the current value space), then crop `size` at random."""

    def __init__(
        self, size: int | tuple[int, int], padding: int = 4, generator: RandomSource = None
    ) -> None:
        if not _is_int(padding) or padding < 0:
            raise ConfigError(f"RandomCrop padding: expected an int >= 0, got {padding!r}")
        self.size, self.padding = _pair(size, "RandomCrop size"), int(padding)
        self.generator = generator

    def __call__(self, img: TF.Img) -> TF.Img:
        w, h = TF.image_size(img)
        p = self.padding
        left = randint(self.generator, -p, w + p - self.size[0])
        top = randint(self.generator, -p, h + p - self.size[1])
        return TF.crop(img, left, top, self.size[0], self.size[1])

    def __repr__(self) -> str:
        return f"RandomCrop({self.size}, padding={self.padding})"


class Cutout:
    """Zero one `size`×`size` square at a random centre (DeVries & Taylor 2017); it may overhang.

    Applied after normalisation, zero is the dataset mean: the square carries no information.
    """

    def __init__(self, size: int, generator: RandomSource = None) -> None:
        if size < 1:
            raise ValueError(f"Cutout size: expected an int >= 1, got {size!r}")
        self.size, self.generator = size, generator

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        h, w = img.shape[-2:]
        cy, cx = randint(self.generator, 0, h - 1), randint(self.generator, 0, w - 1)
        half = self.size // 2
        top, left = max(cy - half, 0), max(cx - half, 0)
        out = img.clone()
        out[..., top : cy - half + self.size, left : cx - half + self.size] = 0
        return out

    def __repr__(self) -> str:
        return f"Cutout({self.size})"


class ToTensor:
    """PIL RGB image to a float32 CHW tensor in [0, 1]."""

    def __call__(self, img: TF.Img) -> torch.Tensor:
        return TF.to_tensor(img)

    def __repr__(self) -> str:
        return "ToTensor()"


class Normalize:
    """(x - mean) / std per channel."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        self.mean, self.std = tuple(mean), tuple(std)

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        return TF.normalize(TF.to_tensor(img), self.mean, self.std)

    def __repr__(self) -> str:
        return f"Normalize(mean={self.mean}, std={self.std})"


class ColorJitter:
    """fb.resnet.torch colour jitter: brightness, contrast, saturation blends in random order.

    Each strength s blends with a weight 1 + U(-s, s) on the image: in [0, 1), as
    `BatchPipeline`'s `jitter`, since from 1 on the weight can reach 0 (a black or flat image)
    or go below it (an inverted one)."""

    def __init__(
        self,
        brightness: float = 0.4,
        contrast: float = 0.4,
        saturation: float = 0.4,
        generator: RandomSource = None,
    ) -> None:
        for name, strength in (
            ("brightness", brightness),
            ("contrast", contrast),
            ("saturation", saturation),
        ):
            if not 0.0 <= strength < 1.0:
                raise ConfigError(
                    f"ColorJitter {name}: expected a strength in [0, 1), got {strength!r}"
                )
        self.brightness, self.contrast, self.saturation = brightness, contrast, saturation
        self.generator = generator

    def _alpha(self, var: float) -> float:
        return 1.0 + uniform(self.generator, -var, var)

    def __call__(self, img: TF.Img) -> torch.Tensor:
        x = TF.to_tensor(img)
        ops = []
        if self.brightness:
            ops.append(lambda t: TF.blend(t, torch.zeros_like(t), self._alpha(self.brightness)))
        if self.contrast:
            ops.append(
                lambda t: TF.blend(
                    t, TF.grayscale(t).mean().expand_as(t), self._alpha(self.contrast)
                )
            )
        if self.saturation:
            ops.append(
                lambda t: TF.blend(t, TF.grayscale(t).expand_as(t), self._alpha(self.saturation))
            )
        for i in permutation(self.generator, len(ops)):
            x = ops[i](x)
        return x

    def __repr__(self) -> str:
        return f"ColorJitter({self.brightness}, {self.contrast}, {self.saturation})"


class Lighting:
    """AlexNet PCA lighting noise: adds eigvec @ (alpha * eigval), alpha ~ N(0, alphastd^2)."""

    def __init__(
        self,
        alphastd: float = 0.1,
        eigval: Sequence[float] = IMAGENET_EIGVAL,
        eigvec: Sequence[Sequence[float]] = IMAGENET_EIGVEC,
        generator: RandomSource = None,
    ) -> None:
        self.alphastd = alphastd
        self.eigval = torch.tensor(eigval, dtype=torch.float32)
        self.eigvec = torch.tensor(eigvec, dtype=torch.float32)
        self.generator = generator

    def __call__(self, img: TF.Img) -> torch.Tensor:
        x = TF.to_tensor(img)
        if self.alphastd == 0:
            return x
        alpha = normal(self.generator, self.alphastd, 3)
        rgb = self.eigvec @ (alpha * self.eigval)
        return x + rgb.view(3, 1, 1)

    def __repr__(self) -> str:
        return f"Lighting({self.alphastd})"


class TenCrop:
    """Centre + four corner crops of the image and of its mirror: a (10, C, h, w) tensor."""

    def __init__(self, size: int | tuple[int, int]) -> None:
        self.size = _pair(size, "TenCrop size")

    def __call__(self, img: TF.Img) -> torch.Tensor:
        x = TF.to_tensor(img)
        cw, ch = self.size
        w, h = TF.image_size(x)
        crops = []
        for view in (x, TF.hflip(x)):
            crops.append(TF.center_crop(view, self.size))
            for left, top in ((0, 0), (w - cw, 0), (0, h - ch), (w - cw, h - ch)):
                crops.append(TF.crop(view, left, top, cw, ch))
        return torch.stack(crops)

    def __repr__(self) -> str:
        return f"TenCrop({self.size})"
