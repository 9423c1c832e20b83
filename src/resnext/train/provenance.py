"""What produced a run: versions of Python, torch, numpy and resnext, the git commit, the machine."""

from __future__ import annotations

import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

import resnext
from resnext.checkout import source_commit


def git_commit(path: Path | None = None) -> dict[str, Any]:
    """The commit of the checkout holding the package (and whether it has local changes), if any."""
    commit, dirty = source_commit(path)
    return {"commit": commit, "dirty": dirty}


def collect(device: torch.device, world_size: int) -> dict[str, Any]:
    """The provenance record of a run started now on `device` with `world_size` processes."""
    return {
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "argv": sys.argv,
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "numpy": np.__version__,
        "resnext": resnext.__version__,
        "platform": platform.platform(),
        "device": str(device),
        "cuda": torch.version.cuda if device.type == "cuda" else None,
        "threads": torch.get_num_threads(),
        "world_size": world_size,
        "git": git_commit(),
    }


def save(record: dict[str, Any], run_dir: Path) -> Path:
    """Write provenance.json into the run folder."""
    path = run_dir / "provenance.json"
    path.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    return path
