"""Recognise which library wrote a checkpoint (by its keys and layout) and convert it to our keys."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, TypeGuard

import numpy as np
import torch

from resnext.errors import WeightsError
from resnext.weights import converters as cv
from resnext.weights.loaded import LoadedWeights
from resnext.weights.preprocess import (
    DETECTRON2_CAFFE2,
    DETECTRON2_FROM_TORCHVISION,
    MMPRETRAIN,
    imagenet,
)
from resnext.weights.run_checkpoint import from_run, is_run_checkpoint

FORMATS = ("torchvision", "timm", "mmpretrain", "pycls", "detectron2", "prlz77", "native", "lua_t7")
_D2_KEY = re.compile(r"^(backbone\.(bottom_up\.)?)?(res[2-5]\.\d+\.|stem\.conv1\.)")


def _unwrap(obj: Any, where: str = "checkpoint") -> tuple[Mapping[str, Any], dict[str, Any]]:
    """The state-dict mapping inside a checkpoint, and the surrounding metadata (cfg, meta, ...)."""
    if not isinstance(obj, Mapping):
        raise WeightsError(
            f"expected a checkpoint dict (a state dict or a dict holding one), got {type(obj).__name__}"
        )
    context: dict[str, Any] = {}
    inner: Mapping[Any, Any] = obj
    for wrapper in ("model_state", "state_dict", "model", "state_dict_ema"):
        candidate = obj.get(wrapper)
        if isinstance(candidate, Mapping) and candidate:
            context = {k: v for k, v in obj.items() if k != wrapper}
            context["wrapper"] = wrapper
            inner = candidate
            break
    for key in inner:
        if not isinstance(key, str):
            raise WeightsError(
                f"{where}: state-dict key {key!r} ({type(key).__name__}) is not a string; expected "
                "parameter names such as 'conv1.weight'"
            )
    return inner, context


def detect_format(obj: Any) -> str:
    """The library that wrote `obj` (a loaded checkpoint), judged from its layout and key names."""
    inner, context = _unwrap(obj)
    return _detect(cv.strip_wrappers(dict(inner)), context)


def _detect(state: Mapping[str, Any], context: Mapping[str, Any]) -> str:
    keys = list(state)
    if context.get("wrapper") == "model_state" or any(k.startswith("s1.b1.") for k in keys):
        return "pycls"
    if any(k.startswith(("conv_1_3x3.", "stage_1.stage_1_bottleneck_")) for k in keys):
        return "prlz77"
    if any(_D2_KEY.match(k) for k in keys):
        return "detectron2"
    if any(k.startswith("backbone.") for k in keys):
        return "mmpretrain"
    if "conv1.0.weight" in state:
        return "timm"
    if "conv1.weight" in state or any(k.startswith("layer1.") for k in keys):
        return "torchvision"
    shown = ", ".join(keys[:6]) + (" ..." if len(keys) > 6 else "")
    raise WeightsError(
        f"unrecognised checkpoint layout (first keys: {shown or 'none'}); expected the keys of "
        "torchvision/timm (conv1, layer1.0...), mmpretrain (backbone.), pycls (stem.conv, s1.b1.f.a), "
        "detectron2 (stem.conv1, res2.0), or prlz77 (conv_1_3x3, stage_1...)"
    )


def _tensors(state: Mapping[str, Any], where: str) -> dict[str, torch.Tensor]:
    """Every value as a torch tensor (numpy arrays from detectron2 pickles are converted)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if isinstance(value, torch.Tensor):
            out[key] = value
        elif isinstance(value, np.ndarray):
            out[key] = torch.from_numpy(np.ascontiguousarray(value))
        else:
            raise WeightsError(
                f"{where}: entry {key!r} is a {type(value).__name__}, expected a tensor or array"
            )
    return out


def _text(value: Any) -> str:
    return value if isinstance(value, str) else str(value) if value is not None else ""


def _pycls_stride_in_1x1(cfg: str) -> bool:
    """AnyNet puts the stride on the 3×3; pycls ResNet follows RESNET.STRIDE_1X1 (default True)."""
    if re.search(r"TYPE:\s*anynet", cfg, re.IGNORECASE):
        return False
    return not re.search(r"STRIDE_1X1:\s*false", cfg, re.IGNORECASE)


# the fc layer's int8 weight and float bias, as torch.ao's quantized Linear saves them
PACKED_FC = "fc._packed_params._packed_params"


def is_int8_state(state: object) -> TypeGuard[dict]:
    """Whether `state` is a quantized ResNet state dict (torchvision's int8 layout)."""
    return isinstance(state, dict) and PACKED_FC in state and "quant.scale" in state


def convert_checkpoint(obj: Any, source: str, *, fmt: str | None = None) -> LoadedWeights:
    """Our state dict, spec overrides and preprocessing from a loaded checkpoint of any library."""
    inner, context = _unwrap(obj, source)
    state = cv.strip_wrappers(dict(inner))
    if fmt is None and is_run_checkpoint(context):
        return from_run(_tensors(state, source), context, source)
    if is_int8_state(state):
        raise WeightsError(
            f"{source}: an int8 (quantized) checkpoint, which a float model cannot take: load it "
            "with resnext.weights.build_int8_with_weights(name, weights)"
        )
    fmt = fmt or _detect(state, context)
    state = _tensors(state, source)
    notes: list[str] = []
    overrides: dict[str, Any] = {}
    class_names = None
    if fmt in ("torchvision", "timm"):
        prep = imagenet(256, 224)
        overrides["stride_in_1x1"] = False
    elif fmt == "mmpretrain":
        state, dropped = cv.rename(state, cv.mmpretrain_key)
        meta = context.get("meta") if isinstance(context.get("meta"), Mapping) else {}
        overrides["stride_in_1x1"] = "style='caffe'" in _text(meta.get("config"))
        prep = MMPRETRAIN
        dataset_meta = meta.get("dataset_meta")
        classes = meta.get("CLASSES") or (
            dataset_meta.get("classes") if isinstance(dataset_meta, Mapping) else None
        )
        if (
            isinstance(classes, (list, tuple))
            and classes
            and all(isinstance(c, str) for c in classes)
        ):
            class_names = tuple(classes)
        if dropped:
            notes.append(f"ignored {len(dropped)} non-backbone keys: {', '.join(dropped[:5])}")
    elif fmt == "pycls":
        state, _ = cv.rename(state, cv.pycls_key)
        overrides["stride_in_1x1"] = _pycls_stride_in_1x1(_text(context.get("cfg")))
        prep = imagenet(256, 224)
    elif fmt == "detectron2":
        state, dropped = cv.rename(state, cv.detectron2_key)
        from_tv = bool(context.get("matching_heuristics")) or (
            _text(context.get("__author__")).lower() == "torchvision"
        )
        conv2 = next((v for k, v in state.items() if k.endswith(".conv2.weight")), None)
        grouped = conv2 is not None and conv2.dim() == 4 and conv2.shape[1] < conv2.shape[0]
        # MSRA ResNets put the stride on the 1×1; FAIR's X-101 configs and converted torchvision don't.
        overrides["stride_in_1x1"] = not (from_tv or grouped)
        prep = DETECTRON2_FROM_TORCHVISION if from_tv else DETECTRON2_CAFFE2
        if dropped:
            notes.append(f"ignored {len(dropped)} keys outside the backbone (FPN, heads)")
    elif fmt == "prlz77":
        state, _ = cv.rename(state, cv.prlz77_key)
        overrides["stride_in_1x1"] = False
        prep = None
    else:
        raise WeightsError(f"format {fmt!r}: expected one of {', '.join(FORMATS[:6])}")
    state = cv.add_missing_bn_counters(state)
    state = {k: (v.float() if v.is_floating_point() else v) for k, v in state.items()}
    return LoadedWeights(
        state_dict=state,
        source_format=fmt,
        source=source,
        spec_overrides=overrides,
        preprocessing=prep,
        class_names=class_names,
        notes=tuple(notes),
    )
