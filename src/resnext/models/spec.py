"""The immutable description of one ResNeXt network: everything the builder needs, validated when made."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from resnext.errors import SpecError

STEMS = ("imagenet", "deep", "cifar")
BLOCK_FORMS = ("a", "b", "c")

# Block counts per stage of the paper's ImageNet depths (Table 1 and Sec. 5.1) and the CIFAR ResNeXt-29.
IMAGENET_DEPTHS: dict[int, tuple[int, ...]] = {
    26: (2, 2, 2, 2),
    38: (3, 3, 3, 3),
    50: (3, 4, 6, 3),
    101: (3, 4, 23, 3),
    152: (3, 8, 36, 3),
    200: (3, 24, 36, 3),
}
CIFAR_DEPTHS: dict[int, tuple[int, ...]] = {29: (3, 3, 3), 11: (1, 1, 1), 20: (2, 2, 2)}


@dataclass(frozen=True)
class ModelSpec:
    """Per-stage block counts, cardinality C, bottleneck width d, stem, stride placement, block form, options.

    Stage k (0-based) has output width ``out_width * 2**k`` and a grouped 3×3 convolution of
    ``cardinality * base_width * 2**k`` channels in C groups (the paper's template), unless
    ``bottleneck_widths`` gives the grouped widths explicitly.
    """

    depths: tuple[int, ...]
    cardinality: int = 1
    base_width: int = 64
    stem: str = "imagenet"
    stem_width: int = 64
    out_width: int = 256
    bottleneck_widths: tuple[int, ...] | None = None
    stride_in_1x1: bool = False
    block_form: str = "c"
    preact: bool = False
    residual: bool = True
    zero_init_last_bn: bool = False
    avg_down: bool = False
    se_reduction: int = 0
    num_classes: int = 1000
    in_chans: int = 3
    # Fixed factor on the logits. Below 1 it slows the classifier's effective learning rate by its
    # square: a wide network's first SGD steps at lr 0.1 otherwise blow its logits up (see docs).
    logit_scale: float = 1.0
    # Dropout on the pooled features before the classifier, in training only (timm's drop_rate).
    drop_rate: float = 0.0
    # Stochastic depth (timm's drop_path_rate): in training each block's residual branch is dropped
    # per image, at a rate rising linearly from 0 at the first block to this at the last.
    drop_path_rate: float = 0.0
    # Free text kept with the spec (not part of the architecture); excluded from equality.
    description: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        depths = self.depths
        if isinstance(depths, list):
            object.__setattr__(self, "depths", tuple(depths))
            depths = self.depths
        if not isinstance(depths, tuple) or not depths:
            raise SpecError(
                f"depths: expected a non-empty tuple of block counts per stage, got {depths!r}"
            )
        for i, n in enumerate(depths):
            if not _is_int(n) or n < 1:
                raise SpecError(
                    f"depths: every stage needs at least 1 block (an int >= 1); stage {i + 1} has {n!r}"
                )
        _check_int("cardinality", self.cardinality, 1)
        _check_int("base_width", self.base_width, 1)
        _check_int("stem_width", self.stem_width, 1)
        _check_int("out_width", self.out_width, 1)
        _check_int("num_classes", self.num_classes, 0)
        _check_int("in_chans", self.in_chans, 1)
        _check_int("se_reduction", self.se_reduction, 0)
        scale = self.logit_scale
        if _is_int(scale):
            scale = float(scale)  # type: ignore[arg-type]
            object.__setattr__(self, "logit_scale", scale)
        if not isinstance(scale, float) or not math.isfinite(scale) or scale <= 0:
            raise SpecError(f"logit_scale: expected a finite number > 0, got {scale!r}")
        for name in ("drop_rate", "drop_path_rate"):
            rate = getattr(self, name)
            if _is_int(rate):
                rate = float(rate)
                object.__setattr__(self, name, rate)
            if not isinstance(rate, float) or not 0.0 <= rate < 1.0:
                raise SpecError(f"{name}: expected a number in [0, 1), got {rate!r}")
        _check_choice("stem", self.stem, STEMS)
        _check_choice("block_form", self.block_form, BLOCK_FORMS)
        for name in ("stride_in_1x1", "preact", "residual", "zero_init_last_bn", "avg_down"):
            if not isinstance(getattr(self, name), bool):
                raise SpecError(f"{name}: expected True or False, got {getattr(self, name)!r}")
        if self.bottleneck_widths is not None:
            if not isinstance(self.bottleneck_widths, (tuple, list)):
                raise SpecError(
                    "bottleneck_widths: expected a tuple of grouped widths, one per stage, or None; "
                    f"got {self.bottleneck_widths!r}"
                )
            widths = tuple(self.bottleneck_widths)
            object.__setattr__(self, "bottleneck_widths", widths)
            if len(widths) != len(depths):
                raise SpecError(
                    f"bottleneck_widths: expected one width per stage ({len(depths)}), got {len(widths)}"
                )
            for i, w in enumerate(widths):
                if not _is_int(w) or w < 1 or w % self.cardinality:
                    raise SpecError(
                        f"bottleneck_widths: stage {i + 1} width {w!r} does not split into "
                        f"cardinality={self.cardinality} groups (expected a positive multiple of "
                        f"{self.cardinality})"
                    )
        if self.zero_init_last_bn and not self.residual:
            # with no shortcut a zeroed last BN makes every block output 0: nothing can train
            raise SpecError(
                "zero_init_last_bn: needs residual=True (without a shortcut every block would "
                "start at 0, not the identity); got zero_init_last_bn=True with residual=False"
            )
        if self.drop_path_rate and not self.residual:
            raise SpecError(
                "drop_path_rate: drops residual branches, so it needs residual=True; got "
                f"drop_path_rate={self.drop_path_rate!r} with residual=False"
            )
        if not isinstance(self.description, str):
            raise SpecError(f"description: expected a str, got {self.description!r}")
        if self.preact and self.block_form != "c":
            raise SpecError(
                f"block_form: pre-activation blocks exist only in form 'c', got {self.block_form!r} "
                "with preact=True (allowed: block_form='c')"
            )
        if self.preact and self.stem == "deep":
            raise SpecError(
                "stem: pre-activation networks use stem 'imagenet' or 'cifar', not 'deep'"
            )
        if self.se_reduction and self.se_reduction > min(self.stage_out_widths):
            raise SpecError(
                f"se_reduction: {self.se_reduction} exceeds the narrowest stage width "
                f"{min(self.stage_out_widths)} (expected 0 for off, or 1..{min(self.stage_out_widths)})"
            )

    # ---- derived geometry -------------------------------------------------------------------
    @property
    def num_stages(self) -> int:
        return len(self.depths)

    @property
    def depth(self) -> int:
        """Weighted layers: 3 per block, plus the stem convolution(s) and the classifier."""
        stem_layers = 3 if self.stem == "deep" else 1
        return 3 * sum(self.depths) + stem_layers + 1

    @property
    def stem_out(self) -> int:
        return 2 * self.stem_width if self.stem == "deep" else self.stem_width

    @property
    def stage_out_widths(self) -> tuple[int, ...]:
        return tuple(self.out_width * 2**k for k in range(self.num_stages))

    @property
    def stage_bottleneck_widths(self) -> tuple[int, ...]:
        if self.bottleneck_widths is not None:
            return self.bottleneck_widths
        return tuple(self.cardinality * self.base_width * 2**k for k in range(self.num_stages))

    @property
    def stage_strides(self) -> tuple[int, ...]:
        return (1,) + (2,) * (self.num_stages - 1)

    @property
    def block_drop_path_rates(self) -> tuple[float, ...]:
        """Stochastic-depth rate of every block, in network order: linear from 0 to
        `drop_path_rate` (timm's ResNet schedule)."""
        blocks = sum(self.depths)
        return tuple(self.drop_path_rate * i / max(blocks - 1, 1) for i in range(blocks))

    @property
    def num_features(self) -> int:
        return self.stage_out_widths[-1]

    @property
    def reduction(self) -> int:
        """Total down-sampling factor of the last feature map."""
        stem = 1 if self.stem == "cifar" else 4
        return stem * math.prod(self.stage_strides)

    @property
    def template(self) -> str:
        """The paper's C×d notation of the first stage's template."""
        return f"{self.cardinality}x{self.stage_bottleneck_widths[0] // self.cardinality}d"

    # ---- construction helpers ---------------------------------------------------------------
    def replace(self, **overrides: Any) -> ModelSpec:
        """A copy with fields replaced; an unknown field is a SpecError listing the allowed ones."""
        allowed = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(overrides) - allowed)
        if unknown:
            raise SpecError(
                f"unknown option(s) {', '.join(unknown)}; allowed: {', '.join(sorted(allowed))}"
            )
        return dataclasses.replace(self, **overrides)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (tuples become lists) from which `from_dict` rebuilds the same spec."""
        out = dataclasses.asdict(self)
        for key, value in out.items():
            if isinstance(value, tuple):
                out[key] = list(value)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModelSpec:
        """Rebuild a spec from `to_dict` output, refusing unknown keys."""
        if not isinstance(data, Mapping):
            raise SpecError(f"spec: expected a mapping of field names to values, got {type(data)}")
        allowed = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - allowed)
        if unknown:
            raise SpecError(
                f"unknown option(s) {', '.join(unknown)}; allowed: {', '.join(sorted(allowed))}"
            )
        if "depths" not in data:
            raise SpecError("depths: missing (a list of block counts per stage)")
        # lists (as JSON and TOML give them) become tuples in __post_init__, after its type checks
        return cls(**data)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_int(name: str, value: object, minimum: int) -> None:
    if not _is_int(value) or value < minimum:  # type: ignore[operator]
        raise SpecError(f"{name}: expected an int >= {minimum}, got {value!r}")


def _check_choice(name: str, value: object, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise SpecError(f"{name}: expected one of {', '.join(allowed)}, got {value!r}")


def _check_options(builder: str, options: Mapping[str, Any], fixed: tuple[str, ...]) -> None:
    taken = [name for name in fixed if name in options]
    if taken:
        raise SpecError(
            f"{taken[0]}: {builder} sets it from its arguments; pass it there, or build a "
            "ModelSpec directly for another value"
        )


def imagenet_spec(depth: int, cardinality: int, base_width: int, **options: Any) -> ModelSpec:
    """The paper's ImageNet template network of a standard depth (50, 101, 152, 200, ...)."""
    if depth not in IMAGENET_DEPTHS:
        raise SpecError(
            f"depth: no ImageNet layout for {depth}; allowed: {', '.join(map(str, IMAGENET_DEPTHS))}"
        )
    _check_options("imagenet_spec", options, ("depths", "cardinality", "base_width"))
    return ModelSpec(
        depths=IMAGENET_DEPTHS[depth], cardinality=cardinality, base_width=base_width, **options
    )


def cifar_spec(depth: int, cardinality: int, base_width: int, **options: Any) -> ModelSpec:
    """The paper's CIFAR network (3×3/64 stem, three stages of 256/512/1024 outputs)."""
    if depth not in CIFAR_DEPTHS:
        raise SpecError(
            f"depth: no CIFAR layout for {depth}; allowed: {', '.join(map(str, CIFAR_DEPTHS))}"
        )
    _check_options("cifar_spec", options, ("depths", "cardinality", "base_width", "stem"))
    options.setdefault("num_classes", 10)
    return ModelSpec(
        depths=CIFAR_DEPTHS[depth],
        cardinality=cardinality,
        base_width=base_width,
        stem="cifar",
        **options,
    )
