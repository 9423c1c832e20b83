"""Named test-time protocols: single centre crop, 320 crop, 10-crop and multi-scale dense testing."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any

from resnext.errors import ConfigError

KINDS = ("center", "tencrop", "dense")
# How views of one image combine: mean of softmax probabilities, or mean of raw logits (what
# fb.resnet.torch's -tenCrop does: it sums the network outputs; its `:exp()` is commented out).
AVERAGES = ("softmax", "logits")
INTERPOLATIONS = ("bilinear", "bicubic", "nearest")
# The He et al. (ResNet, CVPR 2016) multi-scale set of shorter sides, used by ResNeXt's ILSVRC entry.
DENSE_SCALES = (224, 256, 384, 480, 640)


@dataclass(frozen=True)
class Protocol:
    """How test images become scores: views to take (`kind`), their sizes and the resize settings.

    `resize` is the shorter side before cropping `crop` (center, tencrop); `scales` are the shorter
    sides of the whole-image passes of dense testing. Resizing always uses PIL (`backend`) with
    `interpolation`; both are written into every report because they move accuracy by tenths.
    """

    name: str
    kind: str
    resize: int = 256
    crop: int = 224
    scales: tuple[int, ...] = ()
    interpolation: str = "bilinear"
    flip: bool = False
    average: str = "softmax"
    backend: str = "PIL"

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError(f"protocol kind: expected one of {KINDS}, got {self.kind!r}")
        if self.interpolation not in INTERPOLATIONS:
            raise ConfigError(
                f"interpolation: expected one of {INTERPOLATIONS}, got {self.interpolation!r}"
            )
        if self.kind != "dense" and (self.flip or self.scales):
            # Reported but never applied: refused rather than recorded falsely.
            raise ConfigError(
                f"flip/scales: only dense testing uses them, not the {self.kind!r} protocol"
            )
        if self.kind == "dense":
            if not self.scales or any(int(s) < 1 for s in self.scales):
                raise ConfigError(f"dense scales: expected positive sizes, got {self.scales!r}")
        elif not (1 <= self.crop <= self.resize):
            raise ConfigError(
                f"resize {self.resize} / crop {self.crop}: expected 1 <= crop <= resize"
            )
        if self.average not in AVERAGES:
            raise ConfigError(f"average: expected one of {AVERAGES}, got {self.average!r}")
        if self.backend != "PIL":
            raise ConfigError(f"resize backend: only 'PIL' is implemented, got {self.backend!r}")

    @property
    def views_per_image(self) -> int:
        """How many forward passes one image costs."""
        if self.kind == "center":
            return 1
        if self.kind == "tencrop":
            return 10
        return len(self.scales) * (2 if self.flip else 1)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready description (the report's `protocol` entry)."""
        out = asdict(self)
        out["scales"] = list(self.scales)
        out["views_per_image"] = self.views_per_image
        if self.kind == "dense":
            out.pop("resize"), out.pop("crop")
        else:
            out.pop("scales")
        return out


PROTOCOLS: dict[str, Protocol] = {
    # The paper's ablation protocol: shorter side 256, one 224 centre crop.
    "center": Protocol("center", "center", resize=256, crop=224),
    # Table 5's 320×320 test following Identity Mappings [15]: shorter side 320, 320 crop.
    "center320": Protocol("center320", "center", resize=320, crop=320),
    # fb.resnet.torch -tenCrop: shorter side 256, centre + 4 corners and their mirrors.
    "tencrop": Protocol("tencrop", "tencrop", resize=256, crop=224),
    # He et al.: fully-convolutional on the whole image at five shorter sides, scores averaged.
    "dense": Protocol("dense", "dense", scales=DENSE_SCALES),
}


def get_protocol(
    name: str,
    *,
    resize: int | None = None,
    crop: int | None = None,
    interpolation: str | None = None,
    scales: tuple[int, ...] | None = None,
    flip: bool | None = None,
    average: str | None = None,
) -> Protocol:
    """A named protocol with the given settings replaced (None keeps the named default)."""
    if name not in PROTOCOLS:
        raise ConfigError(f"protocol: expected one of {sorted(PROTOCOLS)}, got {name!r}")
    changes: dict[str, Any] = {}
    for key, value in (
        ("resize", resize),
        ("crop", crop),
        ("interpolation", interpolation),
        ("flip", flip),
        ("average", average),
    ):
        if value is not None:
            changes[key] = value
    if scales is not None:
        changes["scales"] = tuple(int(s) for s in scales)
    return replace(PROTOCOLS[name], **changes) if changes else PROTOCOLS[name]
