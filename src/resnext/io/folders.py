"""Output folders checked before a long run writes into them, not after it."""

from __future__ import annotations

import os
from pathlib import Path

from resnext.errors import ConfigError


def output_folder(path: str | Path) -> Path:
    """`path` created if missing; a ConfigError naming it when it cannot hold outputs (a file in
    its place, or no permission to write there)."""
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output folder {out}: exists and is not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"output folder {out}: cannot be created ({exc})") from exc
    if not os.access(out, os.W_OK | os.X_OK):
        raise ConfigError(f"output folder {out}: not writable")
    return out
