"""A progress display: a live bar with rate and ETA on a terminal, plain periodic lines otherwise."""

from __future__ import annotations

import sys
import time
from typing import TextIO


def _fmt_time(seconds: float) -> str:
    seconds = max(0, int(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


class Progress:
    """Steps done out of `total`, with images/s (of all `processes`) and time left; silent when
    not `enabled`."""

    def __init__(
        self,
        total: int,
        desc: str,
        *,
        every: int = 50,
        enabled: bool = True,
        stream: TextIO | None = None,
        start: int = 0,
        processes: int = 1,
    ) -> None:
        self.total = total
        self.desc = desc
        self.every = max(1, every)
        self.enabled = enabled
        self.stream = stream or sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.done = start
        self.start_done = start
        self.images = 0
        # each of the job's processes takes an equal share of every step: the rate is the job's
        self.processes = max(1, processes)
        self.t0 = time.perf_counter()

    def update(self, images: int, note: str = "") -> None:
        """One more step of `images` images; `note` is shown after the counters (loss, LR)."""
        self.done += 1
        self.images += images * self.processes
        if not self.enabled:
            return
        if self.tty or self.done % self.every == 0 or self.done == self.total:
            self._show(note)

    def _show(self, note: str) -> None:
        elapsed = time.perf_counter() - self.t0
        steps = self.done - self.start_done
        rate = self.images / elapsed if elapsed > 0 else 0.0
        eta = elapsed / steps * (self.total - self.done) if steps else 0.0
        counters = f"{self.done}/{self.total} {rate:7.1f} img/s eta {_fmt_time(eta)} {note}"
        if self.tty:
            width = 24
            filled = int(width * self.done / max(1, self.total))
            bar = "#" * filled + "-" * (width - filled)
            self.stream.write(f"\r{self.desc} [{bar}] {counters}")
            if self.done == self.total:
                self.stream.write("\n")
        else:
            self.stream.write(f"{self.desc} {counters}\n")
        self.stream.flush()
