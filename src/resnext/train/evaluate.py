"""Evaluation: loss and top-1/top-5 error of a model over a loader, summed over all processes."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import DataLoader

from resnext.train.metrics import Meter
from resnext.train.precision import autocast


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: DataLoader,
    device: torch.device,
    *,
    amp_dtype: torch.dtype | None = None,
    channels_last: bool = False,
    prefix: str = "val",
    flip: bool = False,
) -> dict[str, float]:
    """`{prefix}_loss`, `{prefix}_top1_err`, `{prefix}_top5_err` (percent) over the whole loader.

    `flip` averages the softmax scores of each image and its mirror image (test-time flip).
    """
    was_training = model.training
    model.eval()
    meter = Meter()
    criterion = nn.CrossEntropyLoss()
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    try:
        for images, target in loader:
            images = images.to(device, non_blocking=True, memory_format=memory_format)
            target = target.to(device, non_blocking=True)
            with autocast(amp_dtype, device):
                logits = model(images).float()
                if flip:
                    probs = (logits.softmax(1) + model(images.flip(3)).float().softmax(1)) / 2
                    logits = probs.clamp_min(1e-12).log()
            loss = criterion(logits, target)
            meter.add(float(loss), logits, target)
    finally:
        model.train(was_training)
    return meter.reduced(device).summary(prefix)
