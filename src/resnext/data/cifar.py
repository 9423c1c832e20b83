"""CIFAR-10 / CIFAR-100 in the official python format: folder, parent folder, or .tar.gz."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from resnext.data.in_memory import InMemoryImages
from resnext.errors import ConfigError, DataError
from resnext.io.safe_pickle import safe_load
from resnext.io.safe_tar import safe_extract

_LAYOUT = {
    "cifar10": {
        "folder": "cifar-10-batches-py",
        "archive": "cifar-10-python.tar.gz",
        "meta": "batches.meta",
        "train": [f"data_batch_{i}" for i in range(1, 6)],
        "test": ["test_batch"],
        "classes": 10,
    },
    "cifar100": {
        "folder": "cifar-100-python",
        "archive": "cifar-100-python.tar.gz",
        "meta": "meta",
        "train": ["train"],
        "test": ["test"],
        "classes": 100,
    },
}
_PIXELS = 3 * 32 * 32


def _variant_of(folder: Path) -> str | None:
    if (folder / "batches.meta").is_file():
        return "cifar10"
    if (folder / "meta").is_file() and (folder / "train").is_file():
        return "cifar100"
    return None


def _is_archive(path: Path) -> bool:
    return path.is_file() and path.name.endswith((".tar.gz", ".tgz", ".tar"))


def looks_like_cifar(path: str | Path) -> bool:
    """Whether `path` is meant as CIFAR data: an archive, or a folder holding batch or meta files,
    a batches folder or an official archive; a failure to read such a path is a CIFAR error."""
    path = Path(path)
    if _is_archive(path):
        return True
    if not path.is_dir():
        return False
    for layout in _LAYOUT.values():
        files = [layout["meta"], *layout["train"], *layout["test"], layout["archive"]]
        if any((path / name).is_file() for name in files) or (path / layout["folder"]).is_dir():
            return True
    return False


def _extract(archive: Path, extract_dir: Path | None) -> Path:
    stem = archive.name.split(".tar")[0].removesuffix(".tgz")
    target = extract_dir or archive.parent / f"{stem}-extracted"
    if not target.exists() or (target.is_dir() and not any(target.iterdir())):
        try:
            safe_extract(archive, target, max_members=1000, max_total_bytes=1024**3)
        except DataError:
            if not target.is_dir():  # another process may have finished the same extraction
                raise
    return target


def find_cifar_folder(
    root: str | Path, variant: str | None = None, extract_dir: str | Path | None = None
) -> tuple[Path, str]:
    """(batches folder, variant) for a batches folder, a folder holding it, or an archive."""
    root = Path(root)
    if variant is not None and variant not in _LAYOUT:
        raise ConfigError(f"CIFAR variant {variant!r} is not one of {sorted(_LAYOUT)}")
    if not root.exists():
        raise DataError(f"CIFAR root {root} does not exist")
    if _is_archive(root):
        root = _extract(root, Path(extract_dir) if extract_dir else None)
    candidates = [root] + [root / _LAYOUT[v]["folder"] for v in _LAYOUT]
    for folder in candidates:
        found = _variant_of(folder) if folder.is_dir() else None
        if found and (variant is None or variant == found):
            return folder, found
    for v, layout in _LAYOUT.items():
        archive = root / layout["archive"]
        if (variant in (None, v)) and archive.is_file():
            return find_cifar_folder(archive, v, extract_dir)
    wanted = _LAYOUT[variant]["folder"] if variant else "cifar-10-batches-py or cifar-100-python"
    raise DataError(
        f"{root}: no CIFAR data found: expected the folder {wanted} (with batches.meta or meta), "
        "a folder containing it, or the official .tar.gz"
    )


def _int_labels(path: Path, key: str, labels: object) -> list[int]:
    # int() would truncate 3.7 to 3 and parse "3": only integers are labels.
    if isinstance(labels, np.ndarray) and labels.ndim == 1 and labels.dtype.kind in "iu":
        return [int(v) for v in labels]
    if isinstance(labels, (list, tuple)) and all(
        isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in labels
    ):
        return [int(v) for v in labels]
    if isinstance(labels, (list, tuple)):
        bad = next(v for v in labels if not isinstance(v, (int, np.integer)) or isinstance(v, bool))
        got = f"an entry {bad!r} ({type(bad).__name__})"
    else:
        got = type(labels).__name__
    raise DataError(f"{path}: {key!r} must be a list of integer class indices, got {got}")


def _read_batch(path: Path, label_key: str, num_classes: int) -> tuple[np.ndarray, list[int]]:
    if not path.is_file():
        raise DataError(f"CIFAR batch file {path} is missing")
    batch = safe_load(path, what=f"CIFAR batch {path}")
    if not isinstance(batch, dict) or "data" not in batch or label_key not in batch:
        keys = sorted(batch) if isinstance(batch, dict) else type(batch).__name__
        raise DataError(f"{path}: expected a dict with 'data' and {label_key!r}, got {keys}")
    data, labels = batch["data"], batch[label_key]
    if (
        not isinstance(data, np.ndarray)
        or data.dtype != np.uint8
        or data.ndim != 2
        or data.shape[1] != _PIXELS
    ):
        shape = getattr(data, "shape", None)
        raise DataError(f"{path}: 'data' must be uint8 of shape (N, {_PIXELS}), got {shape}")
    labels = _int_labels(path, label_key, labels)
    if len(labels) != len(data):
        raise DataError(f"{path}: {len(data)} images but {len(labels)} labels")
    bad = [v for v in labels if not 0 <= v < num_classes]
    if bad:
        raise DataError(f"{path}: label {bad[0]} outside 0..{num_classes - 1}")
    return data, labels


def _read_classes(path: Path, variant: str, label_kind: str) -> list[str]:
    meta = safe_load(path, what=f"CIFAR meta file {path}") if path.is_file() else None
    if meta is None:
        raise DataError(f"CIFAR meta file {path} is missing")
    key = "label_names" if variant == "cifar10" else f"{label_kind}_label_names"
    if not isinstance(meta, dict) or key not in meta:
        raise DataError(f"{path}: expected a dict with {key!r}")
    raw = meta[key]
    if not isinstance(raw, (list, tuple)) or not all(isinstance(n, (str, bytes)) for n in raw):
        got = type(raw).__name__ if not isinstance(raw, (list, tuple)) else "a non-string entry"
        raise DataError(f"{path}: {key!r} must be a list of class names (strings), got {got}")
    try:
        return [n.decode() if isinstance(n, bytes) else n for n in raw]
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: {key!r} holds a class name that is not UTF-8 ({exc})") from exc


class CIFARDataset(InMemoryImages):
    """CIFAR-10/100 images as (N, 32, 32, 3) uint8 with integer targets and class names."""

    def __init__(
        self,
        root: str | Path,
        train: bool,
        transform: Callable[[Image.Image], Any] | None = None,
        variant: str | None = None,
        *,
        label_kind: str = "fine",
        extract_dir: str | Path | None = None,
    ) -> None:
        if label_kind not in ("fine", "coarse"):
            raise ConfigError(f"label_kind must be 'fine' or 'coarse', got {label_kind!r}")
        self.folder, self.variant = find_cifar_folder(root, variant, extract_dir)
        layout = _LAYOUT[self.variant]
        self.classes = _read_classes(self.folder / layout["meta"], self.variant, label_kind)
        expected = layout["classes"] if label_kind == "fine" else 20
        if len(self.classes) != expected:
            raise DataError(
                f"{self.folder}: meta lists {len(self.classes)} classes, expected {expected}"
            )
        label_key = "labels" if self.variant == "cifar10" else f"{label_kind}_labels"
        parts = [
            _read_batch(self.folder / name, label_key, expected)
            for name in layout["train" if train else "test"]
        ]
        flat = np.concatenate([p[0] for p in parts])
        # Rows store the R, G, B planes one after another: (N, 3, 32, 32) -> (N, 32, 32, 3).
        self.data = np.ascontiguousarray(flat.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        self.targets = [t for p in parts for t in p[1]]
        self.train, self.transform = train, transform

    def __repr__(self) -> str:
        split = "train" if self.train else "test"
        return f"CIFARDataset({self.variant}, {split}, n={len(self)}, folder={self.folder})"
