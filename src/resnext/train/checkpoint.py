"""Training checkpoints: written atomically, read without executing code, with every RNG state."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from resnext.errors import CheckpointError
from resnext.io.atomic import replacing
from resnext.io.zip_check import zip_problem


def capture_rng() -> dict[str, Any]:
    """Python, NumPy, torch CPU (and CUDA) RNG states as tensors and plain values."""
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {
            "name": str(np_state[0]),
            "keys": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    """Put back the RNG states of `capture_rng`."""
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state(
        (
            n["name"],
            n["keys"].numpy().astype(np.uint32),
            n["pos"],
            n["has_gauss"],
            n["cached_gaussian"],
        )
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def atomic_save(payload: dict[str, Any], path: str | Path) -> Path:
    """Write `payload` to `path` so that a crash leaves either the old file or the new, never half.

    The bytes go to a temporary file in the same folder, are fsynced, then renamed over `path`
    (rename is atomic on POSIX), and the folder entry is fsynced too.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with replacing(path, fsync=True) as tmp, open(tmp, "wb") as fh:
            torch.save(payload, fh)
    except Exception as exc:
        raise CheckpointError(
            f"checkpoint {path}: write failed ({exc}); previous file kept"
        ) from exc
    return path


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """A checkpoint's dict, loaded with `weights_only=True` (no code from the file runs)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path}: no such file")
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint {path}: empty file (0 bytes)")
    problem = zip_problem(path)
    if problem is not None:
        raise CheckpointError(f"checkpoint {path}: unreadable or truncated: {problem}")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"checkpoint {path}: unreadable or truncated ({exc})") from exc
    if not isinstance(payload, dict) or "model" not in payload:
        raise CheckpointError(f"checkpoint {path}: not a resnext training checkpoint (no 'model')")
    return payload
