"""What a checkpoint holds, and how a run's objects are saved into and restored from it."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from resnext.config import Config, config_to_dict
from resnext.config.schema import CIFAR_KINDS
from resnext.errors import CheckpointError, ConfigError
from resnext.train.checkpoint import capture_rng, load_checkpoint, restore_rng
from resnext.train.metrics import Meter
from resnext.weights.run_checkpoint import RUN_FORMAT

FORMAT = RUN_FORMAT


@dataclass
class Position:
    """Where the run is: epoch in progress (0-based), steps done in it, steps done in all."""

    epoch: int = 0
    step_in_epoch: int = 0
    global_step: int = 0
    meter: Meter = field(default_factory=Meter)
    epoch_seconds: float = 0.0
    history: list[dict[str, Any]] = field(default_factory=list)
    best_top1_err: float = float("inf")
    best_epoch: int = 0


@dataclass
class Trainables:
    """The objects whose state a checkpoint carries."""

    model: nn.Module  # the unwrapped network
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler | None
    # the training set's class names, if it has them: saved so that predictions can name classes
    class_names: tuple[str, ...] | None = None


def micro_batch(cfg: Config, world_size: int) -> dict[str, int]:
    """How a global batch is split: processes, micro-batches per process step, and the images
    in each micro-batch (what batch norm normalises together)."""
    splits = world_size * cfg.optim.accum_steps
    return {
        "world_size": world_size,
        "accum_steps": cfg.optim.accum_steps,
        "images": cfg.data.batch_size // splits,
    }


def make_payload(
    cfg: Config, parts: Trainables, pos: Position, sampler_state: dict, world_size: int = 1
) -> dict:
    """The checkpoint dict of the run at `pos`, trained by `world_size` processes."""
    sched = parts.scheduler.state_dict()
    # The schedule's shape comes from the config at load time (a resumed run may extend epochs).
    sched["lr_lambdas"] = [None] * len(sched.get("lr_lambdas", []))
    return {
        "format": FORMAT,
        "model": parts.model.state_dict(),
        "optimizer": parts.optimizer.state_dict(),
        "scheduler": sched,
        "scaler": parts.scaler.state_dict() if parts.scaler is not None else None,
        "epoch": pos.epoch,
        "step_in_epoch": pos.step_in_epoch,
        "global_step": pos.global_step,
        "meter": pos.meter.state_dict(),
        "epoch_seconds": pos.epoch_seconds,
        "history": pos.history,
        "best": {"top1_err": pos.best_top1_err, "epoch": pos.best_epoch},
        "rng": capture_rng(),
        "sampler": sampler_state,
        "config": config_to_dict(cfg),
        "micro_batch": micro_batch(cfg, world_size),
        "class_names": list(parts.class_names) if parts.class_names is not None else None,
    }


# The config keys a resumed run may change: where the run and its data are, how long it runs,
# how often it logs, validates and checkpoints, and how (device, precision, kernels, threads) it
# computes. Any other difference would make the saved config describe a run that did not happen
# (the restored schedule, sampler and step count follow the checkpoint); docs/training.md lists these.
RESUMABLE_KEYS = frozenset(
    {
        "name",
        "output_dir",
        "data.root",
        "data.eval_batch_size",
        "data.workers",
        "data.pin_memory",
        "data.strict",
        "train.epochs",
        "train.resume",
        "train.log_every",
        "train.eval_every",
        "train.checkpoint_every",
        "train.device",
        "train.threads",
        "train.amp",
        "train.channels_last",
        "train.compile",
        "train.fused_bn",
        "train.grouped_kernels",
        "train.gemm_weight_grad",
        "train.fp16_products",
        "train.fast_maxpool",
        "train.merge_groups",
        "train.timing_cache",
        "train.grad_checkpointing",
        "train.keep_memory",
        "train.cudnn_benchmark",
    }
)


def flat_config(tree: Any, prefix: str = "") -> dict[str, Any]:
    """A nested config dict as dotted keys (`optim.lr`: value; tuples as lists)."""
    if not isinstance(tree, dict):
        return {prefix: list(tree) if isinstance(tree, tuple) else tree}
    out: dict[str, Any] = {}
    for key, value in tree.items():
        out.update(flat_config(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def absolute_path(path: str) -> str:
    """`path` made absolute where it is a relative path to something that exists (a weights tag
    or a missing file stays as it is)."""
    if path and not Path(path).is_absolute() and Path(path).exists():
        return str(Path(path).resolve())
    return path


def check_resume_config(
    path: Path,
    saved: dict[str, Any] | None,
    cfg: Config,
    saved_split: dict[str, int] | None = None,
    world_size: int = 1,
) -> None:
    """Refuse to resume the checkpoint at `path` (whose run had config `saved`, its batches split
    as `saved_split`) under a config that differs in a key outside RESUMABLE_KEYS, or on
    `world_size` processes whose micro-batches would hold another number of images; one
    ConfigError names every such key.

    `optim.accum_steps` may change where it keeps the micro-batch: W processes resumed on one
    with accum_steps W compute the same steps."""
    if not isinstance(saved, dict):
        return  # a checkpoint without its config: nothing to compare
    split = micro_batch(cfg, world_size)
    if not (
        isinstance(saved_split, dict)
        and all(isinstance(saved_split.get(k), int) and saved_split[k] > 0 for k in split)
    ):
        saved_split = None  # a checkpoint from before the split was saved: accum_steps stays
    free = RESUMABLE_KEYS | ({"optim.accum_steps"} if saved_split is not None else set())
    old, new = flat_config(saved), flat_config(config_to_dict(cfg))
    for flat in (old, new):  # runs before this one saved their fine-tuning source relative
        if isinstance(flat.get("finetune.source"), str):
            flat["finetune.source"] = absolute_path(flat["finetune.source"])
    if new.get("data.kind") not in CIFAR_KINDS:
        # Runs saved before these were refused outside CIFAR trained without them: turned off,
        # they describe what those runs did.
        free |= {k for k in ("data.cutout", "data.trivial_augment") if not new.get(k)}
    changed = sorted(
        key
        for key in old.keys() | new.keys()
        if key not in free and old.get(key, "<unset>") != new.get(key, "<unset>")
    )
    if changed:
        diffs = "; ".join(
            f"{key}: {old.get(key, '<unset>')!r} -> {new.get(key, '<unset>')!r}" for key in changed
        )
        raise ConfigError(
            f"train.resume: checkpoint {path} was trained with another config ({diffs}); a "
            "resumed run keeps its recipe (only where, how long and how it runs may change): "
            "start a new run in another output_dir to change it"
        )
    if saved_split is not None and saved_split["images"] != split["images"]:
        then = saved_split["world_size"] * saved_split["accum_steps"]
        hint = (
            f"; optim.accum_steps={then // world_size} keeps it"
            if then % world_size == 0 and then // world_size >= 1
            else ""
        )
        raise ConfigError(
            f"train.resume: checkpoint {path} was trained on micro-batches of "
            f"{saved_split['images']} images ({saved_split['world_size']} processes × "
            f"optim.accum_steps {saved_split['accum_steps']}); this start would use "
            f"{split['images']} ({world_size} × {split['accum_steps']}), which batch norm "
            f"normalises differently, so the resumed run would not continue the same "
            f"training{hint}"
        )


# The entries `restore` reads without a default (make_payload writes them all).
_REQUIRED = (
    "model",
    "optimizer",
    "scheduler",
    "scaler",
    "epoch",
    "step_in_epoch",
    "global_step",
    "rng",
)


def restore(path: Path, parts: Trainables, cfg: Config, world_size: int = 1) -> Position:
    """Load a checkpoint of a run with config `cfg` (up to RESUMABLE_KEYS), resumed on
    `world_size` processes, into the run's objects (wherever they live) and RNGs; return the
    position to continue from."""
    # Read onto the CPU: the RNG states must be CPU tensors (torch.set_rng_state, NumPy), and
    # load_state_dict copies the rest onto the device the model and optimizer live on.
    ckpt = load_checkpoint(path, map_location="cpu")
    if ckpt.get("format") != FORMAT:
        raise CheckpointError(
            f"checkpoint {path}: format {ckpt.get('format')!r}, expected {FORMAT}"
        )
    missing = [key for key in _REQUIRED if key not in ckpt]
    if missing:
        raise CheckpointError(
            f"checkpoint {path}: incomplete, no {', '.join(map(repr, missing))} entry"
        )
    check_resume_config(path, ckpt.get("config"), cfg, ckpt.get("micro_batch"), world_size)
    try:
        parts.model.load_state_dict(ckpt["model"])
        parts.optimizer.load_state_dict(ckpt["optimizer"])
        parts.scheduler.load_state_dict(ckpt["scheduler"])
        if parts.scaler is not None and ckpt["scaler"] is not None:
            parts.scaler.load_state_dict(ckpt["scaler"])
    except (RuntimeError, ValueError, KeyError) as exc:
        raise CheckpointError(
            f"checkpoint {path}: does not fit this run's model/optimizer ({exc})"
        ) from exc
    try:
        restore_rng(ckpt["rng"])
    except (KeyError, TypeError, ValueError, IndexError, RuntimeError) as exc:
        raise CheckpointError(f"checkpoint {path}: unusable RNG state ({exc!r})") from exc
    best = ckpt.get("best") or {}
    return Position(
        epoch=int(ckpt["epoch"]),
        step_in_epoch=int(ckpt["step_in_epoch"]),
        global_step=int(ckpt["global_step"]),
        meter=Meter.from_state(ckpt.get("meter")),
        epoch_seconds=float(ckpt.get("epoch_seconds", 0.0)),
        history=list(ckpt.get("history", [])),
        best_top1_err=float(best.get("top1_err", float("inf"))),
        best_epoch=int(best.get("epoch", 0)),
    )
