"""Crops planned from the image header: decode at the DCT scale the crop allows, then crop, resize and flip
in one Pillow pass, with 8-bit HWC output (normalisation and colour augmentation follow on the batch).

The geometry is exactly the standard pipeline's: the same random draws, in the same order, give the
same crop box and flip as `RandomResizedCrop` + `RandomHorizontalFlip` (or `Resize` + `CenterCrop`);
only the resampling is done once, from the JPEG's reduced-scale decode when that still has at least
the output's resolution inside the crop.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from resnext.data import functional as TF
from resnext.data.images import check_pixel_limit, load_rgb
from resnext.data.rng import RandomSource, uniform
from resnext.data.transforms import RandomResizedCrop, _pair
from resnext.errors import ConfigError, DataError

Box = tuple[float, float, float, float]


@dataclass(frozen=True)
class CropPlan:
    """Where to cut (left, top, right, bottom in full-resolution pixels), whether to mirror, and the
    smallest decoded (w, h) that keeps the crop at or above the output resolution (None: full size)."""

    box: Box
    flip: bool
    draft: tuple[int, int] | None


def _draft_for(box: Box, full: tuple[int, int], out: tuple[int, int]) -> tuple[int, int] | None:
    """The decode size asked of Pillow: the image scaled so the crop is still >= the output size."""
    crop_w, crop_h = box[2] - box[0], box[3] - box[1]
    factor = max(out[0] / crop_w, out[1] / crop_h)
    if factor > 0.5:  # JPEG's DCT scaling halves at least; nothing to gain
        return None
    return math.ceil(full[0] * factor), math.ceil(full[1] * factor)


def _to_hwc_uint8(img: Image.Image) -> torch.Tensor:
    if img.mode != "RGB":
        img = img.convert("RGB")
    return torch.from_numpy(np.array(img, dtype=np.uint8, copy=True))


class PlannedTransform:
    """Shared apply step: map the plan's box into the decoded image, resample once, flip, to uint8."""

    size: tuple[int, int]
    interpolation: str

    def plan(self, width: int, height: int) -> CropPlan:
        raise NotImplementedError

    def apply(self, img: Image.Image, plan: CropPlan, full_size: tuple[int, int]) -> torch.Tensor:
        """The (H, W, 3) uint8 crop of `img`, a decode of an image of `full_size` (maybe reduced)."""
        sx, sy = img.size[0] / full_size[0], img.size[1] / full_size[1]
        left, top, right, bottom = plan.box
        box = (left * sx, top * sy, right * sx, bottom * sy)
        out = img.resize(self.size, TF.pil_interpolation(self.interpolation), box=box)
        if plan.flip:
            out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return _to_hwc_uint8(out)

    def __call__(self, img: Image.Image) -> torch.Tensor:
        """Plan and apply on an already decoded image (no reduced decode)."""
        if not isinstance(img, Image.Image):
            raise TypeError(
                f"{type(self).__name__}: expected a PIL image, got {type(img).__name__}"
            )
        return self.apply(img, self.plan(*img.size), img.size)


class PlannedRandomResizedCrop(PlannedTransform):
    """fb.resnet.torch's random-sized crop (area 8–100 %, aspect 3/4–4/3) and flip, planned before decode."""

    def __init__(
        self,
        size: int | tuple[int, int],
        scale: tuple[float, float] = (0.08, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        interpolation: str = "bicubic",
        flip: float = 0.5,
        aspect_sampling: str = "uniform-swap",
        generator: RandomSource = None,
    ) -> None:
        if not 0.0 <= flip <= 1.0:
            raise ConfigError(f"flip: expected a probability in [0, 1], got {flip!r}")
        # The standard transform draws the boxes, so both pipelines share one sampling rule
        # (imagenet_train's: fb.resnet.torch's aspect ratios).
        self.sampler = RandomResizedCrop(
            size,
            scale,
            ratio,
            interpolation,
            aspect_sampling=aspect_sampling,
            generator=generator,
        )
        self.size, self.interpolation = _pair(size, "PlannedRandomResizedCrop size"), interpolation
        self.flip, self.generator = flip, generator

    @property
    def generator(self) -> RandomSource:
        return self._generator

    @generator.setter
    def generator(self, value: RandomSource) -> None:
        # Worker seeding replaces `generator`; the box sampler must follow it.
        self._generator = value
        if hasattr(self, "sampler"):
            self.sampler.generator = value

    def plan(self, width: int, height: int) -> CropPlan:
        left, top, w, h = self.sampler.get_params(width, height)
        flip = self.flip > 0 and uniform(self.generator, 0.0, 1.0) < self.flip
        box = (float(left), float(top), float(left + w), float(top + h))
        return CropPlan(box, flip, _draft_for(box, (width, height), self.size))

    def __repr__(self) -> str:
        s = self.sampler
        return (
            f"PlannedRandomResizedCrop({self.size}, scale={s.scale}, ratio={s.ratio}, "
            f"{self.interpolation}, flip={self.flip})"
        )


class PlannedCenterCrop(PlannedTransform):
    """Resize the shorter side to `resize`, centre-crop `size`: one resampling of the matching box."""

    def __init__(self, size: int, resize: int, interpolation: str = "bicubic") -> None:
        _pair(size, "PlannedCenterCrop size")
        if resize < size:
            raise ConfigError(f"resize: expected >= the crop size {size}, got {resize}")
        TF.pil_interpolation(interpolation)
        self.size, self.resize, self.interpolation = (size, size), resize, interpolation

    def plan(self, width: int, height: int) -> CropPlan:
        rw, rh = TF.shorter_side_size(width, height, self.resize)
        sx, sy = width / rw, height / rh
        left, top = TF.center_crop_box(rw, rh, self.size[0], self.size[1])
        box = (left * sx, top * sy, (left + self.size[0]) * sx, (top + self.size[1]) * sy)
        return CropPlan(box, False, _draft_for(box, (width, height), self.size))

    def __repr__(self) -> str:
        return f"PlannedCenterCrop({self.size[0]}, resize={self.resize}, {self.interpolation})"


JPEG_DECODERS = ("auto", "pillow", "simplejpeg", "crop")
# Pixels beyond the crop box that resampling may read: the widest Pillow filter (Lanczos) reaches
# 3 input pixels per output pixel's scale, plus 2 for the crop decoder's uncertain last column.
_FILTER_REACH, _EDGE = 3.0, 2


def _region(box: Box, size: tuple[int, int], out: tuple[int, int]) -> tuple[int, int, int, int]:
    """Pixels (x0, y0, x1, y1) of an image of `size` that resampling `box` to `out` can read."""
    left, top, right, bottom = box
    reach = _FILTER_REACH * max(1.0, (right - left) / out[0], (bottom - top) / out[1])
    margin = math.ceil(reach) + _EDGE
    return (
        max(0, math.floor(left) - margin),
        max(0, math.floor(top) - margin),
        min(size[0], math.ceil(right) + margin),
        min(size[1], math.ceil(bottom) + margin),
    )


@dataclass(frozen=True)
class CropDecodeJob:
    """What the crop decoder does for one plan: the DCT scale 1/denom, the image's full and
    decoded sizes, the crop box in decoded coordinates and the pixel region (x0, y0, x1, y1) of
    the decoded image that resampling reads."""

    denom: int
    full: tuple[int, int]
    scaled: tuple[int, int]
    box: Box
    region: tuple[int, int, int, int]


def crop_decode_job(
    plan: CropPlan, full: tuple[int, int], out: tuple[int, int], use_draft: bool = True
) -> CropDecodeJob:
    """The decode scale, box and region for `plan` on a JPEG of size `full` resampled to `out`."""
    width, height = full
    denom = 1
    if use_draft and plan.draft is not None:
        # Pillow's draft rule (the largest power of 2 up to 8 that divides both sides at least
        # that many times), so that this path decodes at the same scale as the Pillow path.
        most = min(width // plan.draft[0], height // plan.draft[1])
        denom = next((d for d in (8, 4, 2) if most >= d), 1)
    scaled = (-(-width // denom), -(-height // denom))
    sx, sy = scaled[0] / width, scaled[1] / height
    left, top, right, bottom = plan.box
    box = (left * sx, top * sy, right * sx, bottom * sy)
    return CropDecodeJob(denom, full, scaled, box, _region(box, scaled, out))


def _load_with_crop_decoder(
    path: Path, transform: PlannedTransform, use_draft: bool, max_pixels: int | None
) -> torch.Tensor | None:
    """libjpeg decoding only the plan's region (`jpeg_crop`); None when the file is not a JPEG it
    takes. The region's pixels equal a full decode's (at the same DCT scale); the box is then
    resampled by `resample` (Pillow's arithmetic, ~6x faster on these crops; where the two passes
    run in another order than Pillow 13 picks, pixels differ by rounding) or, without it, by
    Pillow (then the result is bit-identical to the Pillow path)."""
    from resnext.data import jpeg_crop, resample

    data = _read_jpeg(path)
    size = None if data is None else crop_decodable_size(data)
    if size is None:
        return None
    width, height = size
    check_pixel_limit(path, width, height, max_pixels)
    plan = transform.plan(width, height)
    job = crop_decode_job(plan, (width, height), transform.size, use_draft)
    scaled, box = job.scaled, job.box
    # The region is decoded in place inside a whole-image buffer, so that resampling sees the
    # same coordinates as after a full decode (shifted coordinates round differently, by up to
    # a few levels); the pixels outside the region are never read by the resampling filter.
    canvas = np.empty((scaled[1], scaled[0], 3), dtype=np.uint8)
    try:
        decode_job(data, job, canvas)
    except jpeg_crop.CropDecodeFailed:
        # libjpeg stops at any warning; Pillow decides (the plan is kept: no second random draw).
        def keep_plan(_w: int, _h: int) -> tuple[int, int] | None:
            return plan.draft if use_draft else None

        img = load_rgb(path, draft=keep_plan, max_pixels=max_pixels)
        return transform.apply(img, plan, (width, height))
    if transform.interpolation in resample.FILTERS and resample.unavailable_reason() is None:
        # Pillow's arithmetic without its copy into an RGBX image and ~6x faster; the pass order
        # can differ from Pillow 13's choice, which changes some pixels by rounding.
        pixels = resample.resize_box(
            canvas, box, transform.size, transform.interpolation, plan.flip
        )
        return torch.from_numpy(pixels)
    return transform.apply(Image.fromarray(canvas), plan, (width, height))


def crop_decodable_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) of the JPEG `data` if the crop decoder takes it, else None (Pillow's file)."""
    from resnext.data import jpeg_crop

    if not data.rstrip(b"\x00").endswith(b"\xff\xd9"):
        # No end-of-image marker: truncated (or trailing data). A crop that stops early would not
        # notice what Pillow refuses, so Pillow decides, as for every other file.
        return None
    try:
        width, height, colorspace = jpeg_crop.read_header(data)
    except jpeg_crop.CropDecodeFailed:
        return None  # Pillow names the problem
    if colorspace in (jpeg_crop.CMYK, jpeg_crop.YCCK):
        return None  # Pillow converts those
    return width, height


def decode_job(data: bytes, job: CropDecodeJob, canvas: np.ndarray) -> None:
    """Decode the job's region of the JPEG `data` into `canvas` (the whole scaled image's buffer,
    other pixels left as they are). A file with row-aligned restart markers (`jpeg_restart`) is
    first cut to the region's segments, so only those are entropy-decoded; same pixels either
    way. Raises `jpeg_crop.CropDecodeFailed` when libjpeg refuses the data."""
    from resnext.data import jpeg_crop, jpeg_restart

    d = job.denom
    x0, y0, x1, y1 = job.region
    source, left, top = data, 0, 0
    if jpeg_restart.unavailable_reason() is None:
        full = (x0 * d, y0 * d, min(x1 * d, job.full[0]), min(y1 * d, job.full[1]))
        # Chroma upsampling differs within a sample or two of a cut's edge: 2 samples at 1/d.
        piece = jpeg_restart.cut(data, full, margin=4 * d)
        if piece is not None:
            source, left, top = piece.data, piece.left // d, piece.top // d
    jpeg_crop.decode_region(
        source, d, x0 - left, y0 - top, x1 - x0, y1 - y0, out=canvas, at=(x0, y0)
    )


def _read_jpeg(path: Path) -> bytes | None:
    """The file's bytes if it starts with JPEG's start-of-image marker, else None (for Pillow)."""
    with path.open("rb") as f:
        if f.peek(2)[:2] != b"\xff\xd8":  # peek: the bytes stay in the buffer for read()
            return None
        return f.read()


def _default_decoder() -> str:
    from resnext.data import jpeg_crop

    if jpeg_crop.unavailable_reason() is None:
        return "crop"
    return "simplejpeg" if _simplejpeg() is not None else "pillow"


def _simplejpeg():  # type: ignore[no-untyped-def]
    try:
        import simplejpeg
    except ImportError:
        return None
    return simplejpeg


def _load_with_simplejpeg(
    path: Path, transform: PlannedTransform, use_draft: bool, max_pixels: int | None
) -> torch.Tensor | None:
    """libjpeg-turbo through simplejpeg; None when the file is not a plain RGB/grey JPEG."""
    sj = _simplejpeg()
    if sj is None:
        return None
    data = _read_jpeg(path)
    if data is None:
        return None
    try:
        height, width, colorspace, _ = sj.decode_jpeg_header(data)
    except ValueError:
        return None  # Pillow names the problem
    if colorspace not in ("RGB", "YCbCr", "Gray"):
        return None  # CMYK/YCCK: Pillow converts those
    check_pixel_limit(path, width, height, max_pixels)
    plan = transform.plan(width, height)
    wanted = plan.draft if use_draft and plan.draft is not None else (0, 0)
    try:
        array = sj.decode_jpeg(data, "RGB", min_width=wanted[0], min_height=wanted[1])
    except ValueError as exc:
        raise DataError(f"{path}: corrupt or truncated image ({exc})") from None
    return transform.apply(Image.fromarray(array), plan, (width, height))


def load_planned(
    path: str | Path,
    transform: PlannedTransform,
    *,
    use_draft: bool = True,
    max_pixels: int | None = None,
    decoder: str = "auto",
) -> torch.Tensor:
    """Plan from the file's header, decode (a JPEG at the plan's reduced scale), apply: uint8 HWC.

    `decoder`: 'pillow', 'simplejpeg' (libjpeg-turbo's own API, ~1.1x Pillow's JPEG decode rate
    on the ImageNet sample; needs the optional `simplejpeg` package), 'crop' (our libjpeg decoder
    of the crop's region only, `resnext.data.jpeg_crop`; needs a C compiler and jpeglib.h) or
    'auto' (crop, else simplejpeg, else Pillow, by what this machine has). Files the chosen
    decoder does not take (PNG, CMYK JPEG, ...) go through Pillow. Unreadable files raise
    DataError, as `load_rgb`.
    """
    if decoder not in JPEG_DECODERS:
        raise ConfigError(f"decoder: expected one of {', '.join(JPEG_DECODERS)}, got {decoder!r}")
    if decoder == "simplejpeg" and _simplejpeg() is None:
        raise ConfigError(
            "decoder='simplejpeg' needs the simplejpeg package: pip install simplejpeg"
        )
    if decoder == "crop":
        from resnext.data import jpeg_crop

        reason = jpeg_crop.unavailable_reason()
        if reason is not None:
            raise ConfigError(f"decoder='crop' cannot run here: {reason}")
    if decoder == "auto":
        decoder = _default_decoder()
    if decoder != "pillow":
        load = _load_with_crop_decoder if decoder == "crop" else _load_with_simplejpeg
        try:
            out = load(Path(path), transform, use_draft, max_pixels)
        except FileNotFoundError:
            raise DataError(f"{path}: file not found") from None
        except OSError as exc:
            raise DataError(f"{path}: unreadable ({exc})") from None
        if out is not None:
            return out
    planned: list[tuple[CropPlan, tuple[int, int]]] = []

    def hook(width: int, height: int) -> tuple[int, int] | None:
        planned.append((transform.plan(width, height), (width, height)))
        return planned[-1][0].draft if use_draft else None

    img = load_rgb(path, draft=hook, max_pixels=max_pixels)
    if not planned:  # load_rgb asks only JPEGs for a draft size: plan on the decoded image
        return transform(img)
    plan, full_size = planned[0]
    return transform.apply(img, plan, full_size)
