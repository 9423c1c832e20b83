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
