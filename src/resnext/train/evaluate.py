"""Evaluation: loss and top-1/top-5 error of a model over a loader, summed over all processes."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader

from resnext.train.loop import to_model_input
from resnext.train.metrics import Meter
from resnext.train.precision import autocast


def shifted(images: torch.Tensor, dx: int, dy: int) -> torch.Tensor:
    """`images` (N, C, H, W) moved right by dx and down by dy pixels, zero where uncovered."""
    h, w = images.shape[-2:]
    p = max(abs(dx), abs(dy))
    padded = F.pad(images, (p, p, p, p))
    return padded[..., p - dy : p - dy + h, p - dx : p - dx + w]


def tta_views(images: torch.Tensor, *, flip: bool, shift: int) -> list[torch.Tensor]:
    """The batch itself first, then its shifted copies, each followed by its mirror if `flip`."""
    views = [images]
    if shift:
        views += [shifted(images, shift, shift), shifted(images, -shift, -shift)]
    if flip:
        views = [v for view in views for v in (view, view.flip(3))]
    return views


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
    shift: int = 0,
    batch_transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> dict[str, float]:
    """`{prefix}_loss`, `{prefix}_top1_err`, `{prefix}_top5_err` (percent) over the whole loader.

    Test-time augmentation averages softmax scores over views: `flip` adds each view's mirror
    image, `shift` > 0 adds copies moved by (+shift, +shift) and (-shift, -shift) pixels, the
    uncovered border zero (the mean after normalisation), as the training crops do.
    """
    if shift < 0:
        raise ValueError(f"shift: expected >= 0 pixels, got {shift}")
    was_training = model.training
    model.eval()
    meter = Meter()
    criterion = nn.CrossEntropyLoss()
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    try:
        for images, target in loader:
            images = to_model_input(images, device, memory_format, batch_transform)
            target = target.to(device, non_blocking=True)
            with autocast(amp_dtype, device):
                views = tta_views(images, flip=flip, shift=shift)
                logits = model(views[0]).float()
                if len(views) > 1:
                    probs = logits.softmax(1)
                    for view in views[1:]:
                        probs = probs + model(view).float().softmax(1)
                    logits = (probs / len(views)).clamp_min(1e-12).log()
            loss = criterion(logits, target)
            meter.add(float(loss), logits, target)
    finally:
        model.train(was_training)
    return meter.reduced(device).summary(prefix)
