"""Other CPU inference engines as benchmark peers (ONNX Runtime, OpenVINO), when installed."""

from __future__ import annotations

import importlib.util
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

Runner = Callable[[np.ndarray], object]


def available(name: str) -> bool:
    """True when the peer's Python package can be imported."""
    return importlib.util.find_spec(name) is not None


def onnxruntime_runner(model: nn.Module, example: torch.Tensor, threads: int) -> Runner:
    """An ONNX Runtime session of `model` (fp32, exported at the example's shape)."""
    # The session holds the model in memory: its file (ResNeXt-50: ~100 MB) goes with the folder.
    with tempfile.TemporaryDirectory(prefix="resnext-onnx-") as folder:
        return _session(_exported(model, example, Path(folder)), threads)


def _exported(model: nn.Module, example: torch.Tensor, folder: Path) -> Path:
    """`model` in eval mode exported to ONNX at the example's shape, as `folder`/fp32.onnx."""
    path = folder / "fp32.onnx"
    with torch.no_grad():
        torch.onnx.export(model.eval(), (example,), str(path), input_names=["x"], dynamo=True)
    return path


def _session(path: Path, threads: int) -> Runner:
    """An ONNX Runtime CPU session of the model file at `path`, as a callable on numpy inputs."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # Idle ORT threads would otherwise spin and steal the cores from the interleaved torch rounds.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda x: session.run(None, {name: x})


def onnxruntime_int8_runner(
    model: nn.Module, example: torch.Tensor, calibration: torch.Tensor, threads: int
) -> Runner:
    """An ONNX Runtime session of `model` quantized to int8 by ONNX Runtime's own static
    quantization (QDQ, int8 weights per channel, uint8 activations), its ranges observed on
    `calibration`: the peer of `quantize_int8`."""
    with tempfile.TemporaryDirectory(prefix="resnext-onnx-int8-") as folder:
        return _session(_quantized(model, example, calibration, Path(folder)), threads)


def _quantized(
    model: nn.Module, example: torch.Tensor, calibration: torch.Tensor, folder: Path
) -> Path:
    """`model` exported and quantized by ONNX Runtime (see `onnxruntime_int8_runner`), as
    `folder`/int8.onnx."""
    from onnxruntime import quantization as ortq

    fp32 = _exported(model, example, folder)
    ortq.quant_pre_process(str(fp32), str(folder / "prep.onnx"))

    class _Batches(ortq.CalibrationDataReader):
        def __init__(self) -> None:
            self.left = [{"x": calibration.numpy()}]

        def get_next(self) -> dict | None:
            return self.left.pop() if self.left else None

    ortq.quantize_static(
        str(folder / "prep.onnx"),
        str(folder / "int8.onnx"),
        _Batches(),
        quant_format=ortq.QuantFormat.QDQ,
        per_channel=True,
        activation_type=ortq.QuantType.QUInt8,
        weight_type=ortq.QuantType.QInt8,
    )
    return folder / "int8.onnx"


def openvino_runner(
    model: nn.Module, example: torch.Tensor, threads: int, precision: str
) -> Runner:
    """An OpenVINO CPU model of `model` with inference precision 'f32', 'bf16' or 'f16'."""
    import openvino as ov

    with torch.no_grad():
        converted = ov.convert_model(model.eval(), example_input=example)
    config = {"INFERENCE_PRECISION_HINT": precision, "INFERENCE_NUM_THREADS": threads}
    compiled = ov.Core().compile_model(converted, "CPU", config)
    request = compiled.create_infer_request()
    return lambda x: request.infer([x])
