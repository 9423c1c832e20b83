"""The timings behind the fast paths' kernel choices, kept on disk for later processes on this machine.

`optimize` times each layer its kernels could take both ways before choosing (13–16 s for
ResNeXt-50 at batch 16 on a 2-core AVX2 CPU), and the training fast path's chooser
(`resnext.speed.autotune`) times every product's candidates in the first step (~17 s there;
RESULTS.md "Stop 31"). Those times depend on the machine, the thread count, torch and our
kernels, not on the weights, so one JSON file per such context holds them: a later process
with the same layers reads the times instead of measuring them, and so also makes the same
choices (a noisy machine would otherwise flip close calls from one process to the next).

The file's name is a digest of the context (CPU model and flags, threads, torch and compiler
versions, the sources of `resnext.speed` and its kernels): a changed kernel or another machine
starts a new file and never reads stale times. A file that cannot be read or parsed is ignored
with a warning and replaced, whole, the next time times are saved; entries of the wrong form are
ignored one by one. Writes go to a private name renamed into place, so a reader never sees half
a file.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

import resnext
from resnext import native
from resnext.cache_folders import user_cache_folder
from resnext.speed.capability import cpu_flags, cpu_model

FORMAT = 1
_SPEED = Path(__file__).parent


def default_folder() -> Path:
    """$RESNEXT_TIMING_CACHE, else $XDG_CACHE_HOME/resnext/timings (~/.cache/resnext/timings)."""
    return user_cache_folder("RESNEXT_TIMING_CACHE", "timings")


def _compiler_version() -> str:
    try:
        return native.compiler_version(native.compiler()).strip()
    except (native.NativeUnavailable, OSError):
        return "none"


def _speed_sources_digest() -> str:
    digest = hashlib.sha256()
    for path in sorted([*_SPEED.glob("*.py"), *(_SPEED / "kernels").glob("*.[ch]")]):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def context() -> dict[str, object]:
    """What the timings depend on, beyond the layer itself."""
    return {
        "format": FORMAT,
        "resnext": resnext.__version__,
        "torch": torch.__version__,
        "cpu": cpu_model(),
        "cpu_flags": hashlib.sha256(" ".join(sorted(cpu_flags())).encode()).hexdigest(),
        "threads": torch.get_num_threads(),
        "compiler": _compiler_version(),
        "speed_sources": _speed_sources_digest(),
    }


def layer_key(kind: str, shape: Sequence[int], dtype: torch.dtype, *parts: object) -> str:
    """The key of one timed comparison: the pass, the input's shape and dtype, and whatever else
    decides the times (the modules' configuration, the ways)."""
    return "|".join([kind, str(tuple(shape)), str(dtype), *map(str, parts)])


def cached(
    cache: TimingCache | None, key: str, count: int, measure: Callable[[], list[float]]
) -> list[float]:
    """The times (ms) of `count` ways: those stored in `cache` under `key`, else `measure()`'s,
    then stored. Without a cache, `measure()`'s. `measure` builds its own inputs, so that a
    stored comparison costs nothing."""
    if cache is not None:
        stored = cache.times(key, count)
        if stored is not None:
            return stored
    times = measure()
    if len(times) != count:
        raise ValueError(f"measure: expected {count} times for {key!r}, got {len(times)}")
    if cache is not None and _valid_times(times):  # a 0 or inf time is used, never kept
        cache.store(key, times)
    return times


class TimingCache:
    """The stored times of one context (this machine, threads, versions) in one JSON file."""

    folder: Path | None
    path: Path | None

    def __init__(self, folder: str | Path | None = None, *, on_disk: bool = True) -> None:
        self._added = self.hits = self.misses = 0
        self.context = context() if on_disk else {}
        if not on_disk:
            self.folder = self.path = None
        else:
            self.folder = default_folder() if folder is None else Path(folder)
            name = hashlib.sha256(json.dumps(self.context, sort_keys=True).encode()).hexdigest()
            self.path = self.folder / f"{name[:24]}.json"
        self._entries = self._read()

    @classmethod
    def in_memory(cls) -> TimingCache:
        """A cache of this process alone, nothing read or written: within one `optimize` call,
        layers alike (a stage's later blocks) are then timed once and get the same pick."""
        return cls(on_disk=False)

    def _read(self) -> dict[str, list[float]]:
        if self.path is None:
            return {}
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return {}
        except OSError as exc:
            warnings.warn(f"timing cache {self.path}: not read ({exc})", RuntimeWarning, 3)
            return {}
        try:
            # decoded here, so that a file of another encoding or of garbage bytes is "not a
            # timing cache" like any other bad file (UnicodeDecodeError is a ValueError)
            data = json.loads(raw.decode("utf-8"))
            if not isinstance(data, dict) or data.get("context") != self.context:
                raise ValueError("expected an object with this context")
            entries = data["entries"]
            if not isinstance(entries, dict):
                raise ValueError("'entries': expected an object")
        except (ValueError, KeyError) as exc:
            warnings.warn(
                f"timing cache {self.path}: not a timing cache of this context ({exc}); "
                "timing again and replacing it",
                RuntimeWarning,
                3,
            )
            return {}
        return {key: times for key, times in entries.items() if _valid_times(times)}

    def times(self, key: str, count: int) -> list[float] | None:
        """The stored times (ms) of `count` ways under `key`, or None."""
        found = self._entries.get(key)
        if found is None or len(found) != count:
            self.misses += 1
            return None
        self.hits += 1
        return list(found)

    def store(self, key: str, times: Sequence[float]) -> None:
        """Remember `times` (ms, finite and positive) under `key` until `save`."""
        times = [float(t) for t in times]
        if not _valid_times(times):
            raise ValueError(f"times: expected finite positive ms, got {times}")
        self._entries[key] = times
        self._added += 1

    def save(self) -> None:
        """Write the file (entries another process saved meanwhile are kept) if anything is new
        (nothing for an `in_memory` cache)."""
        if self.path is None or self.folder is None or not self._added:
            return
        merged = {**self._read_quietly(), **self._entries}
        payload = json.dumps({"context": self.context, "entries": merged}, indent=1, sort_keys=True)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            tmp.write_text(payload)
            os.replace(tmp, self.path)
        except OSError as exc:
            with contextlib.suppress(OSError):  # the folder itself may be what failed
                tmp.unlink(missing_ok=True)
            warnings.warn(f"timing cache {self.path}: not saved ({exc})", RuntimeWarning, 2)
            return
        self._added = 0

    def _read_quietly(self) -> dict[str, list[float]]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return self._read()


def _valid_times(times: object) -> bool:
    return (
        isinstance(times, list)
        and len(times) > 0
        and all(
            isinstance(t, (int, float)) and not isinstance(t, bool) and math.isfinite(t) and t > 0
            for t in times
        )
    )
