"""`create_model(name, weights=FILE)` and `resnext convert`: files of other libraries load to the same function."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import resnext
from resnext.cli import main
from resnext.errors import WeightsError


def _mmpretrain_file(model: torch.nn.Module, path: Path) -> Path:
    # mmpretrain layout per zoo-facts.md: {'meta', 'state_dict'}, `backbone.` prefix, `head.fc.`.
    sd = {
        (f"head.{k}" if k.startswith("fc.") else f"backbone.{k}"): v
        for k, v in model.state_dict().items()
    }
    torch.save({"meta": {"epoch": 100}, "state_dict": sd}, path)
    return path


def test_create_model_with_mmpretrain_file(tmp_path: Path) -> None:
    ref = resnext.create_model("resnext_tiny").eval()
    for m in ref.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
    src = _mmpretrain_file(ref, tmp_path / "mm.pth")
    model = resnext.create_model("resnext_tiny", weights=src).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), ref(x))
    # A new head for another task keeps the backbone.
    tuned = resnext.create_model("resnext_tiny", weights=src, num_classes=4)
    assert tuned.fc.out_features == 4
    assert torch.equal(tuned.layer1[0].conv2.weight, ref.layer1[0].conv2.weight)


def test_wrong_architecture_is_one_clear_error(tmp_path: Path) -> None:
    src = _mmpretrain_file(resnext.create_model("resnext_tiny"), tmp_path / "mm.pth")
    with pytest.raises(WeightsError, match=r"layer"):
        resnext.create_model("resnext_tiny_in", weights=src)


def test_convert_command_writes_native(tmp_path: Path) -> None:
    ref = resnext.create_model("resnext_tiny").eval()
    src = _mmpretrain_file(ref, tmp_path / "mm.pth")
    out = tmp_path / "tiny.safetensors"
    assert main(["convert", str(src), "--model", "resnext_tiny", "--output", str(out)]) == 0
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["provenance"]["source_format"] == "mmpretrain"
    back = resnext.create_model("resnext_tiny", weights=out).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(back(x), ref(x))
    # Never overwrites what was already written.
    before = out.read_bytes()
    assert main(["convert", str(src), "--model", "resnext_tiny", "--output", str(out)]) == 2
    assert out.read_bytes() == before
