"""`train(config)`: the whole run, from datasets to the last checkpoint, logs and curve figure."""

from __future__ import annotations

import json
import os
import random
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import Dataset

from resnext.config import Config, config_to_dict, save_config
from resnext.data.registry import dataset_class_names
from resnext.errors import ConfigError
from resnext.io.atomic import write_text
from resnext.speed import autotune
from resnext.speed.allocator import keep_freed_memory
from resnext.speed.capability import bf16_speedup
from resnext.speed.conv_guard import guard_conv_backward
from resnext.speed.timing_cache import TimingCache
from resnext.speed.train_paths import use_training_fast_paths
from resnext.train import provenance
from resnext.train.checkpoint import atomic_save
from resnext.train.data_setup import (
    batch_transforms,
    build_splits,
    class_count,
    eval_loader,
    seed_loader,
    train_loader,
)
from resnext.train.distributed import (
    DistInfo,
    broadcast_object,
    gather_object,
    init_distributed,
    on_every_rank,
    on_main,
)
from resnext.train.evaluate import evaluate
from resnext.train.finetune import frozen_modules, prefetch_source
from resnext.train.logs import MetricsLog
from resnext.train.loop import StepContext, train_one_epoch
from resnext.train.metrics import Meter
from resnext.train.mixing import BatchMixer
from resnext.train.model_setup import (
    build_network,
    merge_groups_for_training,
    place,
    wrap_distributed,
)
from resnext.train.optim import build_optimizer, build_scheduler, resolve_lr
from resnext.train.plot import plot_curves
from resnext.train.precision import (
    fp16_products_offer,
    fp16_products_unused,
    make_scaler,
    resolve_amp,
)
from resnext.train.progress import Progress
from resnext.train.state import (
    Position,
    Trainables,
    absolute_path,
    flat_config,
    make_payload,
    restore,
)

# Called after every optimiser step with (epoch, steps done in the epoch, global step).
UserHook = Callable[[int, int, int], None]


@dataclass(frozen=True)
class TrainResult:
    """The outcome of a run: where it lives, how far it got, and its final and best errors (%)."""

    run_dir: Path
    epochs_completed: int
    global_step: int
    final: dict[str, Any]
    best_val_top1_err: float
    best_epoch: int
    history: tuple[dict[str, Any], ...]
    last_checkpoint: Path
    best_checkpoint: Path | None
    wall_time_s: float

    @property
    def val_top1_acc(self) -> float:
        """Final top-1 accuracy on the validation split, in percent."""
        return 100.0 - float(self.final.get("val_top1_err", 100.0))


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch so model initialisation is reproducible."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def _checkpoint_paths(run_dir: Path) -> tuple[Path, Path]:
    folder = run_dir / "checkpoints"
    return folder / "last.pt", folder / "best.pt"


def _resume_path(cfg: Config, last: Path) -> Path | None:
    if cfg.train.resume == "never":
        return None
    if cfg.train.resume == "auto":
        return last if last.is_file() else None
    return Path(cfg.train.resume)


def _check_output_dir(run_dir: Path) -> None:
    """Refuse, before anything is written, a run folder that cannot be created or written."""
    probe = run_dir
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise ConfigError(
            f"output_dir: {run_dir} cannot be created: {probe} exists and is not a folder"
        )
    try:  # a folder made and removed: os.access answers yes to root on read-only mounts
        os.rmdir(tempfile.mkdtemp(prefix=".resnext-probe-", dir=probe))
    except OSError as exc:
        raise ConfigError(
            f"output_dir: {probe} is not writable (needed for the run folder {run_dir}): {exc}"
        ) from exc
    folder = _checkpoint_paths(run_dir)[0].parent
    if folder.exists() and not folder.is_dir():
        raise ConfigError(
            f"output_dir: {folder} exists and is not a folder (the run keeps its checkpoints there)"
        )


def _check_same_everywhere(info: DistInfo, what: str, values: dict[str, Any]) -> None:
    """A ConfigError on every rank where the ranks' `values` differ: processes given different
    configs (or different copies of the data) would wait on each other's collectives until a
    timeout, or train on overlapping samples."""
    every = cast(list[dict[str, Any]], gather_object(info, values))
    for rank, theirs in enumerate(every[1:], start=1):
        ours = every[0]
        diff = [
            f"{key}={theirs.get(key, '<unset>')!r} against rank 0's {ours.get(key, '<unset>')!r}"
            for key in sorted(ours.keys() | theirs.keys())
            if theirs.get(key, "<unset>") != ours.get(key, "<unset>")
        ]
        if diff:
            raise ConfigError(
                f"{what}: rank {rank} was given another {what} than rank 0 ({'; '.join(diff[:4])}); "
                f"expected every process to get the same {what}"
            )


def _refuse_earlier_run(run_dir: Path) -> None:
    """Refuse to start over in a folder holding another run's checkpoints: its last.pt, best.pt,
    result.json and curves would stay beside the new run's files, and a later resume=auto would
    continue the old checkpoint under the new config."""
    found = [p.name for p in _checkpoint_paths(run_dir) if p.is_file()]
    if found:
        raise ConfigError(
            f"output_dir: {run_dir} already holds a run's checkpoints ({', '.join(found)}); "
            "train.resume=never starts a new run: pick another output_dir (or name), or remove "
            f"{run_dir} first (train.resume=auto continues the run there)"
        )


def train(
    config: Config,
    *,
    train_set: Dataset | None = None,
    val_set: Dataset | None = None,
    on_step: UserHook | None = None,
) -> TrainResult:
    """Train (or resume) the run `config` describes; datasets default to the config's data section."""
    t_start = time.perf_counter()
    cfg = config
    info = init_distributed(cfg.train.device)
    owns_group = info.distributed
    # train.threads holds for the run only: a caller's later work keeps its own thread count
    threads = torch.get_num_threads()
    try:
        return _run(cfg, info, train_set, val_set, on_step, t_start)
    finally:
        torch.set_num_threads(threads)
        if owns_group and dist.is_initialized():
            dist.destroy_process_group()


def _run(
    cfg: Config,
    info: DistInfo,
    train_set: Dataset | None,
    val_set: Dataset | None,
    on_step: UserHook | None,
    t_start: float,
) -> TrainResult:
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    if cfg.train.keep_memory and info.device.type == "cpu":
        keep_freed_memory()
    if info.device.type == "cuda":
        torch.backends.cudnn.benchmark = cfg.train.cudnn_benchmark
    _check_same_everywhere(info, "config", flat_config(config_to_dict(cfg)))
    # Relative paths made absolute once, so that the saved config, the checkpoints' copies of it
    # and a later resume from another directory all name the same files.
    cfg = replace(
        cfg,
        data=replace(cfg.data, root=absolute_path(cfg.data.root)),
        finetune=replace(cfg.finetune, source=absolute_path(cfg.finetune.source)),
    )
    run_dir = Path(cfg.resolved_output_dir())
    last_path, best_path = _checkpoint_paths(run_dir)
    # Rank 0 checks the run folder and hands its verdict to every rank: the others would
    # otherwise go on into the next collective and fail there with a broken-connection error.
    refusal = None
    if info.is_main:
        try:
            _check_output_dir(run_dir)
            if cfg.train.resume == "never":
                _refuse_earlier_run(run_dir)
        except ConfigError as exc:
            if not info.distributed:
                raise
            refusal = str(exc)
    refusal = broadcast_object(refusal)
    if refusal is not None:
        raise ConfigError(str(refusal))
    if train_set is None or val_set is None:
        splits = on_every_rank(info, lambda: build_splits(cfg.data))
        train_set = splits.train if train_set is None else train_set
        val_set = splits.val if val_set is None else val_set
    sizes = {"train images": len(train_set), "validation images": len(val_set)}  # type: ignore[arg-type]
    _check_same_everywhere(info, "data", sizes)
    seed_everything(cfg.train.seed)
    if cfg.finetune.source:
        # Rank 0 downloads a tag's file first; the other ranks then read it from the cache.
        on_main(info, lambda: prefetch_source(cfg.model.name, cfg.finetune.source))
    raw = on_every_rank(info, lambda: build_network(cfg, class_count(train_set)))
    raw = place(raw, info.device, cfg.train.channels_last)
    raw.set_grad_checkpointing(cfg.train.grad_checkpointing)
    use_training_fast_paths(
        raw,
        fused_bn=cfg.train.fused_bn,
        grouped_kernels=cfg.train.grouped_kernels,
        gemm_weight_grad=cfg.train.gemm_weight_grad,
        fast_maxpool=cfg.train.fast_maxpool,
        fp16_products=cfg.train.fp16_products,
    )
    # `auto` measures bf16 against float32 on each process's CPU; one precision for the job
    amp_dtype = broadcast_object(resolve_amp(cfg.train.amp, info.device))
    if info.device.type == "cpu":
        guard_conv_backward(raw)  # where torch's weight gradients go wrong
    unused = fp16_products_unused(amp_dtype, info.device) if cfg.train.fp16_products else None
    if unused and info.is_main:
        print(f"train.fp16_products: not used, {unused}", flush=True)
    # a run on the 1×1 fast path is told of the faster products its CPU has
    offer = (
        fp16_products_offer(raw, amp_dtype, info.device)
        if cfg.train.gemm_weight_grad and not cfg.train.fp16_products
        else None
    )
    if offer and info.is_main:
        print(f"note: {offer}", flush=True)
    merges: dict[str, int] = {}
    if cfg.train.merge_groups:
        merges = merge_groups_for_training(
            raw,
            micro_batch=cfg.data.batch_size // (info.world_size * cfg.optim.accum_steps),
            image_size=cfg.data.image_size,
            device=info.device,
            channels_last=cfg.train.channels_last,
            amp_dtype=amp_dtype,
        )
    model = wrap_distributed(raw, info.device, info.world_size, cfg.train.sync_bn)
    if cfg.train.sync_bn and info.world_size > 1:
        raw = model.module  # the converted network (SyncBatchNorm layers) inside DDP
    net: nn.Module = torch.compile(model) if cfg.train.compile else model

    loader, sampler = train_loader(
        train_set,
        global_batch=cfg.data.batch_size,
        seed=cfg.train.seed,
        rank=info.rank,
        world_size=info.world_size,
        accum_steps=cfg.optim.accum_steps,
        workers=cfg.data.workers,
        pin_memory=cfg.data.pin_memory,
    )
    val_loader = eval_loader(
        val_set,
        batch_size=cfg.data.eval_batch_size,
        rank=info.rank,
        world_size=info.world_size,
        workers=cfg.data.workers,
        pin_memory=cfg.data.pin_memory,
    )
    steps = sampler.steps_per_epoch
    peak_lr = resolve_lr(cfg.optim, cfg.data.batch_size)
    optimizer = build_optimizer(raw, cfg.optim, peak_lr)
    scheduler = build_scheduler(optimizer, cfg.schedule, steps, cfg.train.epochs, peak_lr)
    parts = Trainables(
        raw,
        optimizer,
        scheduler,
        make_scaler(amp_dtype, info.device),
        class_names=dataset_class_names(train_set, raw.num_classes),
    )

    resume_from = _resume_path(cfg, last_path)
    pos = (
        restore(resume_from, parts, cfg, info.world_size) if resume_from is not None else Position()
    )
    if not info.is_main:
        pos.meter = Meter()  # the saved meter is the sum over all ranks: rank 0 carries it on

    def write_start() -> None:
        # Written only now that data, batch and resume point are known good: a run that cannot
        # start leaves nothing behind.
        run_dir.mkdir(parents=True, exist_ok=True)
        # Saved with resume=auto: `--config RUN/config.toml` continues this run from its own
        # last.pt (what this start resumed from is in the provenance record).
        save_config(_as_saved(cfg), run_dir)
        record = provenance.collect(info.device, info.world_size)
        record["resumed_from"] = str(resume_from) if resume_from else None
        record["resumed_at"] = {"epoch": pos.epoch, "step_in_epoch": pos.step_in_epoch}
        record["peak_lr"] = peak_lr
        record["group_merges"] = merges
        record["amp_dtype"] = str(amp_dtype).replace("torch.", "") if amp_dtype else "float32"
        if cfg.train.amp == "auto" and info.device.type == "cpu":
            record["bf16_speedup"] = bf16_speedup()  # what `auto` chose by
        name = (
            "provenance.json"
            if resume_from is None
            else f"provenance-resume-{pos.global_step}.json"
        )
        write_text(run_dir / name, json.dumps(record, indent=2) + "\n")

    on_main(info, write_start)
    batches = batch_transforms(cfg.data)
    ctx = StepContext(
        model=net,
        optimizer=optimizer,
        scheduler=scheduler,
        scaler=parts.scaler,
        criterion=nn.CrossEntropyLoss(label_smoothing=cfg.optim.label_smoothing),
        device=info.device,
        amp_dtype=amp_dtype,
        channels_last=cfg.train.channels_last,
        accum_steps=cfg.optim.accum_steps,
        grad_clip=cfg.optim.grad_clip,
        distributed=info.distributed,
        batch_transform=batches.train,
        mixer=_mixer(cfg, raw.num_classes),
        draw_seed=cfg.train.seed if raw.spec.drop_rate or raw.spec.drop_path_rate else None,
        first_stream=info.rank * cfg.optim.accum_steps,
        streams=info.world_size * cfg.optim.accum_steps,
    )
    log = MetricsLog(run_dir, pos.history, enabled=info.is_main)
    epoch_start = [time.perf_counter()]
    chooses = cfg.train.grouped_kernels or cfg.train.gemm_weight_grad
    timings = TimingCache() if chooses and cfg.train.timing_cache else None
    try:
        with autotune.CHOOSER.using(timings):
            while pos.epoch < cfg.train.epochs:
                _train_epoch(
                    cfg, info, ctx, parts, pos, loader, sampler, steps, on_step, epoch_start
                )
                _end_epoch(
                    cfg, info, ctx, parts, pos, (val_loader, batches.val), sampler, log, epoch_start
                )
                if chooses:
                    on_main(info, lambda: _save_fast_path_choices(run_dir))
    finally:
        log.close()
    if pos.history:
        title = f"{cfg.name} ({cfg.model.name})"
        on_main(info, lambda: plot_curves(pos.history, run_dir / "curves.png", title=title))
    final = pos.history[-1] if pos.history else {}
    result = TrainResult(
        run_dir=run_dir,
        epochs_completed=pos.epoch,
        global_step=pos.global_step,
        final=final,
        best_val_top1_err=pos.best_top1_err,
        best_epoch=pos.best_epoch,
        history=tuple(pos.history),
        last_checkpoint=last_path,
        best_checkpoint=best_path if best_path.is_file() else None,
        wall_time_s=time.perf_counter() - t_start,
    )
    summary = {
        "epochs_completed": result.epochs_completed,
        "global_step": result.global_step,
        "final": final,
        "best_val_top1_err": result.best_val_top1_err,
        "best_epoch": result.best_epoch,
        "wall_time_s": result.wall_time_s,
    }
    on_main(info, lambda: write_text(run_dir / "result.json", json.dumps(summary, indent=2) + "\n"))
    return result


def _save_fast_path_choices(run_dir: Path) -> None:
    """Write which implementation each fast-path op ran at each shape (timing chose them on this
    CPU) to fast_path_choices.json, replaced whole after every epoch so a killed run keeps it."""
    choices = [d.as_dict() for d in autotune.decisions()]
    write_text(run_dir / "fast_path_choices.json", json.dumps(choices, indent=2) + "\n")


def _as_saved(cfg: Config) -> Config:
    """The config a run saves: resume=auto, so that `--config RUN/config.toml` continues the run
    (its relative paths were made absolute when it started, so it does from any directory)."""
    return replace(cfg, train=replace(cfg.train, resume="auto"))


def _mixer(cfg: Config, num_classes: int) -> BatchMixer | None:
    d = cfg.data
    if not (d.mixup_alpha or d.cutmix_alpha):
        return None
    return BatchMixer(num_classes, d.mixup_alpha, d.cutmix_alpha)


def _train_mode(net: nn.Module, raw: nn.Module, frozen_stages: int) -> None:
    net.train()
    for module in frozen_modules(raw, frozen_stages):
        module.eval()


def _train_epoch(
    cfg: Config,
    info: DistInfo,
    ctx: StepContext,
    parts: Trainables,
    pos: Position,
    loader: Any,
    sampler: Any,
    steps: int,
    on_step: UserHook | None,
    epoch_start: list[float],
) -> None:
    """Train the rest of epoch `pos.epoch`, saving a step checkpoint every `checkpoint_every` steps."""
    _train_mode(ctx.model, parts.model, cfg.finetune.frozen_stages)
    sampler.set_epoch(pos.epoch, pos.step_in_epoch)
    seed_loader(loader, cfg.train.seed, pos.epoch)
    epoch_start[0] = time.perf_counter()
    last_path, _ = _checkpoint_paths(Path(cfg.resolved_output_dir()))
    progress = Progress(
        steps,
        f"epoch {pos.epoch + 1}/{cfg.train.epochs}",
        every=cfg.train.log_every,
        enabled=info.is_main,
        start=pos.step_in_epoch,
        processes=info.world_size,
    )

    def after_step(epoch: int, step: int, global_step: int, meter: Meter) -> None:
        pos.step_in_epoch, pos.global_step, pos.meter = step, global_step, meter
        every = cfg.train.checkpoint_every
        if every and global_step % every == 0 and step < steps:
            # Each rank's meter holds only its share of the epoch so far: the checkpoint keeps
            # their sum (a collective, so every rank takes part), which `_run` gives back to
            # rank 0 alone, so a resumed epoch counts every image once.
            summed = meter.reduced(info.device)

            def save() -> None:
                seconds = pos.epoch_seconds + time.perf_counter() - epoch_start[0]
                saved = Position(**{**pos.__dict__, "meter": summed, "epoch_seconds": seconds})
                payload = make_payload(cfg, parts, saved, sampler.state_dict(), info.world_size)
                atomic_save(payload, last_path)

            on_main(info, save)
        if on_step is not None:
            on_step(epoch, step, global_step)

    train_one_epoch(
        ctx,
        loader,
        epoch=pos.epoch,
        start_step=pos.step_in_epoch,
        global_step=pos.global_step,
        meter=pos.meter,
        progress=progress,
        on_step=after_step,
    )


def _end_epoch(
    cfg: Config,
    info: DistInfo,
    ctx: StepContext,
    parts: Trainables,
    pos: Position,
    val: tuple[Any, Any],
    sampler: Any,
    log: MetricsLog,
    epoch_start: list[float],
) -> None:
    """Evaluate, record the epoch, save `last` (and `best` when val top-1 error improved)."""
    seconds = pos.epoch_seconds + time.perf_counter() - epoch_start[0]
    train_meter = pos.meter.reduced(info.device)
    record: dict[str, Any] = {"epoch": pos.epoch + 1, "global_step": pos.global_step}
    record.update(train_meter.summary("train"))
    done = pos.epoch + 1
    validate = done % cfg.train.eval_every == 0 or done == cfg.train.epochs
    if validate:
        if info.distributed:
            # Each rank's BN running statistics saw only its own batches: evaluate, like the saved
            # checkpoint, with rank 0's. The unwrapped network avoids DDP's per-forward
            # collectives, which would hang when ranks hold different numbers of eval batches.
            for buffer in parts.model.buffers():
                dist.broadcast(buffer, src=0)
        val_loader, val_transform = val
        record.update(
            evaluate(
                parts.model,
                val_loader,
                info.device,
                amp_dtype=ctx.amp_dtype,
                channels_last=cfg.train.channels_last,
                flip=cfg.train.eval_flip,
                shift=cfg.train.eval_shift,
                batch_transform=val_transform,
            )
        )
    record["lr"] = ctx.optimizer.param_groups[0]["lr"]
    record["images_per_s"] = train_meter.count / seconds if seconds > 0 else 0.0
    record["epoch_time_s"] = seconds
    pos.history.append(record)
    pos.epoch += 1
    pos.step_in_epoch = 0
    pos.meter = Meter()
    pos.epoch_seconds = 0.0
    improved = validate and record["val_top1_err"] < pos.best_top1_err
    if improved:
        pos.best_top1_err, pos.best_epoch = record["val_top1_err"], pos.epoch

    def record_epoch() -> None:
        last_path, best_path = _checkpoint_paths(Path(cfg.resolved_output_dir()))
        sampler.set_epoch(pos.epoch, 0)
        payload = make_payload(cfg, parts, pos, sampler.state_dict(), info.world_size)
        atomic_save(payload, last_path)
        if improved:
            atomic_save(payload, best_path)
        log.write(record)
        val = (
            f"val top-1 err {record['val_top1_err']:.2f}% top-5 err {record['val_top5_err']:.2f}%"
            if validate
            else "not validated"
        )
        print(
            f"epoch {pos.epoch}/{cfg.train.epochs}: train loss {record['train_loss']:.4f} "
            f"top-1 err {record['train_top1_err']:.2f}% | {val} | "
            f"{record['images_per_s']:.0f} img/s {seconds:.1f}s",
            flush=True,
        )

    on_main(info, record_epoch)
