"""Export: ONNX (checked against onnxruntime) and torch.export ExportedProgram archives."""

from __future__ import annotations

from resnext.export.onnx_export import ExportError, ParityResult, export_onnx, onnx_parity
from resnext.export.torch_export import export_program, load_program, save_program

__all__ = [
    "ExportError",
    "ParityResult",
    "export_onnx",
    "export_program",
    "load_program",
    "onnx_parity",
    "save_program",
]
