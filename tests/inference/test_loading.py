"""load_model on torch weights files: each file is read from disk once, whatever its kind."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from resnext.inference.loading import load_model
from resnext.models import create_model


@pytest.fixture
def count_reads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    reads: list[str] = []
    real = torch.load

    def counting_load(f, *args, **kwargs):  # type: ignore[no-untyped-def]
        reads.append(str(f))
        return real(f, *args, **kwargs)

    monkeypatch.setattr(torch, "load", counting_load)
    return reads


@pytest.mark.parametrize("suffix", [".pth", ".pt", ".ckpt"])
def test_a_float_state_dict_file_is_read_once_and_loaded_whole(
    tmp_path: Path, count_reads: list[str], suffix: str
) -> None:
    torch.manual_seed(0)
    net = create_model("resnext_tiny_in", num_classes=7).eval()
    path = tmp_path / f"tiny{suffix}"
    torch.save(net.state_dict(), path)

    loaded = load_model("resnext_tiny_in", path)

    assert count_reads == [str(path)]
    assert loaded.source_format == "torchvision"
    state = loaded.model.state_dict()
    assert state.keys() == net.state_dict().keys()
    assert all(torch.equal(state[k], v) for k, v in net.state_dict().items())


def test_a_training_checkpoint_is_read_once(tmp_path: Path, count_reads: list[str]) -> None:
    net = create_model("resnext_tiny_in", num_classes=3)
    path = tmp_path / "last.pt"
    torch.save({"model": net.state_dict(), "config": {"model": {"name": "resnext_tiny_in"}}}, path)

    loaded = load_model(None, path)

    assert count_reads == [str(path)]
    assert loaded.name == "resnext_tiny_in" and loaded.source_format == "resnext_train_checkpoint"
    assert torch.equal(loaded.model.fc.weight, net.fc.weight)


def test_an_unreadable_torch_file_is_named_by_the_weights_loader(tmp_path: Path) -> None:
    from resnext.errors import WeightsError

    path = tmp_path / "broken.pth"
    path.write_bytes(b"not a checkpoint at all")
    # Garbage is damage, not a pickle asking to run code: the message must say which.
    message = (
        r"broken\.pth: not a readable PyTorch checkpoint \(its pickle is malformed: Unsupported"
    )
    with pytest.raises(WeightsError, match=message):
        load_model("resnext_tiny_in", path)


@pytest.mark.parametrize(
    "device, expected",
    [
        ("tpu", "device: expected 'cpu', 'cuda' or 'cuda:N', got 'tpu'"),
        ("meta", "device: the network runs on 'cpu' or 'cuda', got 'meta'"),
        # more CUDA devices than any machine has: refused with or without CUDA
        ("cuda:99", "device: 'cuda:99' asked for, but torch sees "),
    ],
)
def test_a_device_torch_cannot_run_on_is_refused_before_the_weights_are_read(
    tmp_path: Path, count_reads: list[str], device: str, expected: str
) -> None:
    from resnext.errors import ConfigError
    from resnext.inference.predictor import Predictor

    path = tmp_path / "last.pt"
    net = create_model("resnext_tiny_in", num_classes=3)
    torch.save({"model": net.state_dict(), "config": {"model": {"name": "resnext_tiny_in"}}}, path)
    count_reads.clear()
    with pytest.raises(ConfigError) as info:
        load_model(None, path, device=device)
    assert str(info.value).startswith(expected)
    with pytest.raises(ConfigError) as info:
        Predictor(weights=path, device=device)
    assert str(info.value).startswith(expected)
    assert count_reads == []


@pytest.mark.parametrize("command", ["eval", "predict"])
def test_cli_device_errors_exit_2_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture, command: str
) -> None:
    from resnext.cli import main

    path = tmp_path / "last.pt"
    net = create_model("resnext_tiny", num_classes=10)
    torch.save({"model": net.state_dict(), "config": {"model": {"name": "resnext_tiny"}}}, path)
    from PIL import Image

    Image.new("RGB", (8, 8)).save(tmp_path / "img.png")
    where = ["--data", "digits"] if command == "eval" else [str(tmp_path / "img.png")]
    assert main([command, "--weights", str(path), *where, "--device", "cuda:99"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"resnext {command}: error: device: 'cuda:99' asked for")
    assert len(err.strip().splitlines()) == 1


def test_a_headless_training_checkpoint_loads_headless(tmp_path: Path) -> None:
    # A run of a network without classifier (num_classes 0): no fc in its state, and none made up.
    net = create_model("resnext_tiny_in", num_classes=0)
    path = tmp_path / "last.pt"
    config = {"model": {"name": "resnext_tiny_in", "spec": {"num_classes": 0}}}
    torch.save({"model": net.state_dict(), "config": config}, path)
    loaded = load_model(None, path).model
    assert loaded.num_classes == 0 and isinstance(loaded.fc, torch.nn.Identity)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), net.eval()(x))


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (
            {"model": {"name": "resnext_tiny_in", "spec": [1]}},
            "config model.spec: expected a table",
        ),
        ({"model": {"spec": {}}}, "its config names no model"),
        ({"model": {"name": "resnext_tiny_in", "spec": {"widht": 3}}}, "widht"),
    ],
)
def test_a_run_checkpoint_with_a_damaged_config_is_named(
    tmp_path: Path, config: dict, message: str
) -> None:
    from resnext.errors import ResNeXtError

    path = tmp_path / "last.pt"
    state = create_model("resnext_tiny_in").state_dict()
    # the tag `resnext train` writes: these are run checkpoints, damaged
    torch.save({"model": state, "config": config, "format": "resnext-train-checkpoint/1"}, path)
    with pytest.raises(ResNeXtError, match=message):
        load_model(None, path)


def test_another_trainers_model_and_config_checkpoint_is_read_by_its_keys(tmp_path: Path) -> None:
    # Swin-style trainers also save {'model', 'optimizer', 'epoch', 'config'}; without our tag
    # or a config naming one of our models it is a torchvision-keyed state dict, as before.
    from resnext.weights import load_weights

    net = create_model("resnext_tiny_in")
    state = {k: v for k, v in net.state_dict().items() if not k.endswith("num_batches_tracked")}
    path = tmp_path / "ckpt.pth"
    config = {"MODEL": {"TYPE": "resnext"}, "model": {"arch": "x"}, "DATA": {"IMG_SIZE": 224}}
    torch.save({"model": state, "optimizer": {}, "epoch": 3, "config": config}, path)
    loaded = load_weights(path)
    assert loaded.source_format == "torchvision"
    assert (loaded.preprocessing.resize, loaded.preprocessing.crop) == (256, 224)
    assert loaded.spec_overrides == {"stride_in_1x1": False}
