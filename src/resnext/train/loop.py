"""One training epoch: accumulate micro-batches, check the loss is finite, step, schedule, report."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.data import DataLoader

from resnext.errors import TrainingError
from resnext.train.distributed import all_reduce_sum
from resnext.train.metrics import Meter
from resnext.train.mixing import BatchMixer
from resnext.train.precision import autocast
from resnext.train.progress import Progress


@dataclass
class StepContext:
    """Everything one optimisation step needs, fixed for the run."""

    model: nn.Module  # possibly DDP-wrapped
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler | None
    criterion: nn.Module
    device: torch.device
    amp_dtype: torch.dtype | None
    channels_last: bool
    accum_steps: int
    grad_clip: float
    distributed: bool
    batch_transform: Callable[[torch.Tensor], torch.Tensor] | None = None
    # Mixes each micro-batch into soft targets; the labels still score the training error.
    mixer: BatchMixer | None = None
    # Seed of the network's own draws (dropout, stochastic depth), None where it makes none, and
    # this process's first micro-batch stream (rank × accum_steps): see `micro_batch_draws`.
    draw_seed: int | None = None
    first_stream: int = 0
    streams: int = 1  # micro-batch streams of the job: world size × accum_steps


def to_model_input(
    images: torch.Tensor,
    device: torch.device,
    memory_format: torch.memory_format,
    batch_transform: Callable[[torch.Tensor], torch.Tensor] | None,
) -> torch.Tensor:
    """A loader batch on the device, through the batch stage when there is one, in `memory_format`."""
    if batch_transform is None:  # one transfer straight into the wanted layout
        return images.to(device, non_blocking=True, memory_format=memory_format)
    images = batch_transform(images.to(device, non_blocking=True))
    return images.contiguous(memory_format=memory_format)


# Called after every optimiser step with (epoch, steps done in this epoch, global step, meter).
StepHook = Callable[[int, int, int, Meter], None]


@contextlib.contextmanager
def micro_batch_draws(ctx: StepContext, global_step: int, micro: int) -> Iterator[None]:
    """Inside, the network's random draws come from a generator seeded by (run seed, step,
    stream), the stream being rank × accum_steps + micro-batch; the global generator is left as
    it was. Ranks then drop other images than each other (one seed for all would make every rank
    drop the same ones), a process accumulating W micro-batches draws as W processes do, and a
    resumed run draws as the uninterrupted one."""
    if ctx.draw_seed is None:
        yield
        return
    seed = micro_batch_seed(ctx.draw_seed, global_step, ctx.first_stream + micro, ctx.streams)
    devices = [ctx.device] if ctx.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def micro_batch_seed(run_seed: int, global_step: int, stream: int, streams: int) -> int:
    """The seed of one micro-batch's draws. Its low 32 bits, all that torch's CPU generator
    reads, count (step, stream) pairs one to one from an offset the run seed gives, so no two
    micro-batches of a run draw alike for 2**32 / `streams` steps; the run seed's hash fills
    the high 32 bits, which CUDA's generator reads too."""
    mixed = (run_seed * 0x9E3779B1) % 2**32  # odd multiplier: one to one on 32-bit seeds
    low = (global_step * streams + stream + mixed) % 2**32
    return (mixed << 32) | low


def _all_finite(loss: torch.Tensor, distributed: bool) -> bool:
    bad = torch.tensor([0.0 if torch.isfinite(loss).item() else 1.0], device=loss.device)
    if distributed:
        bad = all_reduce_sum(bad)
    return bad.item() == 0


def train_one_epoch(
    ctx: StepContext,
    loader: DataLoader,
    *,
    epoch: int,
    start_step: int,
    global_step: int,
    meter: Meter,
    progress: Progress,
    on_step: StepHook | None = None,
) -> int:
    """Run the loader's remaining steps of `epoch`; return the global step count after it.

    A non-finite loss stops before any weight changes, with a TrainingError naming the step.
    """
    memory_format = torch.channels_last if ctx.channels_last else torch.contiguous_format
    step = start_step
    for images, target in loader:
        images = to_model_input(images, ctx.device, memory_format, ctx.batch_transform)
        target = target.to(ctx.device, non_blocking=True)
        # One draw per step, every micro-batch mixed within itself: a process accumulating W
        # micro-batches then mixes exactly as W processes do, one micro-batch each.
        mix = ctx.mixer.draw(*images.shape[-2:]) if ctx.mixer is not None else None
        ctx.optimizer.zero_grad(set_to_none=True)
        micro_images = images.chunk(ctx.accum_steps)
        micro_targets = target.chunk(ctx.accum_steps)
        for m, (x, y) in enumerate(zip(micro_images, micro_targets, strict=True)):
            last = m == ctx.accum_steps - 1
            g = y
            if ctx.mixer is not None and mix is not None:
                x, g = ctx.mixer.apply(x, y, mix)
            # Gradients are all-reduced once per step, on the last micro-batch.
            sync = (
                ctx.model.no_sync()
                if ctx.distributed and not last and hasattr(ctx.model, "no_sync")
                else contextlib.nullcontext()
            )
            with sync, micro_batch_draws(ctx, global_step, m):
                with autocast(ctx.amp_dtype, ctx.device):
                    logits = ctx.model(x)
                loss = ctx.criterion(logits.float(), g)
                if not _all_finite(loss.detach(), ctx.distributed):
                    raise TrainingError(
                        f"non-finite loss ({float(loss.detach()):.4g}) at epoch {epoch + 1}, "
                        f"step {step + 1} of the epoch (global step {global_step + 1}); "
                        "stopped before updating the weights"
                    )
                scaled = loss / ctx.accum_steps
                if ctx.scaler is not None:
                    ctx.scaler.scale(scaled).backward()
                else:
                    scaled.backward()
            meter.add(float(loss.detach()), logits.detach(), y)
        if ctx.grad_clip > 0:
            if ctx.scaler is not None:
                ctx.scaler.unscale_(ctx.optimizer)
            torch.nn.utils.clip_grad_norm_(ctx.model.parameters(), ctx.grad_clip)
        if ctx.scaler is not None:
            ctx.scaler.step(ctx.optimizer)
            ctx.scaler.update()
        else:
            ctx.optimizer.step()
        ctx.scheduler.step()
        step += 1
        global_step += 1
        lr = ctx.optimizer.param_groups[0]["lr"]
        mean_loss = meter.loss_sum / max(1, meter.count)
        who = "rank-0 loss" if ctx.distributed else "loss"  # the epoch line sums every rank's
        progress.update(images.shape[0], f"{who} {mean_loss:.4f} lr {lr:.4g}")
        if on_step is not None:
            on_step(epoch, step, global_step, meter)
    if not math.isfinite(meter.loss_sum):
        raise TrainingError(f"non-finite running loss after epoch {epoch + 1}")
    return global_step
