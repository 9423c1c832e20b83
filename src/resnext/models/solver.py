"""The template solver: the bottleneck width d that keeps a network's complexity at a reference's."""

from __future__ import annotations

from dataclasses import dataclass

from resnext.errors import SpecError
from resnext.models.complexity import count, param_count, template_params
from resnext.models.spec import CIFAR_DEPTHS, IMAGENET_DEPTHS, ModelSpec, cifar_spec, imagenet_spec

MEASURES = ("template", "params", "flops")


@dataclass(frozen=True)
class Solution:
    """The chosen width and how close its complexity is to the reference."""

    width: int
    cardinality: int
    value: int
    reference: int

    @property
    def group_conv_width(self) -> int:
        return self.width * self.cardinality

    @property
    def relative_error(self) -> float:
        return (self.value - self.reference) / self.reference


def solve_width(
    depth: int,
    cardinality: int,
    reference: ModelSpec | None = None,
    *,
    measure: str = "template",
    layout: str = "imagenet",
) -> Solution:
    """The integer bottleneck width d whose network best matches `reference` (default: the ResNet).

    `measure`: 'template' compares the conv2-stage block of Eqn. (4) (how Table 2 was made);
    'params' and 'flops' compare the whole networks, counted exactly.
    """
    if measure not in MEASURES:
        raise SpecError(f"measure: expected one of {', '.join(MEASURES)}, got {measure!r}")
    if not isinstance(cardinality, int) or cardinality < 1:
        raise SpecError(f"cardinality: expected an int >= 1, got {cardinality!r}")
    make = {"imagenet": imagenet_spec, "cifar": cifar_spec}.get(layout)
    if make is None:
        raise SpecError(f"layout: expected 'imagenet' or 'cifar', got {layout!r}")
    depths = IMAGENET_DEPTHS if layout == "imagenet" else CIFAR_DEPTHS
    if depth not in depths:
        raise SpecError(f"depth: expected one of {', '.join(map(str, depths))}, got {depth!r}")
    if reference is None:
        reference = make(depth, 1, 64)
    elif not isinstance(reference, ModelSpec):
        raise SpecError(
            f"reference: expected a ModelSpec (e.g. resnext.get_spec(name)) or None, "
            f"got {type(reference).__name__}"
        )
    elif (reference.stem == "cifar") != (layout == "cifar"):
        raise SpecError(
            f"reference: a {reference.stem!r}-stem network does not match layout {layout!r}"
        )
    # candidates keep everything of the reference but depth, C and d (its widths, stem, classes)
    template = reference.replace(depths=depths[depth], bottleneck_widths=None)

    def value_of(spec: ModelSpec) -> int:
        if measure == "template":
            width = spec.stage_bottleneck_widths[0] // spec.cardinality
            return template_params(spec.cardinality, width, spec.out_width)
        return param_count(spec) if measure == "params" else count(spec).macs

    target = value_of(reference)
    counted: dict[int, int] = {}  # by width: a whole-network count builds the network (on meta)

    def at(d: int) -> int:
        if d not in counted:
            counted[d] = value_of(template.replace(cardinality=cardinality, base_width=d))
        return counted[d]

    # Complexity grows monotonically with d: bisect for the crossing, then take the nearer side.
    lo, hi = 1, 1
    while at(hi) < target:
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if at(mid) < target:
            lo = mid
        else:
            hi = mid
    best = min((lo, hi), key=lambda d: abs(at(d) - target))
    return Solution(width=best, cardinality=cardinality, value=at(best), reference=target)
