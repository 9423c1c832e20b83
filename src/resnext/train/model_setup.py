"""The network of a run: built from the config, optionally from pretrained weights, placed on a device."""

from __future__ import annotations

import torch
from torch import nn

from resnext.config import Config
from resnext.errors import TrainingError
from resnext.models import ResNeXt, create_model
from resnext.speed.merged_groups import merge_where_faster
from resnext.train.finetune import freeze, pretrained_network


def build_network(cfg: Config, dataset_classes: int | None) -> ResNeXt:
    """The run's model: the named network with spec overrides, a head for the data's classes.

    With `finetune.source`, the network is first built with the source's classifier, loaded,
    then given a fresh classifier of `finetune.num_classes` (or the data's class count).
    """
    spec = dict(cfg.model.spec)
    if cfg.train.zero_init_residual:
        spec["zero_init_last_bn"] = True
    spec_classes = spec.pop("num_classes", None)
    target = cfg.finetune.num_classes or spec_classes or dataset_classes
    if not cfg.finetune.source:
        model = create_model(cfg.model.name, num_classes=target, **spec)
    else:
        model = pretrained_network(cfg.model.name, cfg.finetune.source, spec)
        if target is not None:
            model.reset_classifier(int(target))
        freeze(model, cfg.finetune.frozen_stages)
    if dataset_classes is not None and model.num_classes != dataset_classes:
        raise TrainingError(
            f"model has {model.num_classes} classes but the data has {dataset_classes}; "
            "set finetune.num_classes or model.spec.num_classes to match"
        )
    return model


def place(model: nn.Module, device: torch.device, channels_last: bool) -> nn.Module:
    """Move to the device, in channels-last layout if asked (faster convolutions on GPU and oneDNN)."""
    model = model.to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def wrap_distributed(
    model: nn.Module, device: torch.device, world_size: int, sync_bn: bool
) -> nn.Module:
    """DDP-wrap (with SyncBatchNorm if asked) when several processes train together."""
    if sync_bn and world_size > 1:
        if device.type != "cuda":
            raise TrainingError(
                "train.sync_bn: PyTorch's SyncBatchNorm runs on CUDA devices only; set it false on CPU"
            )
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if world_size == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None
    )


def merge_groups_for_training(
    model: ResNeXt,
    *,
    micro_batch: int,
    image_size: int,
    device: torch.device,
    channels_last: bool,
    amp_dtype: torch.dtype | None,
) -> dict[str, int]:
    """`train.merge_groups`: each grouped convolution given its fastest merge factor for one
    step of this rank's batch (timed here, on `device`); the factors by layer name."""
    example = torch.randn(micro_batch, model.spec.in_chans, image_size, image_size, device=device)
    if channels_last:
        example = example.contiguous(memory_format=torch.channels_last)
    return merge_where_faster(model, example, dtype=amp_dtype or torch.float32)
