"""Extract a tar archive without letting any member escape the target folder or flood the disk."""

from __future__ import annotations

import os
import shutil
import tarfile
import tempfile
import zlib
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from resnext.errors import DataError, UnsafeFileError

DEFAULT_MAX_MEMBERS = 200_000
DEFAULT_MAX_TOTAL_BYTES = (
    4 * 1024**3
)  # the CIFAR archives unpack to ~180 MB; ImageNet splits differ
_CHUNK = 1 << 20


def _member_path(archive: Path, member: tarfile.TarInfo) -> PurePosixPath:
    name = member.name.replace("\\", "/")
    path = PurePosixPath(name)
    if not name or path.is_absolute() or (len(name) > 1 and name[1] == ":"):
        raise UnsafeFileError(f"{archive}: refused member {member.name!r}: absolute path")
    if ".." in path.parts:
        raise UnsafeFileError(f"{archive}: refused member {member.name!r}: '..' in its path")
    parts = [p for p in path.parts if p not in ("", ".")]
    if not parts:
        raise UnsafeFileError(f"{archive}: refused member {member.name!r}: empty path")
    return PurePosixPath(*parts)


def _inside(root: Path, candidate: Path) -> bool:
    root_real = os.path.realpath(root)
    cand_real = os.path.realpath(candidate)
    return cand_real == root_real or cand_real.startswith(root_real + os.sep)


def _check_link(archive: Path, member: tarfile.TarInfo, rel: PurePosixPath, root: Path) -> Path:
    target = member.linkname.replace("\\", "/")
    if not target or PurePosixPath(target).is_absolute():
        raise UnsafeFileError(
            f"{archive}: refused member {member.name!r}: link to absolute path {target!r}"
        )
    # A symlink resolves from its own folder, a hard link from the archive's root. realpath
    # follows the links already extracted the way the kernel will ('d/..' with d -> '.' is the
    # parent of the link's folder); a textual normpath would cancel 'd/..' first.
    base = root / rel.parent if member.issym() else root
    resolved = Path(os.path.realpath(base / target))
    if not _inside(root, resolved):
        raise UnsafeFileError(
            f"{archive}: refused member {member.name!r}: link {target!r} points outside the target"
        )
    return resolved


def _write_file(src: BinaryIO, dest: Path, limit: int) -> int:
    written = 0
    with open(dest, "xb") as out:
        while chunk := src.read(_CHUNK):
            written += len(chunk)
            if written > limit:
                return written
            out.write(chunk)
    return written


def _extract_members(
    archive: Path, tar: tarfile.TarFile, root: Path, max_members: int, max_total_bytes: int
) -> None:
    total = 0
    links: list[tuple[tarfile.TarInfo, Path]] = []
    for count, member in enumerate(tar, start=1):
        if count > max_members:
            raise UnsafeFileError(
                f"{archive}: refused: more than {max_members} members (at {member.name!r}); "
                "raise max_members if the archive is genuine"
            )
        rel = _member_path(archive, member)
        dest = root / rel
        if dest.is_symlink():
            raise UnsafeFileError(
                f"{archive}: refused member {member.name!r}: overwrites a link extracted earlier"
            )
        # Checked before any folder is made: a path through an extracted link may lead outside.
        if not _inside(root, dest if member.isdir() else dest.parent):
            raise UnsafeFileError(f"{archive}: refused member {member.name!r}: leaves the target")
        if member.isdir():
            dest.mkdir(parents=True, exist_ok=True)
            continue
        dest.parent.mkdir(parents=True, exist_ok=True)
        if member.issym():
            _check_link(archive, member, rel, root)
            os.symlink(member.linkname, dest)
            links.append((member, dest))
        elif member.islnk():
            source = _check_link(archive, member, rel, root)
            if not source.is_file():
                raise UnsafeFileError(
                    f"{archive}: refused member {member.name!r}: hard link to a missing file"
                )
            dest.unlink(missing_ok=True)
            shutil.copyfile(source, dest)
        elif member.isfile():
            if total + member.size > max_total_bytes:
                raise UnsafeFileError(
                    f"{archive}: refused: unpacked size exceeds {max_total_bytes} bytes at member "
                    f"{member.name!r}; raise max_total_bytes if the archive is genuine"
                )
            src = tar.extractfile(member)
            dest.unlink(missing_ok=True)
            total += _write_file(src, dest, max_total_bytes - total)
            if total > max_total_bytes:
                raise UnsafeFileError(
                    f"{archive}: refused: member {member.name!r} holds more than its header says"
                )
            os.chmod(dest, 0o644)
        else:
            raise UnsafeFileError(
                f"{archive}: refused member {member.name!r}: not a file, folder or link "
                "(device, fifo or other special file)"
            )
    # A link checked while a folder on its path was missing can be redirected by a later link
    # ('x -> a/../b' first, then 'a -> .'): every link must still resolve inside at the end.
    for member, dest in links:
        if not _inside(root, dest):
            raise UnsafeFileError(
                f"{archive}: refused member {member.name!r}: link {member.linkname!r} points "
                "outside the target once the later links are in place"
            )


def safe_extract(
    archive: str | Path,
    target_dir: str | Path,
    *,
    max_members: int = DEFAULT_MAX_MEMBERS,
    max_total_bytes: int = DEFAULT_MAX_TOTAL_BYTES,
) -> Path:
    """Extract `archive` (tar, tar.gz, tar.bz2, tar.xz) into `target_dir`, all or nothing.

    Members with absolute paths, '..' parts, links leaving the target, or special files are
    refused (UnsafeFileError naming the member), as are archives over the member-count or
    unpacked-size limits. Extraction goes to a temporary folder beside the target that is
    renamed into place only when every member passed, so a refusal leaves nothing behind.
    `target_dir` must not exist or be an empty folder.
    """
    archive = Path(archive)
    target = Path(target_dir)
    if not archive.is_file():
        raise DataError(f"archive {archive} does not exist or is not a file")
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise DataError(f"extraction target {target} already exists and is not an empty folder")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    try:
        try:
            with tarfile.open(archive, "r:*") as tar:
                _extract_members(archive, tar, staging, max_members, max_total_bytes)
        except (tarfile.TarError, EOFError, zlib.error, OSError) as exc:
            raise DataError(f"{archive}: not a readable tar archive ({exc})") from None
        if target.exists():
            target.rmdir()
        os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target
