"""An ImageNet-layout folder dataset (root/<class>/<images>) that skips and reports bad files."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from resnext.data.functional import to_tensor
from resnext.data.images import load_rgb
from resnext.data.planned import PlannedTransform, load_planned
from resnext.errors import DataError

logger = logging.getLogger("resnext.data")

IMG_EXTENSIONS = (
    ".jpg",
    ".jpeg",
    ".png",
    ".ppm",
    ".pgm",
    ".pbm",
    ".bmp",
    ".tif",
    ".tiff",
    ".webp",
    ".gif",
)
_MAX_REPLACEMENTS = 50


def _walk_files(folder: Path, extensions: tuple[str, ...]) -> list[Path]:
    """Image files under `folder`, following links but visiting each real folder once."""
    found: list[Path] = []
    seen: set[tuple[int, int]] = set()
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        stat = os.stat(dirpath)
        if (stat.st_dev, stat.st_ino) in seen:  # a link loop or a second path to the same folder
            dirnames[:] = []
            continue
        seen.add((stat.st_dev, stat.st_ino))
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if name.lower().endswith(extensions) and not name.startswith("."):
                found.append(Path(dirpath) / name)
    return found


class ImageFolderDataset(torch.utils.data.Dataset):
    """root/<class>/** images; class index = position of the folder name in sorted order.

    Unreadable images (zero-byte, corrupt, truncated, not an image, over the decompression-bomb
    limit) are logged once on logger 'resnext.data', counted in `bad_files`, and replaced by the
    next good sample; `strict=True` raises DataError instead. `verify=True` decodes every file at
    construction so that bad ones are filtered out before training (slow on large sets).
    """

    def __init__(
        self,
        root: str | Path,
        transform: Callable[[Image.Image], Any] | None = None,
        strict: bool = False,
        extensions: Iterable[str] = IMG_EXTENSIONS,
        *,
        verify: bool = False,
        use_draft: bool = True,
        max_pixels: int | None = None,
    ) -> None:
        self.root = Path(root)
        self.transform, self.strict, self.use_draft = transform, strict, use_draft
        self.max_pixels = max_pixels
        self.extensions = tuple(
            e.lower() if e.startswith(".") else f".{e.lower()}" for e in extensions
        )
        self.bad_files: dict[str, str] = {}
        if not self.root.is_dir():
            raise DataError(f"image folder {self.root} does not exist or is not a folder")
        self.classes = sorted(
            e.name for e in os.scandir(self.root) if e.is_dir() and not e.name.startswith(".")
        )
        if not self.classes:
            raise DataError(
                f"{self.root}: no class folders: expected the layout {self.root}/<class>/<image files>"
            )
        self.class_to_idx = {name: i for i, name in enumerate(self.classes)}
        self.samples: list[tuple[str, int]] = []
        for name in self.classes:
            files = _walk_files(self.root / name, self.extensions)
            if not files:
                raise DataError(
                    f"class folder {self.root / name} holds no image files "
                    f"(extensions {', '.join(self.extensions)})"
                )
            self.samples.extend((str(f), self.class_to_idx[name]) for f in files)
        self._drop_bad(verify)
        if not self.samples:
            raise DataError(f"{self.root}: every image file is unreadable; nothing to load")
        self.targets = [t for _, t in self.samples]

    def _drop_bad(self, verify: bool) -> None:
        kept = []
        for path, target in self.samples:
            try:
                if os.path.getsize(path) == 0:
                    raise DataError(f"{path}: zero-byte file")
                if verify:
                    load_rgb(path, draft=lambda w, h: (64, 64), max_pixels=self.max_pixels)
            except (DataError, OSError) as exc:
                self._report(path, exc)
                continue
            kept.append((path, target))
        self.samples = kept

    def _report(self, path: str, exc: Exception) -> None:
        if self.strict:
            raise exc if isinstance(exc, DataError) else DataError(f"{path}: {exc}") from None
        if path not in self.bad_files:
            self.bad_files[path] = str(exc)
            logger.warning("skipping unreadable image: %s", exc)

    def load(self, index: int) -> Image.Image:
        """The RGB image of sample `index` (DataError if unreadable)."""
        path = self.samples[index][0]
        draft = getattr(self.transform, "draft_size", None) if self.use_draft else None
        return load_rgb(path, draft=draft, max_pixels=self.max_pixels)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        for step in range(min(_MAX_REPLACEMENTS, len(self.samples))):
            i = (index + step) % len(self.samples)
            try:
                if isinstance(self.transform, PlannedTransform):
                    out = load_planned(
                        self.samples[i][0],
                        self.transform,
                        use_draft=self.use_draft,
                        max_pixels=self.max_pixels,
                    )
                    return out, self.samples[i][1]
                img = self.load(i)
            except DataError as exc:
                self._report(self.samples[i][0], exc)
                continue
            out = self.transform(img) if self.transform else to_tensor(img)
            return out, self.samples[i][1]
        raise DataError(
            f"{self.root}: {_MAX_REPLACEMENTS} unreadable images in a row from index {index}; "
            "the dataset looks broken"
        )

    def __repr__(self) -> str:
        return f"ImageFolderDataset({self.root}, classes={len(self.classes)}, n={len(self)})"
