"""resnext: build, train, evaluate, convert and run ResNeXt networks (Xie et al., CVPR 2017)."""

from __future__ import annotations

from resnext.models import (
    ModelSpec,
    ResNeXt,
    build_model,
    convert_block_form,
    count,
    create_model,
    get_spec,
    is_model,
    list_models,
    solve_width,
)

__version__ = "0.1.0"

# Inference pulls in the data and weights packages, the fast path torch.compile's machinery:
# import them only when first used.
_LAZY = {"predict", "extract_features", "Predictor", "preprocessing_of"}


def __getattr__(name: str) -> object:
    if name in _LAZY:
        import resnext.inference as inference

        return getattr(inference, name)
    if name == "optimize":
        from resnext.speed.fastpath import optimize

        return optimize
    if name == "list_pretrained":
        from resnext.weights.table import list_pretrained

        return list_pretrained
    if name == "quantize_int8":
        from resnext.speed.int8 import quantize_int8

        return quantize_int8
    raise AttributeError(f"module 'resnext' has no attribute {name!r}")


__all__ = [
    "ModelSpec",
    "Predictor",
    "ResNeXt",
    "__version__",
    "build_model",
    "convert_block_form",
    "count",
    "create_model",
    "extract_features",
    "get_spec",
    "is_model",
    "list_models",
    "list_pretrained",
    "optimize",
    "predict",
    "preprocessing_of",
    "quantize_int8",
    "solve_width",
]
