"""torchvision's builder functions (`resnext50_32x4d(weights=..., progress=True)`), one per
registered model, made from the registry table rather than written out."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from resnext.models.network import ResNeXt
from resnext.models.registry import Registry

# torchvision's ResNet arguments that have another name in a ModelSpec
_RENAMED = {"zero_init_residual": "zero_init_last_bn"}
# ...that a ResNeXt builder of torchvision fixes: another value is refused, as torchvision does
_FIXED = {"groups": "cardinality", "width_per_group": "base_width"}
_REFUSED = {
    "norm_layer": "every normalisation is nn.BatchNorm2d, which the training fast paths and the "
    "weight converters rely on",
    "replace_stride_with_dilation": "dilated stages are not built",
}


def torchvision_builder(models: Registry, name: str) -> Callable[..., ResNeXt]:
    """The builder of registered model `name` with torchvision's signature."""
    spec = models.get(name).spec

    def build(
        *, weights: str | Path | None = None, progress: bool = True, **kwargs: Any
    ) -> ResNeXt:
        if not isinstance(progress, bool):
            raise TypeError(f"progress: expected a bool, got {type(progress).__name__}")
        from resnext.models import create_model, requested_weights

        # torchvision's older spelling of the default weights
        weights = requested_weights(weights, kwargs.pop("pretrained", False))
        overrides: dict[str, Any] = {}
        for key, value in kwargs.items():
            if key in _REFUSED:
                raise ValueError(f"{key}: not supported by resnext: {_REFUSED[key]}")
            if key in _FIXED:
                if value != getattr(spec, _FIXED[key]):
                    raise ValueError(
                        f"{key}: expected {getattr(spec, _FIXED[key])!r} for {name}, got {value!r} "
                        "(another cardinality or width is another model: resnext.list_models())"
                    )
                continue
            overrides[_RENAMED.get(key, key)] = value
        if weights is not None and progress:
            from resnext.weights.load import prefetch  # the weights package builds on models

            prefetch(weights, name, progress=True)
        return create_model(name, weights=weights, **overrides)

    build.__name__ = build.__qualname__ = name
    build.__module__ = "resnext.models"  # where pickle finds it again (the module's __getattr__)
    build.__doc__ = (
        f"{name} ({models.get(name).source}), as torchvision's builder: `weights` a weights-table "
        "tag, 'DEFAULT' or a file (`resnext.create_model`'s), `progress` shows a download on "
        "stderr; other keywords are torchvision's (num_classes, zero_init_residual, groups and "
        "width_per_group as the model has them) or ModelSpec fields."
    )
    return build
