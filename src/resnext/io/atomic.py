"""Files replaced whole: written beside their target under a fresh name, then renamed over it."""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def replacing(path: str | Path, *, fsync: bool = False) -> Iterator[Path]:
    """Yield a new path beside `path` to write to; when the block ends without an error it is
    renamed over `path` (rename is atomic on POSIX), else removed, so a failure or a crash leaves
    the old file or the new one, never half of one.

    The temporary name keeps `path`'s suffix, for writers that choose a format by it (savefig,
    torch.export.save), and is unique to this call, so two writers never share one. With `fsync`
    the bytes and then the folder entry reach the disk before this returns (checkpoints, weights).
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp{path.suffix}")
    try:
        yield tmp
        if fsync:
            _fsync(tmp)
        os.replace(tmp, path)
        if fsync:
            _fsync_folder(path.parent)
    finally:
        tmp.unlink(missing_ok=True)  # gone after a successful rename


def write_text(path: str | Path, text: str, *, newline: str | None = None) -> None:
    """Replace `path` whole by `text` (UTF-8)."""
    with replacing(path) as tmp:
        tmp.write_text(text, encoding="utf-8", newline=newline)


def write_bytes(path: str | Path, data: bytes, *, fsync: bool = False) -> None:
    """Replace `path` whole by `data`."""
    with replacing(path, fsync=fsync) as tmp:
        tmp.write_bytes(data)


def _fsync(path: Path) -> None:
    with open(path, "rb+") as fh:
        os.fsync(fh.fileno())


def _fsync_folder(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return  # some filesystems do not open folders; the rename has happened regardless
    try:
        os.fsync(fd)
    except OSError:
        pass  # nor fsync them
    finally:
        os.close(fd)
