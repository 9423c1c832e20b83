"""Where the project keeps files between runs (built kernels, layer timings) on this machine."""

from __future__ import annotations

import os
from pathlib import Path


def user_cache_folder(variable: str, name: str) -> Path:
    """$`variable` if set, else $XDG_CACHE_HOME/resnext/`name` (~/.cache/resnext/`name`)."""
    env = os.environ.get(variable)
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "resnext" / name
