"""Weights files that lie or do not fit: one WeightsError naming the problem and the fix."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from rel_helpers import record
from safetensors.torch import save_file

from resnext import create_model
from resnext.errors import WeightsError
from resnext.weights import apply_weights, build_with_weights, read_weights_file


def _safetensors(header: dict, body: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + body


LYING_HEADERS = {
    # name: (header, data section)
    "bigger than data": (
        {"w": {"dtype": "F32", "shape": [100], "data_offsets": [0, 400]}},
        b"\0" * 16,
    ),
    "shape vs span": ({"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 8]}}, b"\0" * 16),
    "negative shape": ({"w": {"dtype": "F32", "shape": [-4], "data_offsets": [0, 16]}}, b"\0" * 16),
    "offsets reversed": ({"w": {"dtype": "F32", "shape": [0], "data_offsets": [8, 0]}}, b"\0" * 16),
    "overlap": (
        {
            "a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
            "b": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]},
        },
        b"\0" * 24,
    ),
    "unknown dtype": ({"w": {"dtype": "F99", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 16),
    "missing offsets": ({"w": {"dtype": "F32", "shape": [4]}}, b"\0" * 16),
    "huge shape": (
        {"w": {"dtype": "F32", "shape": [2**40, 2**40], "data_offsets": [0, 16]}},
        b"\0" * 16,
    ),
}


def test_safetensors_headers_that_lie_are_refused_by_name(tmp_path: Path) -> None:
    for name, (header, body) in LYING_HEADERS.items():
        path = tmp_path / f"{name.replace(' ', '_')}.safetensors"
        path.write_bytes(_safetensors(header, body))
        with pytest.raises(WeightsError) as info:
            read_weights_file(path)
        assert str(path) in str(info.value), name
    claims_more = tmp_path / "claims_more.safetensors"
    claims_more.write_bytes(struct.pack("<Q", 10**12) + b"{}")
    with pytest.raises(WeightsError, match="header claims"):
        read_weights_file(claims_more)
    not_json = tmp_path / "not_json.safetensors"
    not_json.write_bytes(struct.pack("<Q", 4) + b"\xff\xfe{]")
    with pytest.raises(WeightsError, match="not valid JSON"):
        read_weights_file(not_json)
    record("lying_safetensors", len(LYING_HEADERS) + 2)


def test_weights_of_another_architecture_name_the_problem_and_the_fix(tmp_path: Path) -> None:
    other = create_model("resnext_tiny", num_classes=4, cardinality=4)
    path = tmp_path / "other.safetensors"
    save_file({k: v.contiguous() for k, v in other.state_dict().items()}, str(path))
    mine = create_model("resnext_tiny", num_classes=4)
    if all(
        other.state_dict()[k].shape == v.shape for k, v in mine.state_dict().items()
    ):  # the override must change shapes for this case to mean anything
        pytest.fail("cardinality=4 gives the same shapes as resnext_tiny; pick another override")
    with pytest.raises(WeightsError) as info:
        apply_weights(mine, read_weights_file(path))
    text = str(info.value)
    assert "different shapes" in text and "another architecture" in text and "What to do" in text
    assert str(path) in text


def test_state_dict_with_extra_and_missing_keys_lists_both(tmp_path: Path) -> None:
    model = create_model("resnext_tiny", num_classes=4)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    dropped = sorted(state)[3]
    del state[dropped]
    state["layer9.0.conv1.weight"] = torch.zeros(3)
    path = tmp_path / "keys.pth"
    torch.save(state, path)
    with pytest.raises(WeightsError) as info:
        apply_weights(model, read_weights_file(path))
    text = str(info.value)
    assert f"in the model, not in the weights (1):\n    {dropped}" in text
    assert "in the weights, not in the model (1):\n    layer9.0.conv1.weight" in text
    assert "What to do" in text


def test_classifier_of_another_size_suggests_num_classes(tmp_path: Path) -> None:
    path = tmp_path / "ten.pth"
    torch.save(create_model("resnext_tiny", num_classes=10).state_dict(), path)
    with pytest.raises(WeightsError, match="num_classes=10"):
        apply_weights(create_model("resnext_tiny", num_classes=4), read_weights_file(path))
    model = build_with_weights("resnext_tiny", path, num_classes=4)  # the suggested fix works
    assert model.num_classes == 4


def test_unrecognised_and_missing_weights_files(tmp_path: Path) -> None:
    path = tmp_path / "random.pth"
    torch.save({"foo.bar": torch.zeros(2)}, path)
    with pytest.raises(WeightsError, match="unrecognised checkpoint layout"):
        read_weights_file(path)
    with pytest.raises(WeightsError, match="does not exist"):
        read_weights_file(tmp_path / "nope.pth")
    not_a_dict = tmp_path / "list.pth"
    torch.save([torch.zeros(2)], not_a_dict)
    with pytest.raises(WeightsError):
        read_weights_file(not_a_dict)


def test_unrecognised_weights_file_is_refused_by_name(tmp_path: Path) -> None:
    for name, obj in {
        "random.pth": {"foo.bar": torch.zeros(2)},
        "list.pth": [torch.zeros(2)],
    }.items():
        path = tmp_path / name
        torch.save(obj, path)
        with pytest.raises(WeightsError) as info:
            read_weights_file(path)
        assert str(path) in str(info.value)
