"""Pretrained weights: the public checkpoint table, download cache, format converters, native format."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from resnext.weights.adapt import adapt_input_channels
from resnext.weights.download import default_cache_dir, download
from resnext.weights.formats import convert_checkpoint, detect_format
from resnext.weights.int8 import INT8_WEIGHTS, build_int8_with_weights, list_int8_weights
from resnext.weights.load import LoadReport, apply_weights, load_weights, read_weights_file
from resnext.weights.loaded import LoadedWeights
from resnext.weights.native import load_native, save_weights
from resnext.weights.preprocess import Preprocessing
from resnext.weights.table import (
    DEFAULT_TAGS,
    WEIGHTS,
    Result,
    WeightsEntry,
    default_weights,
    get_weights,
    list_pretrained,
    list_weights,
)


def build_with_weights(
    name: str,
    weights: str | Path | LoadedWeights,
    *,
    num_classes: int | None = None,
    **overrides: Any,
) -> Any:
    """Create model `name` with the spec the weights need (stride placement, classes) and load them.

    `num_classes` different from the weights' keeps the backbone and starts a new classifier.
    The model gets ``preprocessing`` and ``class_names`` attributes from the weights. An
    ``in_chans`` override other than 3 fits RGB weights' first convolution to it as timm does
    (`adapt_input_channels`: summed for one channel, repeated and rescaled for more).
    """
    from resnext.models import create_model

    if isinstance(weights, LoadedWeights):
        loaded = weights
    else:
        loaded = load_weights(weights, model_name=name)
    spec_overrides = {**loaded.spec_overrides, **overrides}
    # a count in the overrides speaks for weights without a classifier tensor (0: headless)
    stated = spec_overrides.pop("num_classes", None)
    file_classes = loaded.num_classes if loaded.num_classes is not None else stated
    classes = num_classes if num_classes is not None else file_classes
    model = create_model(name, num_classes=classes, **spec_overrides)
    loaded = adapt_input_channels(loaded, model.spec.in_chans)  # RGB weights for in_chans ≠ 3
    new_head = file_classes is None or (num_classes is not None and num_classes != file_classes)
    # A new head may differ from the file's (or be absent from it); nothing else may.
    apply_weights(model, loaded, new_head=new_head)
    model.preprocessing = loaded.preprocessing
    model.class_names = loaded.class_names if not new_head else None
    return model


__all__ = [
    "DEFAULT_TAGS",
    "INT8_WEIGHTS",
    "WEIGHTS",
    "LoadReport",
    "LoadedWeights",
    "Preprocessing",
    "Result",
    "WeightsEntry",
    "adapt_input_channels",
    "apply_weights",
    "build_int8_with_weights",
    "build_with_weights",
    "convert_checkpoint",
    "default_cache_dir",
    "default_weights",
    "detect_format",
    "download",
    "get_weights",
    "list_int8_weights",
    "list_pretrained",
    "list_weights",
    "load_native",
    "load_weights",
    "read_weights_file",
    "save_weights",
]
