"""ResNeXt networks: spec, builder, block forms, named models, complexity accounting."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, overload

from resnext.models.builders import torchvision_builder
from resnext.models.complexity import Complexity, count
from resnext.models.features import FeatureInfo, FeatureNet
from resnext.models.forms import convert_block_form, grouped_state_dict
from resnext.models.network import ResNeXt, build_model
from resnext.models.registry import ModelEntry, Registry
from resnext.models.solver import solve_width
from resnext.models.spec import ModelSpec, cifar_spec, imagenet_spec
from resnext.models.zoo import MODELS


def get_spec(name: str, **overrides: Any) -> ModelSpec:
    """The spec of a named model with fields replaced by `overrides`."""
    spec = MODELS.get(name).spec
    return spec.replace(**overrides) if overrides else spec


@overload
def create_model(
    name: str,
    num_classes: int | None = None,
    weights: str | Path | None = None,
    *,
    pretrained: bool = False,
    features_only: Literal[False] = False,
    out_indices: None = None,
    **spec_overrides: Any,
) -> ResNeXt: ...


@overload
def create_model(
    name: str,
    num_classes: int | None = None,
    weights: str | Path | None = None,
    *,
    pretrained: bool = False,
    features_only: Literal[True],
    out_indices: int | Sequence[int] | None = None,
    **spec_overrides: Any,
) -> FeatureNet: ...


def create_model(
    name: str,
    num_classes: int | None = None,
    weights: str | Path | None = None,
    *,
    pretrained: bool = False,
    features_only: bool = False,
    out_indices: int | Sequence[int] | None = None,
    **spec_overrides: Any,
) -> ResNeXt | FeatureNet:
    """A network of a registered name (or mmpretrain alias), spec overridable.

    `weights`: a weights-table tag (downloaded into the cache) or a file in any supported format
    (torchvision/timm, mmpretrain, pycls, detectron2, Lua Torch .t7, native safetensors); the spec
    then follows what the weights need (stride placement, number of classes). 'DEFAULT', or
    `pretrained=True` (timm's), is the model's default tag (`resnext.weights.default_weights`:
    torchvision's DEFAULT where torchvision publishes the model).

    `features_only` (timm's): a `FeatureNet` without the classifier whose forward returns the
    maps at `out_indices` into the network's `feature_info` (default: all, the stem's activation
    first, then each stage's output).
    """
    if not isinstance(features_only, bool):
        raise TypeError(f"features_only: expected a bool, got {type(features_only).__name__}")
    weights = requested_weights(weights, pretrained)
    if out_indices is not None and not features_only:
        raise ValueError("out_indices: expected only with features_only=True")
    if weights is not None:
        from resnext.weights import build_with_weights  # the weights package builds on this one

        model = build_with_weights(name, weights, num_classes=num_classes, **spec_overrides)
    else:
        if num_classes is not None:
            spec_overrides["num_classes"] = num_classes
        model = build_model(get_spec(name, **spec_overrides))
    return FeatureNet(model, out_indices) if features_only else model


def requested_weights(weights: str | Path | None, pretrained: bool) -> str | Path | None:
    """The weights a call asks for: `weights`, or with timm's (and older torchvision's)
    `pretrained=True` the model's default tag, 'DEFAULT'."""
    if not isinstance(pretrained, bool):
        raise TypeError(f"pretrained: expected a bool, got {type(pretrained).__name__}")
    if not pretrained:
        return weights
    if weights is not None:
        raise ValueError(f"pretrained: expected either it or weights, got weights={weights!r}")
    return "DEFAULT"


def list_models(pattern: str | Sequence[str] = "*", pretrained: bool = False) -> list[str]:
    """Registered model names matching a shell-style pattern (or any of several), sorted; with
    `pretrained` only those with published weights (`resnext.weights.list_weights(name)`).

    As timm's `list_models`, an empty pattern lists every model. A pattern is matched against the
    canonical names and their aliases (mmpretrain's), and the canonical names are returned."""
    patterns = [pattern] if isinstance(pattern, str) else pattern
    if not isinstance(patterns, (list, tuple)) or not all(isinstance(p, str) for p in patterns):
        raise TypeError(
            f"pattern: expected a string or a list of strings, got {type(pattern).__name__}"
        )
    if not isinstance(pretrained, bool):
        raise TypeError(f"pretrained: expected a bool, got {type(pretrained).__name__}")
    patterns = [p or "*" for p in patterns]
    names = {name for p in patterns for name in MODELS.names(p)}
    if pretrained:
        from resnext.weights.table import DEFAULT_TAGS  # the weights package builds on this one

        names &= set(DEFAULT_TAGS)
    return sorted(names)


def is_model(name: str) -> bool:
    """Whether `name` is a registered model name or alias (timm's `is_model`)."""
    return isinstance(name, str) and name in MODELS


_BUILDERS: dict[str, Any] = {}


def __getattr__(name: str) -> Any:
    # torchvision's builders: `from resnext.models import resnext50_32x4d`
    if name in MODELS.names("*"):
        if name not in _BUILDERS:
            _BUILDERS[name] = torchvision_builder(MODELS, name)
        return _BUILDERS[name]
    raise AttributeError(f"module 'resnext.models' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *MODELS.names("*")})


__all__ = [
    "MODELS",
    "Complexity",
    "FeatureInfo",
    "FeatureNet",
    "ModelEntry",
    "ModelSpec",
    "Registry",
    "ResNeXt",
    "build_model",
    "cifar_spec",
    "convert_block_form",
    "count",
    "create_model",
    "get_spec",
    "grouped_state_dict",
    "imagenet_spec",
    "is_model",
    "list_models",
    "solve_width",
]
