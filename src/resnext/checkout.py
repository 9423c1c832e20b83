"""Which commit of the project's source is running: what every run and benchmark records."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import resnext

# Names the commit where git cannot: a copy of the tree without its .git, or (as on the lent GPU
# machine) with a .git that is not the copied tree's.
ENV = "RESNEXT_GIT_COMMIT"


def source_commit(path: Path | None = None) -> tuple[str | None, bool | None]:
    """(commit, dirty) of the git checkout holding `path` (default: the package): dirty when a
    tracked file differs from the commit (new untracked files, such as results, do not count).
    $RESNEXT_GIT_COMMIT, where set, is taken as it is: (its value, None); outside git and
    without it, (None, None)."""
    if os.environ.get(ENV):
        return os.environ[ENV], None
    where = path or Path(resnext.__file__).resolve().parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True, timeout=10
        )
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=where,
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        commit = None
    if commit is None or commit.returncode != 0 or status.returncode != 0:
        return None, None
    return commit.stdout.strip(), bool(status.stdout.strip())
