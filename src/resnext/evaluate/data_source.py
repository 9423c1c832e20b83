"""Which dataset a --data path holds (ImageFolder, or CIFAR as a folder or archive), opened as PIL images."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from PIL import Image

from resnext.errors import DataError


def keep_pil(image: Image.Image) -> Image.Image:
    """The dataset transform of evaluation: images stay PIL; the protocol makes the views."""
    return image


def _has_class_folders(path: Path) -> bool:
    return path.is_dir() and any(child.is_dir() for child in path.iterdir())


def open_dataset(
    path: str | Path, split: str = "val", image_size: int = 32
) -> tuple[Any, dict[str, Any]]:
    """The dataset at `path` yielding (PIL image, label), and a JSON-ready description of it.

    CIFAR is recognised by its batch files (folder, parent folder or official archive); otherwise
    `path` is an ImageFolder split (`path/<class>/<images>`) or a root holding `path/<split>/`.
    The word `digits` names the embedded digits test split, drawn at `image_size` pixels.
    """
    from resnext.data import CIFARDataset, ImageFolderDataset, build_dataset, find_cifar_folder
    from resnext.data.cifar import looks_like_cifar

    if str(path) == "digits" and not Path(path).exists():
        digits = build_dataset("digits", None, "test", keep_pil, image_size=image_size)
        return digits, {
            "kind": "digits",
            "path": None,
            "split": "test",
            "images": len(digits),
            "classes": 10,
        }
    path = Path(path)
    if not path.exists():
        raise DataError(f"dataset {path}: no such file or folder")
    try:
        folder, variant = find_cifar_folder(path)
    except DataError:
        # An archive or a folder of CIFAR files that cannot be read is CIFAR's error to report
        # (truncated archive, missing meta), not "neither CIFAR nor an ImageFolder".
        if looks_like_cifar(path):
            raise
        folder, variant = None, None
    if folder is not None:
        dataset: Any = CIFARDataset(folder, False, keep_pil, variant)
        kind, root, split_name = str(variant), folder, "test"
    else:
        root = path / split if _has_class_folders(path / split) else path
        if not _has_class_folders(root):
            raise DataError(
                f"dataset {path}: neither CIFAR data nor an ImageFolder "
                f"(expected {path}/<class>/<images> or {path}/{split}/<class>/<images>)"
            )
        # strict: an unreadable image is an error, never silently replaced by another one;
        # no JPEG draft decoding, so pixels are those of a full decode as in published pipelines.
        dataset = ImageFolderDataset(root, keep_pil, strict=True, use_draft=False)
        kind, split_name = "imagefolder", root.name
    return dataset, {
        "kind": kind,
        "path": str(root),
        "split": split_name,
        "images": len(dataset),
        "classes": len(dataset.classes),
    }
