"""ONNX export with a dynamic batch axis, checked against onnxruntime."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from resnext.errors import ConfigError, ResNeXtError
from resnext.io.atomic import replacing


class ExportError(ResNeXtError):
    """An export that failed or whose result disagrees with the PyTorch model."""


def make_output_folder(path: Path) -> None:
    """Create the folder that will hold `path`; failing that, an ExportError naming it."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ExportError(
            f"cannot create the output folder {path.parent} for {path}: {exc}"
        ) from None


def _require(module: str) -> object:
    try:
        return __import__(module)
    except ImportError as exc:
        raise ConfigError(
            f"ONNX export needs the optional package {module!r} (pip install onnx onnxruntime)"
        ) from exc


def export_onnx(
    model: nn.Module, path: str | Path, *, image_size: int = 224, opset: int = 18
) -> Path:
    """Write `model` as ONNX with input 'images' (N,3,S,S), output 'logits' (N,K), N dynamic."""
    _require("onnx")
    path = Path(path)
    make_output_folder(path)
    model = model.eval().cpu()
    example = torch.randn(2, 3, image_size, image_size)
    try:
        with replacing(path) as tmp:
            torch.onnx.export(
                model,
                (example,),
                str(tmp),
                input_names=["images"],
                output_names=["logits"],
                dynamic_shapes={"x": {0: torch.export.Dim("batch", min=1, max=4096)}},
                opset_version=opset,
                dynamo=True,
                external_data=False,
                verbose=False,
            )
            import onnx

            onnx.checker.check_model(str(tmp))
    except ResNeXtError:
        raise
    except Exception as exc:
        raise ExportError(f"ONNX export of {type(model).__name__} to {path} failed: {exc}") from exc
    return path


@dataclass(frozen=True)
class ParityResult:
    """Largest absolute difference between onnxruntime and PyTorch outputs on each input set."""

    max_abs_diff: dict[str, float]
    batch_sizes: dict[str, int]

    @property
    def worst(self) -> float:
        return max(self.max_abs_diff.values())


def onnx_parity(
    model: nn.Module, path: str | Path, inputs: dict[str, torch.Tensor]
) -> ParityResult:
    """Run the ONNX file with onnxruntime (CPU) and PyTorch on each named input batch."""
    ort = _require("onnxruntime")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])  # type: ignore[attr-defined]
    model = model.eval().cpu()
    diffs, sizes = {}, {}
    for name, x in inputs.items():
        with torch.no_grad():
            ref = model(x).numpy()
        got = session.run(["logits"], {"images": x.numpy().astype(np.float32)})[0]
        if got.shape != ref.shape:
            raise ExportError(f"ONNX output shape {got.shape} differs from PyTorch {ref.shape}")
        diffs[name] = float(np.abs(got - ref).max())
        sizes[name] = int(x.shape[0])
    return ParityResult(diffs, sizes)
