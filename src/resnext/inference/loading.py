"""Resolve a model name and a weights file (training checkpoint or any supported format) for inference."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from resnext.devices import check_device
from resnext.errors import CheckpointError, ConfigError, WeightsError
from resnext.weights.loaded import check_class_names
from resnext.weights.preprocess import Preprocessing, imagenet
from resnext.weights.run_checkpoint import dataset_preprocessing, is_run_payload


@dataclass
class LoadedModel:
    """A network in eval mode with what is needed to feed it and name its outputs."""

    model: nn.Module
    name: str
    weights: str | None
    preprocessing: Preprocessing
    class_names: tuple[str, ...]
    source_format: str


def preprocessing_of(model: nn.Module) -> Preprocessing:
    """The preprocessing `model` expects (timm's `resolve_model_data_config`): its weights' where
    it was loaded with them, else `default_preprocessing`'s for its layout."""
    return getattr(model, "preprocessing", None) or default_preprocessing(model)


def default_preprocessing(model: nn.Module) -> Preprocessing:
    """ImageNet 256/224 for ImageNet layouts, identity geometry at 32 px for CIFAR layouts."""
    spec = getattr(model, "spec", None)
    if getattr(spec, "stem", None) == "cifar":
        return dataset_preprocessing("cifar10", 32)
    return imagenet()


def torch_payload(path: str | Path) -> Any:
    """What a torch file at `path` holds, read once, or None (another kind of file, or one
    torch cannot read: the weights loaders then name its problem)."""
    path = Path(path)
    if path.suffix not in (".pt", ".pth", ".ckpt", ".tar") or not path.is_file():
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        return None


def _from_checkpoint(payload: dict[str, Any], path: Path, model_name: str | None) -> nn.Module:
    # The same reading as any weights file: build_with_weights gives the network the run's spec
    # overrides, its preprocessing and its class names.
    from resnext.weights import build_with_weights
    from resnext.weights.formats import convert_checkpoint

    loaded = convert_checkpoint(payload, str(path))
    name = model_name or loaded.model_name
    if not name:
        raise CheckpointError(f"checkpoint {path}: its config names no model; pass --model")
    model = build_with_weights(name, loaded)
    model.resnext_name = name
    return model


def load_training_checkpoint(
    payload: Any, path: str | Path, model_name: str | None = None
) -> nn.Module | None:
    """The network of a `resnext train` checkpoint whose content (`torch_payload(path)`) is
    `payload`, built with its config's spec overrides and carrying the preprocessing its run
    trained with; None where `payload` is not a training checkpoint."""
    if not is_run_payload(payload):
        return None
    net = _from_checkpoint(payload, Path(path), model_name)
    if getattr(net, "preprocessing", None) is None:
        net.preprocessing = default_preprocessing(net)
    return net


def load_model(
    model: str | None = None,
    weights: str | Path | None = None,
    *,
    num_classes: int | None = None,
    device: str | torch.device = "cpu",
) -> LoadedModel:
    """The model `model` with `weights` (file or weights tag); the name may come from the weights."""
    from resnext.models import create_model

    device = check_device(device)  # before any file is read: torch would refuse it only at the move
    fmt = "random-init"
    net: nn.Module
    if weights is None:
        if model is None:
            raise ConfigError("model: expected a model name when no weights are given")
        warnings.warn(
            f"{model}: no weights given, the network is randomly initialised", stacklevel=2
        )
        net, name = create_model(model, num_classes=num_classes), model
    else:
        from resnext.weights.formats import is_int8_state
        from resnext.weights.int8 import (
            INT8_WEIGHTS,
            build_int8_from_state,
            build_int8_with_weights,
            read_int8_sidecar,
        )

        path = Path(weights)
        read = torch_payload(path)
        payload = read if is_run_payload(read) else None
        int8_tag = INT8_WEIGHTS.get(str(weights)) if not path.is_file() else None
        int8_state = read if path.suffix in (".pth", ".pt") and is_int8_state(read) else None
        if (int8_tag or int8_state) is not None:
            if num_classes is not None:
                raise ConfigError(
                    "num_classes: an int8 network keeps the classifier it was saved with"
                )
            if torch.device(device).type != "cpu":
                raise ConfigError(f"device: int8 networks run on the CPU, got {str(device)!r}")
        if int8_tag is not None:
            name, fmt = model or int8_tag.model, "torchvision_int8"
            net = build_int8_with_weights(name, weights)
        elif int8_state is not None:
            meta = read_int8_sidecar(path)  # what `resnext quantize` wrote beside it, if anything
            name = model or (meta.model_name if meta is not None else None)
            if name is None:
                raise WeightsError(
                    f"weights {weights}: an int8 state dict names no model; pass one"
                )
            fmt = "torchvision_int8"
            overrides = meta.overrides(name) if meta is not None else None
            net = build_int8_from_state(name, int8_state, str(weights), overrides=overrides)
            if meta is not None:
                net.preprocessing, net.class_names = meta.preprocessing, meta.class_names
        elif payload is not None:
            net = _from_checkpoint(payload, path, model)
            name, fmt = net.resnext_name, "resnext_train_checkpoint"
        else:
            from resnext.weights import build_with_weights, load_weights

            # A torch file already read above is converted as it is, not read again.
            loaded = load_weights(weights, model_name=model, payload=read)
            name = model or loaded.model_name
            if not name:
                raise WeightsError(f"weights {weights}: they name no model; pass a model name")
            net = build_with_weights(name, loaded, num_classes=num_classes)
            fmt = loaded.source_format
    prep = preprocessing_of(net)
    head = getattr(net, "num_classes", 0) or 0
    names = getattr(net, "class_names", None)
    if names is None:
        from resnext.inference.class_names import default_class_names

        names = default_class_names(head)
    else:
        check_class_names(names, head, f"weights {weights}")
    net = net.to(device).eval()
    return LoadedModel(net, name, str(weights) if weights else None, prep, tuple(names), fmt)
