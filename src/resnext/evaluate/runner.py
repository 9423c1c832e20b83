"""The evaluation loop: a dataset of PIL images and labels, a protocol, a model -> accuracy counts."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from resnext.errors import ConfigError
from resnext.evaluate.distributed import (
    DistContext,
    ShardSampler,
    current_context,
    max_across_ranks,
    sum_across_ranks,
)
from resnext.evaluate.metrics import AccuracyCounter
from resnext.evaluate.progress import ProgressBar
from resnext.evaluate.protocols import Protocol
from resnext.evaluate.restricted import LabelSubset
from resnext.evaluate.scoring import Scorer
from resnext.evaluate.views import Normalization, ViewTransform, collate_views


class _Viewed(Dataset):
    """A dataset of (PIL image, label) seen through a protocol's view transform."""

    def __init__(self, base: Dataset, transform: ViewTransform) -> None:
        self.base, self.transform = base, transform

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> tuple[object, int]:
        image, label = self.base[i]
        return self.transform(image), int(label)


@dataclass
class EvalResult:
    """Summed counts over all ranks and the wall time of the slowest rank."""

    counter: AccuracyCounter
    seconds: float
    protocol: Protocol
    world_size: int

    @property
    def top1(self) -> float:
        return self.counter.accuracy(1)

    @property
    def top5(self) -> float:
        return self.counter.accuracy(5)


def evaluate(
    model: nn.Module,
    dataset: Dataset,
    protocol: Protocol,
    normalization: Normalization,
    *,
    num_classes: int,
    subset: LabelSubset | None = None,
    batch_size: int = 32,
    num_workers: int = 0,
    device: str | torch.device = "cpu",
    progress: bool = False,
    context: DistContext | None = None,
    fast: nn.Module | None = None,
) -> EvalResult:
    """Score every image of `dataset` (PIL image, label) once, across ranks when distributed.

    `fast`: `resnext.optimize(model, ...)`'s module, run instead of `model` for the crop
    protocols (center, ten-crop); the dense protocol refuses it."""
    for name, value, least in (("batch_size", batch_size, 1), ("num_workers", num_workers, 0)):
        if not isinstance(value, int) or isinstance(value, bool) or value < least:
            raise ConfigError(f"{name}: expected an integer >= {least}, got {value!r}")
    ctx = context or current_context()
    device = torch.device(device)
    model = model.to(device).eval()
    scored = len(subset) if subset is not None else num_classes
    counter = AccuracyCounter(scored, topk=(1, 5))
    index = subset.indices.to(device) if subset is not None else None
    scorer = Scorer(model, protocol, index, fast)
    viewed = _Viewed(dataset, ViewTransform(protocol, normalization))
    loader = DataLoader(
        viewed,
        batch_size=batch_size,
        sampler=ShardSampler(len(viewed), ctx.rank, ctx.world_size),
        num_workers=num_workers,
        collate_fn=collate_views,
    )
    bar = ProgressBar(len(viewed), enabled=progress and ctx.is_main)
    start = time.perf_counter()
    for views, targets in loader:
        probs = scorer(views, device)
        if subset is not None:
            targets = subset.map_targets(targets)
        counter.update(probs, targets)
        # Ranks advance in lock-step, so world_size × batch approximates the global progress.
        bar.update(len(targets) * ctx.world_size)
    bar.close()
    seconds = max_across_ranks(time.perf_counter() - start, ctx)
    counter.load_tensor(sum_across_ranks(counter.as_tensor(), ctx))
    return EvalResult(counter, seconds, protocol, ctx.world_size)
