"""torch.export: an ExportedProgram with a dynamic batch, saved and loaded with torch.export.save/load."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from resnext.errors import ConfigError
from resnext.export.onnx_export import ExportError, make_output_folder
from resnext.io.atomic import replacing


def export_program(model: nn.Module, *, image_size: int = 224) -> torch.export.ExportedProgram:
    """Trace `model` (eval mode) for inputs (N,3,S,S) with N dynamic."""
    model = model.eval().cpu()
    example = torch.randn(2, 3, image_size, image_size)
    batch = torch.export.Dim("batch", min=1, max=4096)
    try:
        return torch.export.export(model, (example,), dynamic_shapes={"x": {0: batch}})
    except Exception as exc:
        raise ExportError(f"torch.export of {type(model).__name__} failed: {exc}") from exc


def save_program(program: torch.export.ExportedProgram, path: str | Path) -> Path:
    """Write the program as a .pt2 archive (written beside, then renamed into place)."""
    path = Path(path)
    if path.suffix != ".pt2":
        raise ConfigError(f"{path}: torch.export archives end in .pt2")
    make_output_folder(path)
    try:
        with replacing(path) as tmp:
            torch.export.save(program, tmp)
    except OSError as exc:
        raise ExportError(f"cannot write the exported program {path}: {exc}") from None
    return path


def load_program(path: str | Path) -> torch.export.ExportedProgram:
    """Read a .pt2 archive written by `save_program`."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"exported program {path}: no such file")
    try:
        return torch.export.load(path)
    except Exception as exc:
        raise ExportError(f"exported program {path}: unreadable ({exc})") from exc
