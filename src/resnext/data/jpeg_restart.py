"""Random access into JPEGs through restart markers: a lossless rewrite, and cuts that decode only a crop's MCUs.

`add_restarts` rewrites a JPEG (coefficients copied as they are, so every decoded pixel is
unchanged) with a restart marker every few MCUs, aligned to MCU rows; `index_tree` does it for a
whole dataset folder, once. On such files `cut` returns a smaller, valid JPEG made of the
restart segments a crop needs, so decoding a random-resized crop entropy-decodes only the crop's
part of the file instead of everything above and beside it (`kernels/jpeg_restart.c`, built on
first use like the other C parts). The planned loader (`load_planned`, decoder 'crop') uses it
by itself when a file has such markers.
"""

from __future__ import annotations

import ctypes
import functools
import os
from dataclasses import dataclass, field
from pathlib import Path

from resnext import native
from resnext.errors import ConfigError, DataError

SOURCE = Path(__file__).with_name("kernels") / "jpeg_restart.c"
FLAGS = ("-O2",)
LIBS = ("-ljpeg",)
DEFAULT_INTERVAL = 4  # MCUs per restart segment, at most: ~3 % larger files on ImageNet photos
JPEG_SUFFIXES = (".jpg", ".jpeg", ".jpe", ".jfif")
_MSG = 200


class RestartRewriteFailed(ValueError):
    """libjpeg could not rewrite the file (corrupt data, CMYK/YCCK), with why."""


@functools.lru_cache(maxsize=1)
def _library() -> ctypes.CDLL:
    lib = native.load(SOURCE, FLAGS, LIBS)
    lib.jpeg_add_restarts.argtypes = [ctypes.c_char_p, ctypes.c_ulong, ctypes.c_int]
    lib.jpeg_add_restarts.argtypes += [ctypes.POINTER(ctypes.c_void_p)]
    lib.jpeg_add_restarts.argtypes += [
        ctypes.POINTER(ctypes.c_ulong),
        ctypes.c_char_p,
        ctypes.c_int,
    ]
    lib.jpeg_add_restarts.restype = ctypes.c_int
    lib.jpeg_restart_free.argtypes = [ctypes.c_void_p]
    lib.jpeg_restart_free.restype = None
    lib.jpeg_restart_cut.argtypes = [ctypes.c_char_p, ctypes.c_long] + [ctypes.c_int] * 5
    lib.jpeg_restart_cut.argtypes += [ctypes.c_char_p, ctypes.c_long]
    lib.jpeg_restart_cut.argtypes += [ctypes.POINTER(ctypes.c_long)]
    lib.jpeg_restart_cut.argtypes += [ctypes.POINTER(ctypes.c_int)] * 2
    lib.jpeg_restart_cut.restype = ctypes.c_int
    lib.jpeg_restart_indexed.argtypes = [ctypes.c_char_p, ctypes.c_long]
    lib.jpeg_restart_indexed.restype = ctypes.c_int
    return lib


@functools.lru_cache(maxsize=1)
def unavailable_reason() -> str | None:
    """None if the rewrite and cut can run here, else why not (one line; decided once per process)."""
    return native.problem(_library)


def add_restarts(data: bytes, interval: int = DEFAULT_INTERVAL) -> bytes:
    """`data` (a JPEG) rewritten losslessly with a restart marker every `interval` MCUs or fewer."""
    if interval < 1:
        raise ConfigError(f"interval: expected MCUs per restart segment >= 1, got {interval}")
    out, size = ctypes.c_void_p(), ctypes.c_ulong()
    msg = ctypes.create_string_buffer(_MSG)
    lib = _library()
    rc = lib.jpeg_add_restarts(
        data, len(data), interval, ctypes.byref(out), ctypes.byref(size), msg, _MSG
    )
    if rc < 0:
        raise RestartRewriteFailed(msg.value.decode(errors="replace") or "libjpeg failed")
    try:
        return ctypes.string_at(out, size.value)
    finally:
        lib.jpeg_restart_free(out)


def is_indexed(data: bytes) -> bool:
    """Whether `data` is a one-scan baseline JPEG with restart markers tiling its MCU rows."""
    return bool(_library().jpeg_restart_indexed(data, len(data)))


@dataclass(frozen=True)
class Cut:
    """A JPEG of part of an image, and where its top-left pixel is in the whole image."""

    data: bytes
    left: int
    top: int


def cut(data: bytes, box: tuple[int, int, int, int], margin: int = 16) -> Cut | None:
    """The restart segments covering pixels box = (x0, y0, x1, y1), `margin` more each way, as a
    JPEG (None when `data` has no row-aligned restart markers or is not as its header says).

    Inside the box its pixels equal the whole image's; within a sample or two of a cut edge that
    is not the image's edge, chroma upsampling differs, which the margin keeps outside the box.
    """
    if not is_indexed(data):  # most files: no output buffer allocated (~20 us -> ~1 us each)
        return None
    x0, y0, x1, y1 = box
    cap = len(data) + 64
    out = ctypes.create_string_buffer(cap)
    size, left, top = ctypes.c_long(), ctypes.c_int(), ctypes.c_int()
    rc = _library().jpeg_restart_cut(
        data, len(data), x0, y0, x1, y1, margin, out, cap,
        ctypes.byref(size), ctypes.byref(left), ctypes.byref(top),
    )  # fmt: skip
    if rc != 0:
        return None
    return Cut(ctypes.string_at(out, size.value), left.value, top.value)


@dataclass
class IndexReport:
    """What `index_tree` did: files rewritten, copied unchanged (not JPEG), or copied because
    libjpeg refused them (each with why), and the bytes before and after."""

    rewritten: int = 0
    copied: int = 0
    refused: dict[str, str] = field(default_factory=dict)
    bytes_in: int = 0
    bytes_out: int = 0


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def index_tree(src: str | Path, dst: str | Path, interval: int = DEFAULT_INTERVAL) -> IndexReport:
    """Copy the folder `src` to `dst` with every JPEG rewritten by `add_restarts` (pixels
    unchanged), other files copied as they are; `src` is only read. Each file is written under a
    temporary name and renamed, so an interrupted run leaves only whole files (rerun to finish:
    files already in `dst` are rewritten again)."""
    src, dst = Path(src).resolve(), Path(dst).resolve()
    if not src.is_dir():
        raise DataError(f"{src}: not a folder")
    if dst == src or src in dst.parents:
        raise ConfigError(f"dst: expected a folder outside {src}, got {dst}")
    # Checked before anything is written, not when the first JPEG comes after copied files.
    if isinstance(interval, bool) or not isinstance(interval, int) or interval < 1:
        raise ConfigError(f"interval: expected MCUs per restart segment >= 1, got {interval!r}")
    if dst.exists() and not dst.is_dir():
        raise ConfigError(f"dst: {dst} exists and is not a folder")
    report = IndexReport()
    for path in sorted(p for p in src.rglob("*") if p.is_file()):
        target = dst / path.relative_to(src)
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:  # e.g. a file in dst where src has a folder
            raise ConfigError(f"dst: cannot make the folder {target.parent} ({exc})") from exc
        data = path.read_bytes()
        report.bytes_in += len(data)
        out = data
        if path.suffix.lower() in JPEG_SUFFIXES and data[:2] == b"\xff\xd8":
            try:
                out = add_restarts(data, interval)
                report.rewritten += 1
            except RestartRewriteFailed as exc:
                report.refused[str(path.relative_to(src))] = str(exc)
        else:
            report.copied += 1
        _write_atomic(target, out)
        report.bytes_out += len(out)
    return report
