"""TrivialAugment (Müller & Hutter, ICCV 2021): one random operation at a random strength per image.

The "wide" search space of the paper: each image gets exactly one of 14 operations, with a
magnitude bin drawn uniformly from 0..30 and, for signed operations, a random sign. No parameters
to tune, which is why it suits small datasets such as cifar10-mini.

Each bin's magnitude is that of torchvision's `TrivialAugmentWide` (31 bins), which our users
know, rather than that of the authors' code (automl/trivialaugment), which differs by a bin's
rounding: posterize keeps 8 - round(bin / 5) bits (8 bits in bins 0-2, 2 in bins 28-30, 3 bins
each; the authors' 8 - int(bin * 6 / 30) keeps 2 bits in bin 30 alone) and solarize inverts the
pixels at or above 255 - 8.5 * bin (bin 0 inverts pure white; the authors' threshold is
256 - int(bin * 256 / 30)). Areas a geometric operation uncovers are mid-grey, not torchvision's
black.
"""

from __future__ import annotations

from collections.abc import Callable

from PIL import Image, ImageEnhance, ImageOps

from resnext.data.rng import RandomSource, randint, uniform

NUM_BINS = 31  # magnitudes 0..30, as in the paper's wide space


def _fill(img: Image.Image) -> tuple[int, ...] | int:
    # Areas uncovered by a geometric operation become mid-grey, the image mean's usual stand-in.
    return (128,) * len(img.getbands()) if len(img.getbands()) > 1 else 128


def _affine(img: Image.Image, coeffs: tuple[float, ...]) -> Image.Image:
    return img.transform(img.size, Image.Transform.AFFINE, coeffs, fillcolor=_fill(img))


def _shear_x(img: Image.Image, m: float) -> Image.Image:
    return _affine(img, (1.0, m, 0.0, 0.0, 1.0, 0.0))


def _shear_y(img: Image.Image, m: float) -> Image.Image:
    return _affine(img, (1.0, 0.0, 0.0, m, 1.0, 0.0))


def _translate_x(img: Image.Image, m: float) -> Image.Image:
    return _affine(img, (1.0, 0.0, m, 0.0, 1.0, 0.0))


def _translate_y(img: Image.Image, m: float) -> Image.Image:
    return _affine(img, (1.0, 0.0, 0.0, 0.0, 1.0, m))


def _rotate(img: Image.Image, m: float) -> Image.Image:
    return img.rotate(m, fillcolor=_fill(img))


def _enhance(kind: type) -> Callable[[Image.Image, float], Image.Image]:
    def apply(img: Image.Image, m: float) -> Image.Image:
        return kind(img).enhance(1.0 + m)

    return apply


def _posterize(img: Image.Image, m: float) -> Image.Image:
    # the bits rounded, as torchvision rounds its bins' (truncating kept 8 bits in bin 0 alone)
    return ImageOps.posterize(img, round(m))


def _solarize(img: Image.Image, m: float) -> Image.Image:
    # pixels >= m are inverted, m a fraction in odd bins (PIL compares each value with it)
    return ImageOps.solarize(img, m)  # type: ignore[arg-type]


def _autocontrast(img: Image.Image, m: float) -> Image.Image:
    return ImageOps.autocontrast(img)


def _equalize(img: Image.Image, m: float) -> Image.Image:
    return ImageOps.equalize(img)


def _identity(img: Image.Image, m: float) -> Image.Image:
    return img


# name -> (operation, magnitude at bin 0, magnitude at the last bin, signed)
WIDE_SPACE: dict[str, tuple[Callable[[Image.Image, float], Image.Image], float, float, bool]] = {
    "identity": (_identity, 0.0, 0.0, False),
    "shear_x": (_shear_x, 0.0, 0.99, True),
    "shear_y": (_shear_y, 0.0, 0.99, True),
    "translate_x": (_translate_x, 0.0, 32.0, True),
    "translate_y": (_translate_y, 0.0, 32.0, True),
    "rotate": (_rotate, 0.0, 135.0, True),
    "brightness": (_enhance(ImageEnhance.Brightness), 0.0, 0.99, True),
    "color": (_enhance(ImageEnhance.Color), 0.0, 0.99, True),
    "contrast": (_enhance(ImageEnhance.Contrast), 0.0, 0.99, True),
    "sharpness": (_enhance(ImageEnhance.Sharpness), 0.0, 0.99, True),
    "posterize": (_posterize, 8.0, 2.0, False),
    "solarize": (_solarize, 255.0, 0.0, False),
    "autocontrast": (_autocontrast, 0.0, 0.0, False),
    "equalize": (_equalize, 0.0, 0.0, False),
}


def magnitude(name: str, level: int) -> float:
    """Operation `name`'s magnitude in bin `level` (0..NUM_BINS-1), before any sign: evenly
    spaced from its first bin's to its last's."""
    _, low, high, _ = WIDE_SPACE[name]
    return low + (high - low) * level / (NUM_BINS - 1)


class TrivialAugment:
    """Apply one operation of the wide space, chosen uniformly, at a uniformly chosen magnitude.

    Works on 8-bit PIL images (RGB or L) before conversion to a tensor.
    """

    def __init__(self, generator: RandomSource = None) -> None:
        self.generator = generator
        self.names = list(WIDE_SPACE)

    def __call__(self, img: Image.Image) -> Image.Image:
        if not isinstance(img, Image.Image) or img.mode not in ("RGB", "L"):
            raise TypeError(
                f"TrivialAugment expects an RGB or L PIL image, got {type(img).__name__}"
                + (f" in mode {img.mode}" if isinstance(img, Image.Image) else "")
            )
        name = self.names[randint(self.generator, 0, len(self.names) - 1)]
        op, _, _, signed = WIDE_SPACE[name]
        m = magnitude(name, randint(self.generator, 0, NUM_BINS - 1))
        if signed and uniform(self.generator, 0.0, 1.0) < 0.5:
            m = -m
        return op(img, m)

    def __repr__(self) -> str:
        return f"TrivialAugment(wide, {len(self.names)} ops, {NUM_BINS} bins)"
