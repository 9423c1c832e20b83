"""Training: the `train(config)` entry point and its parts (optimiser, loop, checkpoints, logs)."""

from __future__ import annotations

from resnext.train.checkpoint import atomic_save, load_checkpoint
from resnext.train.evaluate import evaluate
from resnext.train.logs import read_metrics
from resnext.train.optim import build_optimizer, build_scheduler, resolve_lr
from resnext.train.runner import TrainResult, train

__all__ = [
    "TrainResult",
    "atomic_save",
    "build_optimizer",
    "build_scheduler",
    "evaluate",
    "load_checkpoint",
    "read_metrics",
    "resolve_lr",
    "train",
]
