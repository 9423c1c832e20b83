"""A `resnext train` checkpoint read as weights: its network, the spec its run built, its inputs, its names."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from resnext.errors import WeightsError
from resnext.weights import converters as cv
from resnext.weights.loaded import LoadedWeights, check_class_names
from resnext.weights.preprocess import Preprocessing

SOURCE_FORMAT = "resnext_train_checkpoint"
# The "format" entry `resnext train` writes into every checkpoint.
RUN_FORMAT = "resnext-train-checkpoint/1"


def is_run_checkpoint(context: Mapping[str, Any]) -> bool:
    """Whether the metadata around a checkpoint's state dict is a `resnext train` run's: the
    network under 'model' beside the run's config, and the run's format tag, or (a checkpoint
    put together by hand) no tag but a config naming one of our models. Other trainers also save
    {'model', 'config'} (Swin's); their checkpoints are read by their keys, as before."""
    if context.get("wrapper") != "model" or not isinstance(context.get("config"), Mapping):
        return False
    if "format" in context:
        return context["format"] == RUN_FORMAT
    model = context["config"].get("model")
    return isinstance(model, Mapping) and isinstance(model.get("name"), str)


def is_run_payload(obj: Any) -> bool:
    """`is_run_checkpoint` for a whole loaded checkpoint."""
    if not isinstance(obj, Mapping) or not isinstance(obj.get("model"), Mapping):
        return False
    return is_run_checkpoint({**{k: v for k, v in obj.items() if k != "model"}, "wrapper": "model"})


def dataset_preprocessing(kind: str, image_size: int) -> Preprocessing:
    """What training fed the network: the data package's statistics for `kind` at `image_size`."""
    from resnext.data.stats import dataset_stats

    mean, std = dataset_stats(kind)
    # Small-image datasets are used whole; ImageFolder crops keep the 256/224 ratio.
    if kind in ("cifar10", "cifar100", "digits"):
        return Preprocessing(resize=image_size, crop=image_size, mean=mean, std=std)
    # ImageFolder runs validate with imagenet_eval: bicubic, as fb.resnet.torch's evaluation
    resize = round(image_size * 8 / 7)
    return Preprocessing(
        resize=resize, crop=image_size, mean=mean, std=std, interpolation="bicubic"
    )


def from_run(
    state: dict[str, torch.Tensor], context: Mapping[str, Any], source: str
) -> LoadedWeights:
    """LoadedWeights of a run checkpoint: its config's model name and spec overrides (less the
    class count, which the saved classifier decides), its data's preprocessing, its class names."""
    config = context["config"]
    model_cfg = config.get("model") if isinstance(config.get("model"), Mapping) else {}
    spec = model_cfg.get("spec") or {}
    if not isinstance(spec, Mapping):
        raise WeightsError(f"{source}: config model.spec: expected a table, got {spec!r}")
    overrides = {k: v for k, v in spec.items() if k != "num_classes"}
    if "fc.weight" not in state:
        overrides["num_classes"] = 0  # a headless network stays headless, not given a random head
    name = model_cfg.get("name")
    data = config.get("data") if isinstance(config.get("data"), Mapping) else {}
    prep = None
    if data.get("kind"):
        prep = dataset_preprocessing(str(data["kind"]), int(data.get("image_size", 32)))
    fc = state.get("fc.weight")
    return LoadedWeights(
        state_dict=cv.add_missing_bn_counters(state),
        source_format=SOURCE_FORMAT,
        source=source,
        spec_overrides=overrides,
        preprocessing=prep,
        class_names=_class_names(context.get("class_names"), fc, source),
        model_name=str(name) if name else None,
    )


def _class_names(names: Any, fc: Any, source: str) -> tuple[str, ...] | None:
    # Checkpoints from before runs saved their class names have none.
    if names is None:
        return None
    check_class_names(names, int(fc.shape[0]) if isinstance(fc, torch.Tensor) else 0, source)
    return tuple(names)
