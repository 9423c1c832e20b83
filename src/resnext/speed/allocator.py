"""A faster memory allocator for CLI runs: re-exec the process with tcmalloc or jemalloc preloaded.

glibc's malloc returns the large activation buffers of a CNN to the OS and maps them again on
every forward pass; tcmalloc and jemalloc keep them, which on this project's benchmark machine
made eager ResNeXt-50 inference about 1.5× faster. LD_PRELOAD only takes effect when a process
starts, so the CLI re-executes itself once; the environment variable GUARD_VAR stops a loop.
Library users set LD_PRELOAD themselves before starting Python (see docs/speed.md).

Huge pages: torch's CPU allocator backs each tensor of 2 MB or more with transparent huge pages
(madvise'd) when THP_MEM_ALLOC_ENABLE=1, which it reads once, at the process's first tensor.
With 4 KB pages, a forward that streams ResNeXt-50's ~100 MB of float32 weights crosses a page
every 4 KB, where the hardware prefetchers stop. On the Xeon without AMX (D) the replayed
float32 forward took 0.92× the time at batch 1 with huge pages; the eager path and batch 16
measured level, and a training run's peak memory grew by 7–29 % (stop 54). So `resnext predict`
and `resnext eval` ask for them (`request_huge_pages`, before anything is allocated) only with
`--replay`.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Mapping, MutableMapping, Sequence
from pathlib import Path

from resnext.errors import ConfigError

GUARD_VAR = "RESNEXT_ALLOCATOR_REEXEC"
DISABLE_VAR = "RESNEXT_NO_PRELOAD"
HUGE_PAGES_VAR = "THP_MEM_ALLOC_ENABLE"  # torch's switch, read at the process's first tensor
THP_SETTING = Path("/sys/kernel/mm/transparent_hugepage/enabled")
HUGE_PAGE = 2 << 20  # bytes: a huge page, and the least tensor torch asks huge pages for

LIBRARY_NAMES: dict[str, tuple[str, ...]] = {
    "tcmalloc": ("libtcmalloc_minimal.so.4", "libtcmalloc.so.4", "libtcmalloc.so"),
    "jemalloc": ("libjemalloc.so.2", "libjemalloc.so"),
}
SEARCH_DIRS: tuple[str, ...] = (
    "/usr/lib/x86_64-linux-gnu",
    "/usr/lib/aarch64-linux-gnu",
    "/usr/lib64",
    "/usr/lib",
    "/usr/local/lib",
)


def find_allocator(
    choice: str = "auto", search_dirs: Sequence[str | os.PathLike[str]] = SEARCH_DIRS
) -> Path | None:
    """The shared library of `choice` ('auto' = tcmalloc, then jemalloc) found on this system."""
    if choice not in ("auto", *LIBRARY_NAMES):
        raise ConfigError(f"allocator: expected auto, tcmalloc or jemalloc, got {choice!r}")
    kinds = list(LIBRARY_NAMES) if choice == "auto" else [choice]
    dirs = [*search_dirs]
    prefix = os.environ.get("CONDA_PREFIX")
    if prefix:
        dirs.append(Path(prefix) / "lib")
    for kind in kinds:
        for directory in dirs:
            for name in LIBRARY_NAMES[kind]:
                path = Path(directory) / name
                if path.is_file():
                    return path
    return None


def loaded_allocator(maps_text: str | None = None) -> str | None:
    """'tcmalloc' or 'jemalloc' when that allocator is mapped into this process, else None."""
    if maps_text is None:
        try:
            maps_text = Path("/proc/self/maps").read_text()
        except OSError:
            return None
    for kind in LIBRARY_NAMES:
        if f"lib{kind}" in maps_text:
            return kind
    return None


def plan_reexec(
    env: Mapping[str, str], library: Path | None, loaded: str | None
) -> dict[str, str] | None:
    """The environment to re-exec with, or None when re-exec is not wanted or would loop."""
    if env.get(GUARD_VAR) or env.get(DISABLE_VAR) or loaded is not None or library is None:
        return None
    new_env = dict(env)
    preload = env.get("LD_PRELOAD", "")
    new_env["LD_PRELOAD"] = f"{library}:{preload}" if preload else str(library)
    new_env[GUARD_VAR] = "1"
    return new_env


def reexec_with_allocator(
    choice: str = "auto",
    *,
    execve: Callable[[str, Sequence[str], Mapping[str, str]], object] = os.execve,
    argv: Sequence[str] | None = None,
) -> str | None:
    """Re-exec this process with the allocator preloaded (does not return when it does).

    Returns the allocator already in use, or None when none is found or the re-exec is
    disabled (RESNEXT_NO_PRELOAD=1) or was already tried (RESNEXT_ALLOCATOR_REEXEC set).
    """
    loaded = loaded_allocator()
    if choice == "none" or loaded is not None:
        return loaded
    env = plan_reexec(os.environ, find_allocator(choice), loaded)
    if env is None:
        return None
    command = list(argv) if argv is not None else list(getattr(sys, "orig_argv", sys.argv))
    sys.stdout.flush()
    sys.stderr.flush()
    execve(sys.executable, [sys.executable, *command[1:]], env)
    return None


# mallopt parameter numbers from glibc's <malloc.h>.
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4


_KEEPING = False  # keep_freed_memory() has told glibc to keep freed memory


def freed_memory_kept() -> bool:
    """Whether this process's allocator keeps freed memory for reuse (so a new tensor costs no
    page faults): tcmalloc or jemalloc loaded, or glibc told to (`keep_freed_memory`)."""
    return _KEEPING or loaded_allocator() is not None


def keep_freed_memory() -> bool:
    """Tell glibc's malloc, in this running process, to keep freed memory for reuse.

    The in-process alternative to preloading tcmalloc: large blocks are no longer mmapped (and
    unmapped and page-faulted again on every step) and the heap is never trimmed. Memory stays
    at its peak until the process ends, which is what a training or benchmark process wants.
    Returns False where the C library is not glibc.
    """
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    global _KEEPING
    _KEEPING = bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
    return _KEEPING


def thp_mode(setting: Path = THP_SETTING) -> str | None:
    """The kernel's transparent-huge-page mode ('always', 'madvise' or 'never'; the bracketed
    word of `setting`), or None where it cannot be read (not Linux, no THP)."""
    try:
        text = setting.read_text()
    except OSError:
        return None
    start, end = text.find("["), text.find("]")
    return text[start + 1 : end] if 0 <= start < end else None


def request_huge_pages(
    environ: MutableMapping[str, str] | None = None, setting: Path = THP_SETTING
) -> bool:
    """Ask torch's CPU allocator to back large tensors with transparent huge pages, where the
    kernel gives them to a region that asks ('always' or 'madvise') and the environment does not
    already say (a user's THP_MEM_ALLOC_ENABLE=0 stands); whether they are asked for. Torch
    reads the variable at the process's first tensor, so this must come before any."""
    environ = os.environ if environ is None else environ
    if HUGE_PAGES_VAR in environ:
        return environ[HUGE_PAGES_VAR] not in ("", "0")
    if thp_mode(setting) not in ("always", "madvise"):
        return False
    environ[HUGE_PAGES_VAR] = "1"
    return True


def huge_pages_in_use(smaps: Path = Path("/proc/self/smaps")) -> bool:
    """Whether torch's CPU allocator asks for huge pages for large tensors in this process: the
    memory of a new 2 MB tensor carries the kernel's 'hg' (MADV_HUGEPAGE) flag only then."""
    import torch

    probe = torch.empty(HUGE_PAGE, dtype=torch.uint8)  # torch's threshold
    return "hg" in vm_flags(probe.data_ptr(), smaps)


def vm_flags(address: int, smaps: Path = Path("/proc/self/smaps")) -> list[str]:
    """The kernel's flags (`VmFlags`) of the mapping holding `address`, [] where none is found."""
    inside = False
    try:
        lines = smaps.read_text().splitlines()
    except OSError:
        return []
    for line in lines:
        head = line.split(" ", 1)[0]
        if "-" in head and not head.endswith(":"):
            low, _, high = head.partition("-")
            try:
                inside = int(low, 16) <= address < int(high, 16)
            except ValueError:
                inside = False
        elif inside and line.startswith("VmFlags:"):
            return line.split()[1:]
    return []
