"""Run provenance for benchmarks: versions, git commit, machine, and the JSON results file."""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
from importlib import metadata
from pathlib import Path

import torch

from resnext.checkout import source_commit
from resnext.speed.allocator import huge_pages_in_use, loaded_allocator
from resnext.speed.capability import bf16_speedup, cpu_capability, cpu_model

_OPTIONAL = ("numpy", "pillow", "onnxruntime", "openvino", "onnx", "timm", "torchvision")


def git_commit(cwd: Path | None = None) -> str | None:
    """The current commit hash, with '-dirty' when a tracked file has changed; the
    `RESNEXT_GIT_COMMIT` environment variable instead where it is set (a copy of the tree that
    lacks its own .git, e.g. on a lent GPU machine); None outside git without it."""
    commit, dirty = source_commit(cwd)
    return f"{commit}-dirty" if commit and dirty else commit


def versions() -> dict[str, str | None]:
    """Versions of python, torch and the optional packages the benchmarks may use."""
    found: dict[str, str | None] = {"python": platform.python_version(), "torch": torch.__version__}
    for name in _OPTIONAL:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


def machine() -> dict[str, object]:
    """CPU model, core count, load average, allocator (and whether large tensors sit on huge
    pages), ISA and how much faster bf16 convolutions run than float32 ones: what the numbers
    depend on."""
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "load_average": os.getloadavg(),
        "allocator": loaded_allocator() or "glibc",
        "huge_pages": huge_pages_in_use(),
        **cpu_capability().as_dict(),
        "bf16_speedup": bf16_speedup(),
        "gpus": _gpus(),
    }


def _gpus() -> list[str]:
    """The CUDA devices torch sees (name and memory), without initialising CUDA where it has none."""
    if not torch.cuda.is_available():
        return []
    return [
        f"{props.name}, {props.total_memory / 2**30:.0f} GiB"
        for props in map(torch.cuda.get_device_properties, range(torch.cuda.device_count()))
    ]


def write_results(
    out_dir: Path, kind: str, config: dict[str, object], results: dict[str, object]
) -> Path:
    """Write {config, results, versions, machine, commit, date} to out_dir/<kind>-<time>.json."""
    now = _dt.datetime.now(_dt.timezone.utc)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{kind}-{now:%Y%m%dT%H%M%SZ}.json"
    record = {
        "kind": kind,
        "date": now.isoformat(timespec="seconds"),
        "config": config,
        "results": results,
        "versions": versions(),
        "machine": machine(),
        "git_commit": git_commit(Path(__file__).resolve().parent),
    }
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=2, default=str))
    tmp.replace(path)  # never leave a half-written results file
    return path
