"""The native format: safetensors + JSON sidecar, readable without this package, tamper-evident."""

from __future__ import annotations

import hashlib
import json
import re
import struct
from pathlib import Path

import pytest
import torch
from safetensors.numpy import load_file as np_load_file

import resnext
from resnext.cli import main
from resnext.errors import WeightsError
from resnext.weights import build_with_weights, load_native, save_weights
from resnext.weights.preprocess import Preprocessing

X = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
PREP = Preprocessing(
    resize=36, crop=32, interpolation="bicubic", mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25)
)


def _saved(tmp_path: Path) -> tuple[torch.nn.Module, Path]:
    model = resnext.create_model("resnext_tiny", stride_in_1x1=True).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    path = tmp_path / "tiny.safetensors"
    names = [f"class{i}" for i in range(10)]
    save_weights(model, path, preprocessing=PREP, class_names=names,
                 provenance={"source": "unit test"}, model_name="resnext_tiny")  # fmt: skip
    return model, path


def test_round_trip_restores_model_and_metadata(tmp_path: Path) -> None:
    model, path = _saved(tmp_path)
    loaded = load_native(path)
    assert loaded.source_format == "native" and loaded.preprocessing == PREP
    assert loaded.class_names[7] == "class7" and loaded.model_name == "resnext_tiny"
    assert loaded.spec_overrides == {"stride_in_1x1": True}
    rebuilt = build_with_weights("resnext_tiny", path).eval()
    assert rebuilt.spec.stride_in_1x1 is True and rebuilt.preprocessing == PREP
    with torch.no_grad():
        assert torch.equal(rebuilt(X), model(X))


def test_files_are_readable_without_this_package(tmp_path: Path) -> None:
    model, path = _saved(tmp_path)
    sidecar = json.loads(path.with_suffix(".json").read_text())
    data = path.read_bytes()
    assert sidecar["size"] == len(data) and sidecar["sha256"] == hashlib.sha256(data).hexdigest()
    assert sidecar["spec"]["depths"] == [1, 1, 1] and sidecar["spec"]["stride_in_1x1"] is True
    prov = sidecar["provenance"]
    assert prov["source"] == "unit test" and prov["package_version"] == resnext.__version__
    assert prov["date"].startswith("20")
    arrays = np_load_file(str(path))
    assert (arrays["fc.weight"] == model.fc.weight.detach().numpy()).all()


def test_truncated_file_is_detected(tmp_path: Path) -> None:
    _, path = _saved(tmp_path)
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(WeightsError, match="truncated") as info:
        load_native(path)
    assert str(path) in str(info.value)


def test_bit_flip_is_detected(tmp_path: Path) -> None:
    _, path = _saved(tmp_path)
    data = bytearray(path.read_bytes())
    data[-7] ^= 0x10
    path.write_bytes(bytes(data))
    with pytest.raises(WeightsError, match="sha256") as info:
        load_native(path)
    assert str(path) in str(info.value)


def test_header_that_lies_about_sizes_is_refused(tmp_path: Path) -> None:
    _, path = _saved(tmp_path)
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    header["fc.weight"]["shape"] = [1000, 1000]  # claims 4 MB inside a few-kB file
    new_header = json.dumps(header).encode()
    forged = struct.pack("<Q", len(new_header)) + new_header + data[8 + n :]
    path.write_bytes(forged)
    side = path.with_suffix(".json")
    meta = json.loads(
        side.read_text()
    )  # an attacker can also fix the sidecar: the header check holds
    meta["size"], meta["sha256"] = len(forged), hashlib.sha256(forged).hexdigest()
    side.write_text(json.dumps(meta))
    with pytest.raises(WeightsError, match="inconsistent") as info:
        load_native(path)
    assert "fc.weight" in str(info.value)


def test_missing_sidecar_and_wrong_suffix(tmp_path: Path) -> None:
    _, path = _saved(tmp_path)
    path.with_suffix(".json").unlink()
    with pytest.raises(WeightsError, match="sidecar"):
        load_native(path)
    with pytest.raises(WeightsError, match=r"\.safetensors"):
        save_weights(resnext.create_model("resnext_tiny"), tmp_path / "x.pt", preprocessing=None,
                     class_names=None, provenance={"source": "t"})  # fmt: skip


def test_the_path_given_is_the_file_read(tmp_path: Path) -> None:
    model, path = _saved(tmp_path)
    # The pair renamed by hand: its sidecar still says tensors_file "tiny.safetensors", and a
    # different network is then saved under the old name.
    mine = tmp_path / "mine.safetensors"
    path.rename(mine)
    path.with_suffix(".json").rename(mine.with_suffix(".json"))
    other = resnext.create_model("resnext_tiny", stride_in_1x1=True)
    save_weights(other, path, preprocessing=None, class_names=None, provenance={"source": "B"})
    loaded = load_native(mine)
    assert loaded.source == str(mine)
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict[key], value), key


@pytest.mark.parametrize("name", ["../x.safetensors", "sub/x.safetensors", "..", "", 5])
def test_sidecar_tensors_file_must_be_a_plain_name(tmp_path: Path, name: object) -> None:
    _, path = _saved(tmp_path)
    side = path.with_suffix(".json")
    meta = json.loads(side.read_text())
    meta["tensors_file"] = name
    side.write_text(json.dumps(meta))
    with pytest.raises(
        WeightsError, match=r"tensors_file .*plain name of a file in the same folder"
    ):
        load_native(side)


def test_convert_refuses_an_existing_sidecar(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    src = tmp_path / "tv.pth"
    torch.save(resnext.create_model("resnext_tiny").state_dict(), src)
    out = tmp_path / "run.safetensors"
    side = tmp_path / "run.json"
    side.write_text('{"my": "training config"}')
    assert main(["convert", str(src), "--model", "resnext_tiny", "--output", str(out)]) == 2
    assert "run.json exists already" in capsys.readouterr().err
    assert side.read_text() == '{"my": "training config"}' and not out.exists()


@pytest.mark.parametrize(
    "field, value, expected",
    [
        ("class_names", 5, "class_names: expected a list of strings or null, got 5"),
        ("class_names", ["a", 2], "class_names: expected a list of strings"),
        # the saved classifier has 10 rows
        ("class_names", ["a", "b", "c"], "class_names: 3 names for a classifier of 10 classes"),
        ("model_name", 7, "model_name: expected a string or null, got 7"),
        (
            "preprocessing",
            {"resize": 36, "crop": 32, "mean": "abc"},
            "mean: expected 3 finite numbers",
        ),
        ("preprocessing", {"resize": "36", "crop": 32}, "resize: expected an integer"),
    ],
)
def test_sidecar_fields_of_the_wrong_type_are_refused(
    tmp_path: Path, field: str, value: object, expected: str
) -> None:
    _, path = _saved(tmp_path)
    side = path.with_suffix(".json")
    meta = json.loads(side.read_text())
    meta[field] = value
    side.write_text(json.dumps(meta))
    with pytest.raises(WeightsError, match=re.escape(expected)) as info:
        load_native(path)
    assert "tiny.json" in str(info.value)


def test_convert_of_a_training_checkpoint_keeps_its_spec_and_preprocessing(
    tmp_path: Path,
) -> None:
    # A `resnext train` checkpoint of a digits run at 16 px with model.spec overrides.
    from resnext.inference.loading import load_model

    spec = {"cardinality": 4, "depths": [2, 1, 1], "logit_scale": 0.5}
    torch.manual_seed(0)
    net = resnext.create_model("resnext_tiny", **spec).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.1)
        for name, b in net.named_buffers():
            if name.endswith("running_var"):
                b.uniform_(0.5, 2.0)
    ckpt = tmp_path / "last.pt"
    config = {"model": {"name": "resnext_tiny", "spec": spec},
              "data": {"kind": "digits", "image_size": 16}}  # fmt: skip
    torch.save({"model": net.state_dict(), "config": config}, ckpt)
    out = tmp_path / "tiny.safetensors"

    assert main(["convert", str(ckpt), "--model", "resnext_tiny", "--output", str(out)]) == 0

    side = json.loads(out.with_suffix(".json").read_text())
    prep = side["preprocessing"]
    # digits images are used whole at the run's 16 px, normalised by the digits statistics
    # (grey: one value per channel, near 0.3 on [0, 1]), not ImageNet's 224 px crop.
    assert prep["crop"] == 16 and prep["resize"] == 16
    assert len(set(prep["mean"])) == 1 and abs(prep["mean"][0] - 0.305) < 0.01
    assert len(set(prep["std"])) == 1 and abs(prep["std"][0] - 0.32) < 0.01
    assert side["provenance"]["source_format"] == "resnext_train_checkpoint"
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    converted = load_model(None, out)
    from_checkpoint = load_model(None, ckpt)
    assert converted.preprocessing == from_checkpoint.preprocessing
    with torch.no_grad():
        expected = net(x)
        assert torch.equal(converted.model(x), expected)
        assert torch.equal(from_checkpoint.model(x), expected)
