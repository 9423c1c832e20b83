"""Inference: load a model with its weights' preprocessing and class names, predict, extract features."""

from __future__ import annotations

from resnext.inference.class_names import imagenet1k_class_names, imagenet1k_wnids
from resnext.inference.inputs import expand_paths, to_pil
from resnext.inference.loading import LoadedModel, load_model, preprocessing_of
from resnext.inference.predictor import (
    Features,
    Prediction,
    Predictor,
    extract_features,
    predict,
)

__all__ = [
    "Features",
    "LoadedModel",
    "Prediction",
    "Predictor",
    "expand_paths",
    "extract_features",
    "imagenet1k_class_names",
    "imagenet1k_wnids",
    "load_model",
    "predict",
    "preprocessing_of",
    "to_pil",
]
