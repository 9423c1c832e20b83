"""Data-pipeline benchmark: the project's ImageNet train transform vs a plain Pillow baseline."""

from __future__ import annotations

import contextlib
import importlib.util
import math
import random
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from resnext.data import jpeg_crop, jpeg_restart
from resnext.data.planned import CropDecodeJob
from resnext.errors import ConfigError, DataError
from resnext.speed.measure import interleaved, ratios, time_call

_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)


@dataclass(frozen=True)
class DataConfig:
    """What one data benchmark run measures."""

    root: Path
    limit: int = 200
    rounds: int = 5
    size: int = 224
    # Loader worker counts to time the planned pipeline with (empty: skip the loader part).
    workers: tuple[int, ...] = ()

    def validate(self) -> None:
        if self.limit < 1 or self.rounds < 1:
            raise ConfigError("limit and rounds: expected integers >= 1")
        if any(w < 0 for w in self.workers):
            raise ConfigError(f"workers: expected counts >= 0, got {list(self.workers)}")


def list_images(root: Path, limit: int) -> list[Path]:
    """The first `limit` JPEG files of `root`, sorted; a DataError when there are none."""
    if not root.is_dir():
        raise DataError(f"data root {root}: not a folder of images")
    files = sorted(p for p in root.iterdir() if p.suffix.lower() in (".jpeg", ".jpg"))
    if not files:
        raise DataError(f"data root {root}: no .JPEG/.jpg files found")
    return files[:limit]


def pillow_baseline(size: int, seed: int = 0) -> Callable[[Path], torch.Tensor]:
    """Plain Pillow + numpy: decode, random-resized crop (8-100 %, 3/4-4/3), flip, normalise."""
    rng = random.Random(seed)

    def transform(path: Path) -> torch.Tensor:
        with Image.open(path) as img:
            img = img.convert("RGB")
        w, h = img.size
        box = (0, 0, w, h)
        for _ in range(10):
            area = w * h * rng.uniform(0.08, 1.0)
            ratio = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
            cw, ch = round(math.sqrt(area * ratio)), round(math.sqrt(area / ratio))
            if 0 < cw <= w and 0 < ch <= h:
                left, top = rng.randint(0, w - cw), rng.randint(0, h - ch)
                box = (left, top, left + cw, top + ch)
                break
        img = img.resize((size, size), Image.Resampling.BICUBIC, box=box)
        if rng.random() < 0.5:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        arr = (np.asarray(img, dtype=np.float32) / 255.0 - _MEAN) / _STD
        return torch.from_numpy(arr.transpose(2, 0, 1).copy())

    return transform


def project_train(size: int, seed: int = 0) -> Callable[[Path], torch.Tensor]:
    """resnext.data: load_rgb + the imagenet_train preset (fb.resnet.torch augmentation)."""
    from resnext.data.images import load_rgb
    from resnext.data.presets import imagenet_train

    transform = imagenet_train(size, generator=torch.Generator().manual_seed(seed))
    return lambda path: transform(load_rgb(path))


def project_train_no_color(size: int, seed: int = 0) -> Callable[[Path], torch.Tensor]:
    """The project's train preset without colour jitter and lighting (the baseline's work)."""
    from resnext.data.images import load_rgb
    from resnext.data.presets import imagenet_train

    gen = torch.Generator().manual_seed(seed)
    transform = imagenet_train(size, jitter=0.0, lighting_std=0.0, generator=gen)
    return lambda path: transform(load_rgb(path))


def project_planned(
    size: int, seed: int = 0, *, color: bool = True, batch: int = 32, decoder: str = "pillow"
) -> Callable[[list[Path]], list[torch.Tensor]]:
    """The planned path: crop drawn from the header, reduced-scale decode, one-pass crop/resize/flip to
    uint8; then, per batch of `batch`, colour jitter + lighting (if `color`) and normalisation."""
    from resnext.data.planned import PlannedRandomResizedCrop, load_planned
    from resnext.data.presets import imagenet_batch

    transform = PlannedRandomResizedCrop(size, generator=torch.Generator().manual_seed(seed))
    finish = imagenet_batch(train=color)
    gen = torch.Generator().manual_seed(seed)

    def run(paths: list[Path]) -> list[torch.Tensor]:
        out = []
        for start in range(0, len(paths), batch):
            chunk = paths[start : start + batch]
            images = [load_planned(p, transform, decoder=decoder) for p in chunk]
            out.append(finish(torch.stack(images), generator=gen))
        return out

    return run


class _PlannedFiles(torch.utils.data.Dataset):
    """A flat list of image files through a planned transform (uint8 HWC out)."""

    def __init__(self, files: list[Path], size: int, decoder: str) -> None:
        from resnext.data.planned import PlannedRandomResizedCrop

        self.files, self.decoder = files, decoder
        self.transform = PlannedRandomResizedCrop(size, generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> torch.Tensor:
        from resnext.data.planned import load_planned

        return load_planned(self.files[index], self.transform, decoder=self.decoder)


def loader_scaling(
    files: list[Path], size: int, workers: tuple[int, ...], rounds: int, decoder: str = "auto"
) -> dict[str, float]:
    """Images/s through the training's own loader (`train.data_setup.train_loader`: its sampler,
    each sample's augmentation seeded for its index; batch 32, uint8) plus the batch stage, per
    worker count."""
    from resnext.data.presets import imagenet_batch
    from resnext.train.data_setup import train_loader

    finish = imagenet_batch(train=True)
    dataset = _PlannedFiles(files, size, decoder)
    rates: dict[str, float] = {}
    for n in workers:
        # the workers kept between passes: the first pass, which starts them, is not counted
        loader, _ = train_loader(
            dataset,
            global_batch=min(32, len(files)),
            seed=0,
            rank=0,
            world_size=1,
            accum_steps=1,
            workers=n,
            pin_memory=False,
            persistent_workers=True,
        )
        best = 0.0
        for _ in range(rounds + 1):  # the first pass starts the workers: not counted
            start = time.perf_counter()
            count = sum(finish(batch).shape[0] for batch in loader)
            best = max(best, count / (time.perf_counter() - start))
        rates[str(n)] = best if rounds else 0.0
        del loader
    return rates


@dataclass(frozen=True)
class _CropJobData:
    """One file's bytes, crop plan and decode job, fixed so every step is timed on the same work."""

    data: bytes
    flip: bool
    job: CropDecodeJob
    indexed: bytes | None  # the file with restart markers (jpeg_restart), where that builds


def _crop_jobs(files: list[Path], size: int, seed: int) -> tuple[list[_CropJobData], int]:
    """The crop decoder's job for each file it takes, and how many files it leaves to Pillow."""
    from resnext.data.planned import (
        PlannedRandomResizedCrop,
        crop_decodable_size,
        crop_decode_job,
    )

    transform = PlannedRandomResizedCrop(size, generator=torch.Generator().manual_seed(seed))
    jobs, skipped = [], 0
    for path in files:
        data = path.read_bytes()
        full = crop_decodable_size(data)
        if full is None:
            skipped += 1
            continue
        plan = transform.plan(*full)
        job = crop_decode_job(plan, full, transform.size)
        jobs.append(_CropJobData(data, plan.flip, job, _restart_indexed(data)))
    return jobs, skipped


def decoded_crops(
    files: list[Path], size: int, seed: int = 0
) -> list[tuple[np.ndarray, tuple[float, float, float, float], bool]]:
    """Each file's random-resized crop as the crop path hands it to resampling: the decoded
    region (in a buffer the size of the image at its DCT scale), the box in that buffer's pixels,
    and the flip. Files the crop decoder does not take are left out."""
    from resnext.data.planned import decode_job

    out = []
    for j in _crop_jobs(files, size, seed)[0]:
        canvas = np.zeros((j.job.scaled[1], j.job.scaled[0], 3), np.uint8)
        decode_job(j.data, j.job, canvas)
        out.append((canvas, j.job.box, j.flip))
    return out


def _restart_indexed(data: bytes) -> bytes | None:
    """`data` rewritten with restart markers, or None where that cannot be built or libjpeg
    refuses the file (the loader then takes its usual path for it)."""
    if jpeg_restart.unavailable_reason() is not None:
        return None
    try:
        return jpeg_restart.add_restarts(data)
    except jpeg_restart.RestartRewriteFailed:
        return None


def crop_path_breakdown(
    files: list[Path], size: int, rounds: int, seed: int = 0
) -> dict[str, object]:
    """Milliseconds per image of each step of the crop-decoder path on one fixed set of crops, and
    the floor under its decode: entropy-decoding the file down to the crop's last row.

    A baseline JPEG's Huffman-coded data has no row index, so any exact decoder of a crop must
    read every bit above the crop's bottom; that step alone (our decoder asked for one row at the
    crop's bottom: libjpeg skips the rows above without inverse DCT) bounds what decoding can
    reach. The steps are timed one at a time (best of `rounds`), not interleaved.
    """
    from resnext.data import resample
    from resnext.data.planned import decode_job
    from resnext.data.presets import imagenet_batch

    if jpeg_crop.unavailable_reason() is not None or resample.unavailable_reason() is not None:
        reason = jpeg_crop.unavailable_reason() or resample.unavailable_reason()
        raise ConfigError(f"crop path breakdown needs the crop decoder and resampler: {reason}")
    jobs, skipped = _crop_jobs(files, size, seed)
    if not jobs:
        raise DataError("crop path breakdown: no file the crop decoder takes")
    canvases = [np.empty((j.job.scaled[1], j.job.scaled[0], 3), np.uint8) for j in jobs]

    def read() -> None:
        for path in files:
            path.read_bytes()

    def header() -> None:
        for j in jobs:
            jpeg_crop.read_header(j.data)

    def entropy_floor() -> None:
        for j in jobs:
            width = min(16, j.job.scaled[0])
            jpeg_crop.decode_region(j.data, j.job.denom, 0, j.job.region[3] - 1, width, 1)

    def region() -> None:
        for j, canvas in zip(jobs, canvases, strict=True):
            decode_job(j.data, j.job, canvas)

    def restart_region() -> None:
        for j, canvas in zip(jobs, canvases, strict=True):
            decode_job(j.indexed or j.data, j.job, canvas)

    def full() -> None:
        for j in jobs:
            w, h = j.job.scaled
            jpeg_crop.decode_region(j.data, j.job.denom, 0, 0, w, h)

    region()  # the canvases hold the decoded regions for the resampling step

    def resampling() -> None:
        for j, canvas in zip(jobs, canvases, strict=True):
            resample.resize_box(canvas, j.job.box, (size, size), "bicubic", j.flip)

    finish = imagenet_batch(train=True)
    batch = torch.from_numpy(
        np.stack(
            [
                resample.resize_box(c, j.job.box, (size, size), "bicubic")
                for j, c in zip(jobs[:32], canvases[:32], strict=True)
            ]
        )
    )
    gen = torch.Generator().manual_seed(seed)

    def batch_stage() -> None:
        finish(batch, generator=gen)

    steps = {
        "read_file": (read, len(files)),
        "read_header": (header, len(jobs)),
        "entropy_to_crop_bottom": (entropy_floor, len(jobs)),
        "region_decode": (region, len(jobs)),
        "region_decode_restart_indexed": (restart_region, len(jobs)),
        "full_decode": (full, len(jobs)),
        "resample_bicubic": (resampling, len(jobs)),
        "batch_stage": (batch_stage, batch.shape[0]),
    }
    ms = {}
    for name, (fn, count) in steps.items():
        fn()
        ms[name] = 1e3 * min(time_call(fn, 1) for _ in range(rounds)) / count
    path_ms = (
        ms["read_file"]
        + ms["read_header"]
        + ms["region_decode"]
        + ms["resample_bicubic"]
        + ms["batch_stage"]
    )
    result: dict[str, object] = {"images": len(jobs), "left_to_pillow": skipped}
    if all(j.indexed is not None for j in jobs):
        indexed_bytes = sum(len(j.indexed) for j in jobs)  # type: ignore[arg-type]
        result["restart_indexed_size_ratio"] = indexed_bytes / sum(len(j.data) for j in jobs)
    return result | {
        "ms_per_image": ms,
        "steps_sum_ms": path_ms,
        "ceiling_decode_only_img_per_s": 1e3 / ms["entropy_to_crop_bottom"],
        "ceiling_other_steps_as_measured_img_per_s": 1e3
        / (path_ms - ms["region_decode"] + ms["entropy_to_crop_bottom"]),
        "steps_sum_restart_indexed_ms": path_ms
        - ms["region_decode"]
        + ms["region_decode_restart_indexed"],
    }


def restart_indexed_copies(files: list[Path], folder: Path) -> list[Path]:
    """`files` rewritten with restart markers (`jpeg_restart.add_restarts`) into `folder`; a file
    libjpeg refuses is copied as it is (the loader then takes its usual path)."""
    out = []
    for i, path in enumerate(files):
        data = path.read_bytes()
        target = folder / f"{i:06d}{path.suffix}"
        target.write_bytes(_restart_indexed(data) or data)
        out.append(target)
    return out


def run_data_bench(config: DataConfig, log: Callable[[str], None] = print) -> dict[str, object]:
    """Images per second on one core (torch limited to one thread) for each pipeline."""
    config.validate()
    files = list_images(config.root, config.limit)
    with contextlib.ExitStack() as stack:  # removes the restart-indexed copies at the end
        return _run_data_bench(config, files, stack, log)


def _run_data_bench(
    config: DataConfig,
    files: list[Path],
    stack: contextlib.ExitStack,
    log: Callable[[str], None],
) -> dict[str, object]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        pipelines = {
            "pillow-baseline": pillow_baseline(config.size),
            "resnext-train": project_train(config.size),
            "resnext-train-no-color": project_train_no_color(config.size),
        }
        runners = {}
        for name, fn in pipelines.items():
            shape = tuple(fn(files[0]).shape)
            log(f"{name}: output {shape}")
            runners[name] = ((lambda fn=fn: [fn(p) for p in files]), len(files))
        # Batch-level pipelines: their per-batch colour work is inside the timed loop.
        batched = {
            "resnext-planned": project_planned(config.size),
            "resnext-planned-no-color": project_planned(config.size, color=False),
        }
        if importlib.util.find_spec("simplejpeg") is not None:
            batched["resnext-planned-simplejpeg"] = project_planned(
                config.size, decoder="simplejpeg"
            )
        else:
            log("simplejpeg not installed: resnext-planned-simplejpeg skipped")
        crop_problem = jpeg_crop.unavailable_reason()
        if crop_problem is None:
            batched["resnext-planned-crop"] = project_planned(config.size, decoder="crop")
        else:
            log(f"crop decoder unavailable ({crop_problem}): resnext-planned-crop skipped")
        inputs = {name: files for name in batched}
        if crop_problem is None and jpeg_restart.unavailable_reason() is None:
            # The same files rewritten with restart markers (pixels unchanged), untimed.
            scratch = tempfile.TemporaryDirectory(prefix="resnext-bench-restart-")
            stack.callback(scratch.cleanup)
            inputs["resnext-planned-crop-restart"] = restart_indexed_copies(
                files, Path(scratch.name)
            )
            batched["resnext-planned-crop-restart"] = project_planned(config.size, decoder="crop")
        for name, run in batched.items():
            log(f"{name}: output {tuple(run(inputs[name][:2])[0].shape)} per batch of 2")
            runners[name] = ((lambda run=run, f=inputs[name]: run(f)), len(files))
        timings = interleaved(runners, rounds=config.rounds, iters=1)
        breakdown = None
        if crop_problem is None:
            breakdown = crop_path_breakdown(files, config.size, config.rounds)
    finally:
        torch.set_num_threads(threads)
    result: dict[str, object] = {
        "images_per_round": len(files),
        "throughput_per_core": {k: t.as_dict() for k, t in timings.items()},
        "ratio_to_first": ratios(timings, "pillow-baseline"),
    }
    if breakdown is not None:
        result["crop_path_breakdown"] = breakdown
    if config.workers:
        result["loader_images_per_s"] = loader_scaling(
            files, config.size, config.workers, config.rounds
        )
        indexed = inputs.get("resnext-planned-crop-restart")
        if indexed is not None:
            result["loader_images_per_s_restart_indexed"] = loader_scaling(
                indexed, config.size, config.workers, config.rounds
            )
    return result


def summary_lines(result: dict[str, object]) -> list[str]:
    """Human-readable lines: img/s per core and ratio to the Pillow baseline."""
    ratio = result["ratio_to_first"]
    lines = [
        f"{key:28s} {row['throughput']:7.1f} img/s/core  ×{ratio[key]:.2f}"
        for key, row in result["throughput_per_core"].items()
    ]
    breakdown = result.get("crop_path_breakdown")
    if breakdown:
        steps = ", ".join(f"{k} {v:.3f}" for k, v in breakdown["ms_per_image"].items())
        lines.append(f"crop path, ms per image: {steps}")
        if "restart_indexed_size_ratio" in breakdown:
            lines.append(
                f"restart-indexed copies: {breakdown['restart_indexed_size_ratio']:.3f}x the bytes"
            )
        lines.append(
            "ceiling from entropy decoding alone: "
            f"{breakdown['ceiling_decode_only_img_per_s']:.0f} img/s/core; with the other steps "
            f"as measured: {breakdown['ceiling_other_steps_as_measured_img_per_s']:.0f}"
        )
    for n, rate in result.get("loader_images_per_s", {}).items():
        lines.append(f"loader, planned + batch stage, {n} workers: {rate:7.1f} img/s")
    for n, rate in result.get("loader_images_per_s_restart_indexed", {}).items():
        lines.append(f"loader, same on restart-indexed copies, {n} workers: {rate:7.1f} img/s")
    return lines
