"""Download of weight files into a local cache: resumable, checksum-verified, atomic (urllib only)."""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import os
import sys
import time
import urllib.error
import urllib.request
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch

from resnext.errors import DownloadError

_CHUNK = 1 << 20


def default_cache_dir() -> Path:
    """$RESNEXT_HOME, else $TORCH_HOME/resnext, else ~/.cache/torch/resnext."""
    if os.environ.get("RESNEXT_HOME"):
        return Path(os.environ["RESNEXT_HOME"])
    if os.environ.get("TORCH_HOME"):
        return Path(os.environ["TORCH_HOME"]) / "resnext"
    return Path.home() / ".cache" / "torch" / "resnext"


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def hash_matches(path: Path, expected: str, kind: str) -> bool:
    """Whether the file's sha256 equals `expected` (kind 'sha256') or starts with it ('prefix')."""
    actual = sha256_file(path)
    if kind == "sha256":
        return actual == expected.lower()
    if kind == "prefix":
        return actual.startswith(expected.lower())
    return True


def download(
    url: str,
    *,
    expected_hash: str = "",
    hash_kind: str = "none",
    cache_dir: str | Path | None = None,
    filename: str | None = None,
    timeout: float = 30.0,
    progress: bool = False,
) -> Path:
    """The cached path of `url`, downloading it first if needed (`progress`: say how far the
    download has come on stderr, as torch.hub's does).

    A cached file with the right hash is used without network, and so is torch.hub's copy of
    it (`torch_hub_copy`: torchvision's and timm's downloads) where the hash is published. The
    download goes to
    ``<name>.part`` (resumed with an HTTP Range request when one exists), is hashed, and only then
    renamed into place, so the cache never holds a partial or unverified file under the real name.
    """
    if hash_kind not in ("sha256", "prefix", "none"):
        raise DownloadError(f"hash_kind: expected sha256, prefix or none, got {hash_kind!r}")
    directory = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = directory / (filename or url.rsplit("/", 1)[-1])
    if target.exists():
        if hash_matches(target, expected_hash, hash_kind):
            return target
        raise DownloadError(
            f"cached file {target} does not match the published {_describe(expected_hash, hash_kind)}: "
            "it is corrupt or a different file; delete it and download again"
        )
    shared = torch_hub_copy(target.name, expected_hash, hash_kind)
    if shared is not None:
        return shared
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DownloadError(f"cannot create the weights cache folder {directory}: {exc}") from exc
    with _exclusive(directory / (target.name + ".lock")):
        # Another process may have fetched it while this one waited for the lock.
        if target.exists() and hash_matches(target, expected_hash, hash_kind):
            return target
        return _download_into(url, target, expected_hash, hash_kind, timeout, progress)


@contextlib.contextmanager
def _exclusive(lock: Path) -> Iterator[None]:
    """Hold an exclusive lock on the file `lock` (POSIX flock; no lock where there is none), so
    that processes fetching the same file (the ranks of one job) take turns on its `.part`."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    try:
        handle = open(lock, "a")  # noqa: SIM115 - held for the block below
    except OSError as exc:
        raise DownloadError(f"cannot create the download lock {lock}: {exc}") from exc
    with handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _download_into(
    url: str, target: Path, expected_hash: str, hash_kind: str, timeout: float, progress: bool
) -> Path:
    """Download `url` to `target` through `target`.part, verified, then renamed into place."""
    part = target.with_name(target.name + ".part")
    try:
        _fetch(url, part, timeout, _Progress(url, target) if progress else None)
    except (urllib.error.URLError, OSError, TimeoutError, http.client.HTTPException) as exc:
        reason = getattr(exc, "reason", exc)
        raise DownloadError(
            f"could not download {url} ({reason}). If this machine is offline, download the file "
            f"elsewhere and put it at {target} (the partial download, if any, is kept at {part} and "
            "will be resumed)"
        ) from exc
    if not hash_matches(part, expected_hash, hash_kind):
        actual = sha256_file(part)
        part.unlink()
        raise DownloadError(
            f"checksum mismatch for {url}: expected {_describe(expected_hash, hash_kind)}, got "
            f"sha256 {actual}; the download was discarded and nothing was written to {target}"
        )
    if hash_kind == "none":
        warnings.warn(
            f"{url}: no hash is published for this file, so the download at {target} is unverified",
            stacklevel=2,
        )
    try:
        os.replace(part, target)
    except OSError as exc:
        raise DownloadError(f"cannot move the verified download {part} to {target}: {exc}") from exc
    return target


def torch_hub_copy(filename: str, expected_hash: str, hash_kind: str) -> Path | None:
    """The file torch.hub (and so torchvision and timm) downloaded under the same name into its
    own cache ($TORCH_HOME/hub/checkpoints), where its hash is published and matches: read in
    place rather than downloaded again. None otherwise."""
    if hash_kind == "none":
        return None  # an unverifiable file of another program's is not taken on its name alone
    candidate = Path(torch.hub.get_dir()) / "checkpoints" / filename
    if candidate.is_file() and hash_matches(candidate, expected_hash, hash_kind):
        return candidate
    return None


def _describe(expected: str, kind: str) -> str:
    return f"sha256 {expected}" if kind == "sha256" else f"sha256 prefix {expected}"


class _Progress:
    """How much of a download has arrived, on one stderr line rewritten at most twice a second.

    A stderr that cannot be written (closed, a broken pipe, a full disk) turns it off: the
    download goes on without it."""

    def __init__(self, url: str, target: Path) -> None:
        self.shown_at = 0.0
        self.on = True
        self._write(f"Downloading {url} to {target}\n")

    def update(self, have: int, total: int | None, *, last: bool = False) -> None:
        now = time.monotonic()
        if not last and now - self.shown_at < 0.5:
            return
        self.shown_at = now
        done = f"{have / 1e6:.1f} MB"
        if total:
            done = f"{100 * have / total:5.1f}% ({have / 1e6:.1f} of {total / 1e6:.1f} MB)"
        self._write(f"\r  {done}" + ("\n" if last else ""))

    def _write(self, text: str) -> None:
        stream = sys.stderr
        if not self.on or stream is None:
            return
        try:
            stream.write(text)
            stream.flush()
        except (OSError, ValueError):
            self.on = False


def _fetch(url: str, part: Path, timeout: float, progress: _Progress | None = None) -> None:
    """Append the rest of `url` to `part`, resuming from its current size when the server allows."""
    have = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url)
    if have:
        request.add_header("Range", f"bytes={have}-")
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and have:  # the part file is already complete
            return
        raise
    with response:
        # 206: the server honoured the range; 200: it sent the whole file, so start over.
        resumed = bool(have) and response.status == 206
        total = _announced_size(response, have if resumed else 0)
        have = have if resumed else 0
        with open(part, "ab" if resumed else "wb") as f:
            for block in iter(lambda: response.read(_CHUNK), b""):
                f.write(block)
                have += len(block)
                if progress is not None:
                    progress.update(have, total)
        if progress is not None:
            progress.update(have, total, last=True)
    # A dropped connection ends read() with short data instead of an exception, so the only
    # sign of it is a size other than the one the server announced.
    received = part.stat().st_size
    if total is not None and received != total:
        raise DownloadError(
            f"download of {url} was cut off at {received} of {total} bytes; the partial file is "
            f"kept at {part} and the download will resume from there next time"
        )


def _announced_size(response: http.client.HTTPResponse, start: int) -> int | None:
    """The whole file's size as the server announced it (Content-Range's total, else
    `start` + Content-Length); None when it announced none (a chunked body)."""
    if start:
        _, _, total = response.headers.get("Content-Range", "").rpartition("/")
        if total.strip().isdigit():
            return int(total)
    length = response.headers.get("Content-Length", "").strip()
    return start + int(length) if length.isdigit() else None
