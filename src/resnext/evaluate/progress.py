"""A small text progress bar on stderr (only the main rank draws it)."""

from __future__ import annotations

import sys
import time
from typing import TextIO


class ProgressBar:
    """`[#####.....] 512/1000 images 35.1 img/s`, redrawn in place; silent when disabled."""

    def __init__(self, total: int, enabled: bool = True, stream: TextIO | None = None) -> None:
        self.total, self.enabled = total, enabled
        self.stream = stream or sys.stderr
        self.done = 0
        self.start = time.perf_counter()

    def update(self, n: int) -> None:
        self.done = min(self.done + n, self.total)
        if not self.enabled:
            return
        width = 30
        frac = self.done / self.total if self.total else 1.0
        filled = int(width * frac)
        rate = self.done / max(time.perf_counter() - self.start, 1e-9)
        bar = "#" * filled + "." * (width - filled)
        self.stream.write(f"\r[{bar}] {self.done}/{self.total} images {rate:.1f} img/s")
        self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self.stream.write("\n")
            self.stream.flush()
