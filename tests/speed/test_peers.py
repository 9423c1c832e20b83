"""The benchmark peers' ONNX Runtime int8 session: the model it runs, and no files left behind
(the float32 one: tests/speed/test_speed_bench_cmd.py)."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
import torch

import resnext
from resnext.speed import peers

pytestmark = pytest.mark.skipif(
    not peers.available("onnxruntime"), reason="onnxruntime is not installed"
)


@pytest.fixture
def temp_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """tempfile's folder for the test: what the runners leave there is what they leak (torch's
    exporter may keep its own compile cache there too)."""
    root = tmp_path / "tmp"
    root.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(root))
    return root


def left_behind(root: Path) -> list[str]:
    """What a runner left in tempfile's folder `root`."""
    return [p.name for p in root.iterdir() if p.name.startswith("resnext")]


def _tiny() -> tuple[torch.nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    return resnext.create_model("resnext_tiny", num_classes=5).eval(), torch.randn(2, 3, 32, 32)


def test_the_int8_session_runs_the_quantized_model_and_leaves_no_files(temp_root: Path) -> None:
    model, x = _tiny()
    run = peers.onnxruntime_int8_runner(model, x, torch.randn(2, 3, 32, 32), threads=1)
    assert left_behind(temp_root) == []
    (got,) = run(x.numpy())
    with torch.no_grad():
        expected = model(x)
    assert got.shape == tuple(expected.shape)
    # int8: near the float function, not equal to it
    err = (torch.from_numpy(got) - expected).abs().max() / expected.abs().max()
    assert err < 0.2
