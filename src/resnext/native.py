"""Building the project's small C libraries on first use: system compiler, hashed cache, ctypes.

Nothing is downloaded: the C sources ship with the package and are compiled with ``$CC`` (else
``cc``) into ``$RESNEXT_KERNEL_CACHE`` (else ``~/.cache/resnext/kernels``), one file per hash of
source, flags and compiler version, written under a private name and renamed into place so that
concurrent processes never load a half-written library. Next to each library a small file
(``<name>.so.sum``) holds its size and SHA-256, written before the library is renamed into
place: a library that does not match it (cut short by a full disk or a copy, overwritten, or
left by a version that wrote no such file) is never loaded (a truncated one would kill the
process with SIGBUS) but built again, once, and so is one that matches yet fails to load; a
library that still fails is reported like a failed build (`NativeUnavailable`).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import re
import shutil
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Generic, TypeVar

from resnext.cache_folders import user_cache_folder
from resnext.io.atomic import replacing, write_text


class NativeUnavailable(RuntimeError):
    """A C library cannot be built or loaded here (no compiler, missing headers, ...), with why."""


def cache_dir() -> Path:
    """Where built libraries are kept: $RESNEXT_KERNEL_CACHE, else ~/.cache/resnext/kernels."""
    return user_cache_folder("RESNEXT_KERNEL_CACHE", "kernels")


def compiler() -> str:
    """The C compiler's path ($CC, else cc), or NativeUnavailable naming what was looked for."""
    cc = os.environ.get("CC", "cc")
    path = shutil.which(cc)
    if path is None:
        raise NativeUnavailable(f"no C compiler: {cc!r} is not on PATH (set CC to one)")
    return path


def compiler_version(cc: str) -> str:
    """What `cc --version` prints (part of each built library's hash, and of timing contexts)."""
    return subprocess.run([cc, "--version"], capture_output=True, text=True).stdout


def local_headers(source: Path, include_dirs: Sequence[Path] = ()) -> list[Path]:
    """The files `source` includes with `#include "name"`, and those they include in turn, each
    once, in the order first met: found as the compiler finds them, in the including file's own
    folder, else in `include_dirs` (the build's -I folders) in order."""
    found: list[Path] = []
    pending = [source]
    while pending:
        including = pending.pop(0)
        text = including.read_text()
        for name in re.findall(r'^\s*#\s*include\s*"([^"]+)"', text, flags=re.MULTILINE):
            candidates = [including.parent / name, *(Path(d) / name for d in include_dirs)]
            path = next((c for c in candidates if c.is_file()), None)
            if path is not None and path not in found and path != source:
                found.append(path)
                pending.append(path)
    return found


def _stamp(library: Path) -> str:
    data = library.read_bytes()
    return f"{len(data)} {hashlib.sha256(data).hexdigest()}\n"


def _sum_file(library: Path) -> Path:
    return library.with_name(library.name + ".sum")


def _complete(library: Path) -> bool:
    """Whether `library` is there and is what its build wrote (size and digest as recorded)."""
    try:
        return _sum_file(library).read_text(encoding="ascii") == _stamp(library)
    except (OSError, UnicodeDecodeError):
        return False


def build(
    source: Path, flags: Sequence[str], libs: Sequence[str] = (), out_dir: Path | None = None
) -> Path:
    """Compile `source` into a shared library (unless this source/flags/compiler already was,
    into a library that is complete)."""
    return _build(source, flags, libs, out_dir)[0]


def _build(
    source: Path,
    flags: Sequence[str],
    libs: Sequence[str] = (),
    out_dir: Path | None = None,
    *,
    again: bool = False,
) -> tuple[Path, bool]:
    """The library's path, and whether it was compiled now (always, with `again`)."""
    cc = compiler()
    version = compiler_version(cc)
    digest = hashlib.sha256()
    for part in (source.read_bytes(), " ".join([*flags, *libs]).encode(), version.encode()):
        digest.update(part)
    include_dirs = [Path(f[2:]) for f in flags if f.startswith("-I") and len(f) > 2]
    # a changed shared header must rebuild its users, another folder's source's too
    for header in local_headers(source, include_dirs):
        digest.update(header.name.encode() + header.read_bytes())
    folder = cache_dir() if out_dir is None else out_dir
    target = folder / f"{source.stem}-{digest.hexdigest()[:16]}.so"
    if not again and _complete(target):
        return target, False
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise NativeUnavailable(f"kernel cache folder {folder} cannot be created: {exc}") from exc
    try:
        with replacing(target) as tmp:  # over a bad library too: never a moment without one
            cmd = [cc, *flags, "-shared", "-fPIC", str(source), "-o", str(tmp), *libs]
            try:
                done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
            except (OSError, subprocess.TimeoutExpired) as exc:
                raise NativeUnavailable(f"compiling {source.name} failed: {exc}") from exc
            if done.returncode != 0:
                raise NativeUnavailable(
                    f"compiling {source.name} failed ({' '.join(cmd)}):\n"
                    f"{done.stderr.strip()[-2000:]}"
                )
            # the record first, then the library: a library in place always has its record,
            # and one that a concurrent build replaced in between only fails the check and is
            # built again
            write_text(_sum_file(target), _stamp(tmp))
    except OSError as exc:
        raise NativeUnavailable(
            f"kernel cache folder {folder}: {target.name} not kept: {exc}"
        ) from exc
    return target, True


def problem(load: Callable[[], object]) -> str | None:
    """None if `load()` (building and loading a library) works, else the first line of why not."""
    try:
        load()
    except (NativeUnavailable, OSError) as exc:
        return str(exc).splitlines()[0]
    return None


def load(
    source: Path,
    flags: Sequence[str],
    libs: Sequence[str] = (),
    cpu_needs: frozenset[str] = frozenset(),
) -> ctypes.CDLL:
    """Build `source` (see `build`) and load it, after checking this CPU has the `cpu_needs` flags."""
    if cpu_needs:
        from resnext.speed.capability import cpu_flags  # lazily: resnext.speed imports this module

        missing = cpu_needs - cpu_flags()
        if missing:
            raise NativeUnavailable(f"this CPU lacks {sorted(missing)}")
    path, fresh = _build(source, flags, libs)
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as exc:
        if fresh:
            raise NativeUnavailable(f"loading {path.name} failed: {exc}") from exc
        # complete as recorded yet not loadable (e.g. changed with its record): build it again
        path, _ = _build(source, flags, libs, again=True)
        try:
            lib = ctypes.CDLL(str(path))
        except OSError as exc:
            raise NativeUnavailable(f"loading {path.name} failed: {exc}") from exc
    _LOADED.append(lib)
    return lib


@dataclass(frozen=True)
class Build:
    """One compiled form of a C source: its name, file, compiler flags and the CPU flags it needs.

    Kernels with several forms (AVX-512, AVX2, ...) keep a `Build` for each, or a subclass that
    adds what their callers need to know (register lanes, dtypes). `headers` is the folder of the
    shared headers the source includes by name: another revision's copy of the source (a
    benchmark's A/B run, `dataclasses.replace(build, source=...)`) is compiled with it on its
    include path."""

    name: str
    source: Path
    flags: tuple[str, ...]
    cpu_needs: frozenset[str]
    libs: tuple[str, ...] = field(default=(), kw_only=True)
    headers: Path | None = field(default=None, kw_only=True)

    def load(self, source: Path | None = None) -> ctypes.CDLL:
        """This build compiled (on first use) and loaded, from `self.source` or from `source`,
        another revision's copy of it; NativeUnavailable where it cannot be."""
        source = self.source if source is None else source
        flags = self.flags
        if self.headers is not None and source.parent != self.headers:
            flags = (*flags, f"-I{self.headers}")
        return load(source, flags, self.libs, cpu_needs=self.cpu_needs)


B = TypeVar("B", bound=Build)


def first_that_runs(builds: Sequence[B], why_not: Callable[[B], str | None]) -> B:
    """The first of `builds` that runs on this machine, `why_not(build)` saying why one does not
    (None where it runs: a module's own cached check, so that no failing build is tried twice);
    else NativeUnavailable naming each build and its reason."""
    reasons = []
    for candidate in builds:
        reason = why_not(candidate)
        if reason is None:
            return candidate
        reasons.append(f"{candidate.name}: {reason}")
    raise NativeUnavailable("; ".join(reasons))


class Builds(Generic[B]):
    """A kernel's builds in order of preference, each loaded at most once by the module's
    `load(build)` (which declares the C signatures), and the first that runs on this machine.

    The three steps a module with several builds needs, in one place: a failing build is tried
    once (its reason kept), and the build the check loaded is the library the module then uses,
    not a second copy."""

    def __init__(self, builds: Sequence[B], load: Callable[[B], ctypes.CDLL]) -> None:
        self.builds = tuple(builds)
        self._load = load
        self._libraries: dict[B, ctypes.CDLL] = {}
        self._problems: dict[B, str | None] = {}

    def library(self, build: B) -> ctypes.CDLL:
        """`build` loaded, once per process (NativeUnavailable where it cannot be, each time)."""
        if build not in self._libraries:
            self._libraries[build] = self._load(build)
        return self._libraries[build]

    def problem(self, build: B) -> str | None:
        """None where `build` runs on this machine, else why not (one line); checked once."""
        if build not in self._problems:
            self._problems[build] = problem(lambda: self.library(build))
        return self._problems[build]

    def runnable(self) -> list[B]:
        """The builds that run on this machine, in order of preference."""
        return [build for build in self.builds if self.problem(build) is None]

    def active(self) -> B:
        """The first build that runs here; NativeUnavailable naming each build's reason."""
        return first_that_runs(self.builds, self.problem)


# Every library `load` returned in this process (they stay loaded): what a recording of kernel
# calls (`resnext.speed.replay`) watches.
_LOADED: list[ctypes.CDLL] = []


def loaded() -> tuple[ctypes.CDLL, ...]:
    """The libraries `load` has returned in this process, oldest first."""
    return tuple(_LOADED)
