"""Integrity check of PyTorch's zip-format files: every record's CRC-32, which torch.load ignores."""

from __future__ import annotations

import zipfile
from pathlib import Path


def zip_problem(path: str | Path) -> str | None:
    """Why the zip file at `path` is damaged (truncated, bad CRC), or None when it is whole.

    torch.save writes a CRC-32 for every record but torch.load never checks them, so a flipped
    bit inside a tensor loads silently; reading each record once here catches it.
    """
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except zipfile.BadZipFile as exc:
        return f"not a complete zip archive ({exc}); the file is truncated or damaged"
    except (OSError, EOFError, ValueError) as exc:
        return f"unreadable zip archive ({exc})"
    if bad is not None:
        return f"record {bad!r} fails its CRC-32 check; the file is corrupted"
    return None


def is_zip(path: str | Path) -> bool:
    """Whether the file starts like a zip archive (PyTorch's format since 1.6)."""
    with open(path, "rb") as fh:
        return fh.read(4) == b"PK\x03\x04"
