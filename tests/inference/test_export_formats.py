"""ONNX export checked against onnxruntime, and a torch.export archive round trip."""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import resnext
from resnext.commands import export_cmd
from resnext.errors import ConfigError
from resnext.export import (
    ExportError,
    export_onnx,
    export_program,
    load_program,
    onnx_parity,
    save_program,
)

HAS_ORT = importlib.util.find_spec("onnxruntime") is not None and importlib.util.find_spec("onnx")


def _model() -> torch.nn.Module:
    model = resnext.create_model("resnext_tiny").eval()
    # Non-trivial BN statistics, so a wrong BN folding in the exporter would show.
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    return model


def _real_batch(cifar10_mini: Path) -> torch.Tensor:
    from resnext.data import CIFARDataset

    data = CIFARDataset(cifar10_mini, False, lambda img: img)
    arrays = [np.asarray(data[i][0], dtype=np.float32) / 255 for i in range(5)]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


@pytest.fixture(scope="module")
def onnx_export(tmp_path_factory: pytest.TempPathFactory) -> tuple[torch.nn.Module, Path, dict]:
    """One `resnext export --format onnx` run of a training checkpoint, shared by the ONNX tests."""
    if not HAS_ORT:
        pytest.skip("onnx/onnxruntime not installed (optional export deps)")
    tmp = tmp_path_factory.mktemp("onnx")
    model = _model()
    ckpt = tmp / "ckpt.pt"
    config = {"model": {"name": "resnext_tiny"}, "data": {"kind": "cifar10", "image_size": 32}}
    torch.save({"model": model.state_dict(), "config": config}, ckpt)
    parser = argparse.ArgumentParser()
    export_cmd.add_parser(parser.add_subparsers())
    out = tmp / "cli.onnx"
    for i, colour in enumerate([(250, 20, 20), (10, 120, 240)]):
        Image.new("RGB", (40, 36), colour).save(tmp / f"pic{i}.png")
    argv = ["export", "resnext_tiny", "--weights", str(ckpt), "--format", "onnx"]
    argv += ["--output", str(out), "--check-images", str(tmp / "pic0.png"), str(tmp / "pic1.png")]
    args = parser.parse_args(argv)
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        assert export_cmd.run(args) == 0
    return model, out, json.loads(buffer.getvalue())


def test_onnx_matches_pytorch_on_random_and_real_inputs(onnx_export, cifar10_mini: Path) -> None:
    model, path, summary = onnx_export
    assert summary["image_size"] == 32
    assert set(summary["onnxruntime_max_abs_diff"]) == {"random_b1", "random_b3", "images"}
    assert max(summary["onnxruntime_max_abs_diff"].values()) < 1e-4
    inputs = {
        "random_b1": torch.randn(1, 3, 32, 32),
        "random_b7": torch.randn(7, 3, 32, 32),  # another batch size: the axis is dynamic
        "cifar_b5": _real_batch(cifar10_mini),
    }
    parity = onnx_parity(model, path, inputs)
    assert parity.batch_sizes == {"random_b1": 1, "random_b7": 7, "cifar_b5": 5}
    assert parity.worst < 1e-4, parity.max_abs_diff


def test_torch_export_round_trip(tmp_path: Path) -> None:
    model = _model()
    program = export_program(model, image_size=32)
    path = save_program(program, tmp_path / "tiny.pt2")
    loaded = load_program(path).module()
    for batch in (1, 3):
        x = torch.randn(batch, 3, 32, 32)
        with torch.no_grad():
            torch.testing.assert_close(loaded(x), model(x), atol=1e-5, rtol=1e-5)
    with pytest.raises(ConfigError, match="pt2"):
        save_program(program, tmp_path / "tiny.bin")
    with pytest.raises(ConfigError, match="no such file"):
        load_program(tmp_path / "absent.pt2")


def test_onnx_file_runs_in_onnxruntime_directly(onnx_export) -> None:
    import onnxruntime as ort

    model, path, _ = onnx_export
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    img = np.asarray(Image.new("RGB", (32, 32), (200, 10, 90)), dtype=np.float32)[None] / 255
    got = sess.run(None, {"images": img.transpose(0, 3, 1, 2).copy()})[0]
    with torch.no_grad():
        ref = model(torch.from_numpy(img).permute(0, 3, 1, 2)).numpy()
    assert got.shape == (1, 10)
    assert np.abs(got - ref).max() < 1e-4


@pytest.mark.parametrize("size", ["0", "-5", "abc"])
def test_image_size_below_one_is_refused_at_parsing(
    size: str, capsys: pytest.CaptureFixture
) -> None:
    parser = argparse.ArgumentParser()
    export_cmd.add_parser(parser.add_subparsers())
    argv = ["export", "resnext_tiny", "--format", "onnx", "--output", "x.onnx"]
    with pytest.raises(SystemExit) as info:
        parser.parse_args([*argv, "--image-size", size])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "--image-size" in err and "expected a whole number >= 1" in err
    assert parser.parse_args([*argv, "--image-size", "1"]).image_size == 1


def test_output_folder_that_cannot_be_made_is_named(tmp_path: Path) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    target = blocker / "sub" / "tiny.pt2"  # its folder would have to be made inside a file
    with pytest.raises(ExportError, match=r"cannot create the output folder .*a_file/sub"):
        save_program(export_program(_model(), image_size=32), target)
    if HAS_ORT:
        with pytest.raises(ExportError, match=r"cannot create the output folder .*a_file/sub"):
            export_onnx(_model(), target.with_suffix(".onnx"), image_size=32)
    assert blocker.read_text() == "not a folder"


def test_unreadable_check_images_fail_before_the_onnx_file_is_written(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from resnext.cli import main

    if not HAS_ORT:
        pytest.skip("onnx/onnxruntime not installed (optional export deps)")
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not an image")
    out = tmp_path / "tiny.onnx"
    argv = ["export", "resnext_tiny", "--format", "onnx", "--output", str(out)]
    assert main([*argv, "--check-images", str(bad)]) == 2
    assert "broken.png" in capsys.readouterr().err
    assert not out.exists()  # an ONNX file left there would be taken as checked
