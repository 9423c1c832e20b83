"""Data-pipeline benchmark: the project's ImageNet train transform vs a plain Pillow baseline."""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from resnext.errors import ConfigError, DataError
from resnext.speed.measure import interleaved, ratios

_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)


@dataclass(frozen=True)
class DataConfig:
    """What one data benchmark run measures."""

    root: Path
    limit: int = 200
    rounds: int = 5
    size: int = 224

    def validate(self) -> None:
        if self.limit < 1 or self.rounds < 1:
            raise ConfigError("limit and rounds: expected integers >= 1")


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


def run_data_bench(config: DataConfig, log: Callable[[str], None] = print) -> dict[str, object]:
    """Images per second on one core (torch limited to one thread) for each pipeline."""
    config.validate()
    files = list_images(config.root, config.limit)
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
        timings = interleaved(runners, rounds=config.rounds, iters=1)
    finally:
        torch.set_num_threads(threads)
    return {
        "images_per_round": len(files),
        "throughput_per_core": {k: t.as_dict() for k, t in timings.items()},
        "ratio_to_first": ratios(timings, "pillow-baseline"),
    }


def summary_lines(result: dict[str, object]) -> list[str]:
    """Human-readable lines: img/s per core and ratio to the Pillow baseline."""
    ratio = result["ratio_to_first"]
    return [
        f"{key:28s} {row['throughput']:7.1f} img/s/core  ×{ratio[key]:.2f}"
        for key, row in result["throughput_per_core"].items()
    ]
