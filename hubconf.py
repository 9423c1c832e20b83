"""torch.hub entry points: one per registered model, `torch.hub.load(REPO, NAME, pretrained=False,
**create_model_arguments)` (the repository's own `src/` is imported, whatever is installed)."""

import sys as _sys
from collections.abc import Callable as _Callable
from pathlib import Path as _Path
from typing import Any as _Any

from torch.nn import Module as _Module

dependencies = ["torch", "numpy", "PIL"]

_sys.path.insert(0, str(_Path(__file__).resolve().parent / "src"))

from resnext.models import MODELS as _MODELS  # noqa: E402  (importable once src/ is on the path)
from resnext.models import create_model as _create_model  # noqa: E402


def _entry_point(name: str) -> _Callable[..., _Module]:
    def build(pretrained: bool = False, **kwargs: _Any) -> _Module:
        return _create_model(name, pretrained=pretrained, **kwargs)

    build.__name__ = build.__qualname__ = name
    build.__doc__ = (
        f"resnext's {name}: `pretrained=True` loads its default weights (downloaded, verified); "
        "other arguments are resnext.create_model's (num_classes, weights, features_only, spec "
        "fields)."
    )
    return build


for _entry in _MODELS:
    globals()[_entry.name] = _entry_point(_entry.name)
