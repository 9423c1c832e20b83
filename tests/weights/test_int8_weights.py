"""torchvision's int8 ResNeXt checkpoints: their table against the zoo facts, loading a file of
their layout, and the errors of files that do not fit."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch

import resnext
from resnext.errors import WeightsError
from resnext.speed.int8 import quantize_int8
from resnext.weights import INT8_WEIGHTS, build_int8_with_weights, build_with_weights

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def test_entries_match_torchvisions_published_quantized_weights() -> None:
    # zoo-facts: torchvision's QuantizedWeights (URL, hash in the name, acc@1/acc@5, resize)
    base = "https://download.pytorch.org/models/quantized/"
    expected = {
        "resnext101_32x8d.tv_in1k_fbgemm": (
            "resnext101_32x8_fbgemm_09835ccf.pth",
            "",
            78.986,
            94.480,
            256,
        ),
        "resnext101_32x8d.tv2_in1k_fbgemm": (
            "resnext101_32x8_fbgemm-ee16d00c.pth",
            "ee16d00c",
            82.574,
            96.132,
            232,
        ),
        "resnext101_64x4d.tv_in1k_fbgemm": (
            "resnext101_64x4d_fbgemm-605a1cb3.pth",
            "605a1cb3",
            82.898,
            96.326,
            232,
        ),
    }
    assert set(INT8_WEIGHTS) == set(expected)
    for tag, (file, hash_, top1, top5, resize) in expected.items():
        entry = INT8_WEIGHTS[tag]
        assert entry.url == base + file
        assert (entry.hash, entry.verified) == (hash_, bool(hash_))
        assert (entry.top1, entry.top5) == (top1, top5)
        assert entry.preprocessing.resize == resize and entry.preprocessing.crop == 224
        assert entry.model in resnext.list_models()


@pytest.fixture
def int8_file(tmp_path: Path) -> tuple[Path, torch.nn.Module]:
    """A quantized resnext_tiny_in saved as torchvision saves its quantized checkpoints (the
    state dict alone), and the network that wrote it."""
    torch.manual_seed(0)
    net = quantize_int8(resnext.create_model("resnext_tiny_in"), [torch.randn(4, 3, 32, 32)])
    path = tmp_path / "tiny_fbgemm.pth"
    torch.save(net.state_dict(), path)
    return path, net


def test_a_quantized_state_dict_loads_and_computes_as_the_network_that_wrote_it(
    int8_file: tuple[Path, torch.nn.Module],
) -> None:
    path, net = int8_file
    loaded = build_int8_with_weights("resnext_tiny_in", path)
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        assert torch.equal(loaded(x), net(x))
    assert loaded.preprocessing is None  # a state dict holds none


def test_files_that_do_not_fit_are_refused_by_name(
    int8_file: tuple[Path, torch.nn.Module], tmp_path: Path
) -> None:
    path, net = int8_file
    with pytest.raises(WeightsError, match="different shapes") as info:
        build_int8_with_weights("resnext_tiny", path)  # the CIFAR-stem twin
    assert "conv1.weight: weights [16, 3, 7, 7], model [16, 3, 3, 3]" in str(info.value)
    state = net.state_dict()
    del state["layer2.0.skip_add_relu.scale"]
    torch.save(state, tmp_path / "cut.pth")
    with pytest.raises(WeightsError, match=r"(?s)in the model, not in the weights.*skip_add_relu"):
        build_int8_with_weights("resnext_tiny_in", tmp_path / "cut.pth")
    float_file = tmp_path / "float.pth"
    torch.save(resnext.create_model("resnext_tiny_in").state_dict(), float_file)
    with pytest.raises(WeightsError, match=r"not an int8 .*load with build_with_weights"):
        build_int8_with_weights("resnext_tiny_in", float_file)
    with pytest.raises(WeightsError, match=r"an int8 .*build_int8_with_weights"):
        build_with_weights("resnext_tiny_in", path)
    with pytest.raises(WeightsError, match=r"is an int8 .*build_int8_with_weights"):
        build_with_weights("resnext101_32x8d", "resnext101_32x8d.tv2_in1k_fbgemm")


def test_tags_and_missing_files_are_checked_before_any_download(tmp_path: Path) -> None:
    with pytest.raises(WeightsError, match="for resnext101_32x8d, not resnext50_32x4d"):
        build_int8_with_weights("resnext50_32x4d", "resnext101_32x8d.tv2_in1k_fbgemm")
    with pytest.raises(WeightsError, match=r"closest: resnext101_32x8d\.tv2_in1k_fbgemm"):
        build_int8_with_weights("resnext101_32x8d", "resnext101_32x8d.tv2_in1k_fbgem")
    with pytest.raises(WeightsError, match=r"int8 weights file .*absent\.pth does not exist"):
        build_int8_with_weights("resnext101_32x8d", str(tmp_path / "absent.pth"))


def test_inference_loads_an_int8_file_and_keeps_the_float_fast_path_off_it(
    int8_file: tuple[Path, torch.nn.Module],
) -> None:
    from resnext.errors import ConfigError
    from resnext.inference import Predictor
    from resnext.inference.loading import load_model

    path, net = int8_file
    loaded = load_model("resnext_tiny_in", path)
    assert loaded.source_format == "torchvision_int8"
    x = torch.randn(1, 3, 40, 40)
    with torch.no_grad():
        assert torch.equal(loaded.model(x), net(x))
    with pytest.raises(WeightsError, match="names no model"):
        load_model(None, path)
    with pytest.raises(ConfigError, match="num_classes: an int8 network keeps"):
        load_model("resnext_tiny_in", path, num_classes=5)
    # a device torch cannot run on here is refused before the file is read, whatever it holds
    int8_refusal = "int8 networks run on the CPU" if torch.cuda.is_available() else "no CUDA device"
    with pytest.raises(ConfigError, match=f"device: .*{int8_refusal}"):
        load_model("resnext_tiny_in", path, device="cuda")
    with pytest.raises(ConfigError, match=r"model: an int8 .*leave optimize off"):
        Predictor("resnext_tiny_in", path, optimize="fp32", batch_size=1)
    features = Predictor("resnext_tiny_in", path, batch_size=2).features([torch.rand(3, 40, 40)])
    assert features.pooled.shape == (1, net.fc.in_features) and len(features.stages) == 4


def _help_text(argv: list[str]) -> str:
    """What `resnext ARGV` prints for --help, as one line (argparse wraps it at any width)."""
    import contextlib
    import io

    from resnext.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        main(argv)
    return " ".join(out.getvalue().split())


def test_quantize_command_writes_what_predict_then_loads(
    imagenet_sample: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import json

    from resnext.cli import main

    images = sorted(imagenet_sample.glob("*.JPEG"))[:6]
    out = tmp_path / "tiny_int8.pth"
    args = ["quantize", "resnext_tiny_in", "--calibration", *map(str, images[:4])]
    assert main([*args, "--batch-size", "3", "--output", str(out)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["calibration_images"] == 4 and Path(summary["output"]) == out
    # the command `resnext quantize --help` gives for loading the file, as it is written there
    (help_form,) = re.findall(r"`(resnext predict [^`]*)`", _help_text(["quantize", "--help"]))
    fill = {"NAME": "resnext_tiny_in", "FILE": str(out), "IMAGES": str(images[5])}
    predict = [fill.get(word, word) for word in help_form.split()[1:]]
    assert main([*predict, "--json", "--topk", "3"]) == 0
    (line,) = capsys.readouterr().out.strip().splitlines()
    prediction = json.loads(line)
    assert len(prediction["topk_scores"]) == 3 and images[5].name in json.dumps(prediction)
    loaded = build_int8_with_weights("resnext_tiny_in", out)
    assert any(v.is_quantized for v in loaded.state_dict().values() if isinstance(v, torch.Tensor))


def test_a_failed_save_leaves_the_file_already_there(tmp_path: Path) -> None:
    from resnext.weights.int8 import save_int8

    path = tmp_path / "kept.pth"
    path.write_bytes(b"what was there")
    with pytest.raises(WeightsError, match="net: expected an int8 network"):
        save_int8(resnext.create_model("resnext_tiny_in"), path)
    assert path.read_bytes() == b"what was there"
    assert [p.name for p in tmp_path.iterdir()] == ["kept.pth"]


def test_eval_scores_an_int8_file_on_real_cifar_as_its_network_classifies(
    cifar10_mini: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import json

    from resnext.cli import main
    from resnext.weights.int8 import save_int8

    torch.manual_seed(0)
    net = quantize_int8(resnext.create_model("resnext_tiny"), [torch.randn(8, 3, 32, 32)])
    path = save_int8(net, tmp_path / "cifar_int8.pth")
    argv = ["eval", "--model", "resnext_tiny", "--weights", str(path), "--json"]
    assert main([*argv, "--data", str(cifar10_mini.parent), "--no-progress"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["counts"]["images"] == 509  # the test split of cifar10-mini (its SOURCE.md)
    # the same images through the training package's evaluation transform and the network
    from torch.utils.data import DataLoader

    from resnext.data import build_dataset, default_transforms

    tf = default_transforms("cifar10", "val", image_size=32)
    data = build_dataset("cifar10", str(cifar10_mini.parent), "test", tf, image_size=32)
    right = 0
    with torch.no_grad():
        for x, y in DataLoader(data, batch_size=128):
            right += int((net(x).argmax(1) == y).sum())
    assert report["top1"] == pytest.approx(right / 509, abs=1e-9)


@pytest.mark.parametrize("fmt", ["onnx", "torch-export"])
def test_export_refuses_an_int8_network_by_name(
    int8_file: tuple[Path, torch.nn.Module], tmp_path: Path, capsys, fmt: str
) -> None:
    # torch.ao's packed int8 layers fail deep inside either exporter; the refusal names the file
    from resnext.cli import main

    path, _ = int8_file
    out = tmp_path / "tiny.out"
    argv = ["export", "resnext_tiny_in", "--weights", str(path), "--format", fmt]
    assert main([*argv, "--output", str(out)]) == 2
    assert "an int8 (quantized) network cannot be exported" in capsys.readouterr().err
    assert not out.exists()


def test_quantize_keeps_a_runs_spec_preprocessing_and_names_beside_the_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # A state dict alone cannot say the run's cardinality, its 16-pixel digits statistics or
    # its class names: without them the file did not load, or was fed 224-pixel ImageNet crops.
    from PIL import Image

    from resnext.cli import main
    from resnext.inference.loading import load_model

    torch.manual_seed(0)
    net = resnext.create_model("resnext_tiny_in", cardinality=2, num_classes=3)
    names = ["zero", "one", "two"]
    config = {
        "model": {"name": "resnext_tiny_in", "spec": {"cardinality": 2}},
        "data": {"kind": "digits", "image_size": 16},
    }
    ckpt = tmp_path / "last.pt"
    torch.save({"model": net.state_dict(), "config": config, "class_names": names}, ckpt)
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(
            tmp_path / f"{i}.png"
        )
    out = tmp_path / "q.pth"
    argv = ["quantize", "resnext_tiny_in", "--weights", str(ckpt), "--output", str(out)]
    assert main([*argv, "--calibration", *(str(tmp_path / f"{i}.png") for i in range(3))]) == 0
    capsys.readouterr()
    loaded, float_run = load_model(None, out), load_model(None, ckpt)
    assert loaded.name == "resnext_tiny_in" and loaded.class_names == tuple(names)
    assert loaded.preprocessing == float_run.preprocessing and loaded.preprocessing.crop == 16
    assert build_int8_with_weights("resnext_tiny_in", out).class_names == tuple(names)
    # someone else's JSON where the sidecar would go is refused, and left as it was
    other = tmp_path / "r.pth.json"
    other.write_text('{"mine": true}')
    argv[-1] = str(tmp_path / "r.pth")
    assert main([*argv, "--calibration", str(tmp_path / "0.png")]) == 2
    assert "is not an int8 sidecar" in capsys.readouterr().err
    assert other.read_text() == '{"mine": true}' and not (tmp_path / "r.pth").exists()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "not a readable JSON sidecar"),
        ('{"format": "resnext-int8", "class_names": [1, 2]}', "class_names: expected a list"),
        ('{"format": "resnext-int8", "spec": [3]}', "spec: expected a table or null"),
        ('{"format": "resnext-int8", "model_name": 3}', "model_name: expected a string or null"),
        ('{"format": "resnext-int8", "preprocessing": {"crop": -1}}', "q.pth.json"),
    ],
)
def test_a_damaged_int8_sidecar_is_named(
    int8_file: tuple[Path, torch.nn.Module], content: str, message: str
) -> None:
    from resnext.inference.loading import load_model

    path, _ = int8_file
    q = path.with_name("q.pth")
    q.write_bytes(path.read_bytes())
    q.with_name("q.pth.json").write_text(content)
    with pytest.raises(WeightsError, match=re.escape(message)):
        load_model("resnext_tiny_in", q)


def test_int8_files_keep_sidecars_of_their_own_and_another_json_is_not_read(
    int8_file: tuple[Path, torch.nn.Module], tmp_path: Path
) -> None:
    from resnext.inference.loading import load_model
    from resnext.weights import Preprocessing
    from resnext.weights.int8 import save_int8

    path, net = int8_file
    prep = Preprocessing(resize=70, crop=64)
    save_int8(net, tmp_path / "m.pt", model_name="resnext_tiny_in", preprocessing=prep)
    save_int8(net, tmp_path / "m.pth", model_name="resnext_tiny_in")
    # m.pth's sidecar does not replace m.pt's
    assert load_model(None, tmp_path / "m.pt").preprocessing == prep
    # a JSON of another program beside a torchvision-style file: ignored, the file loads as before
    (tmp_path / "tv.pth").write_bytes(path.read_bytes())
    (tmp_path / "tv.pth.json").write_text('{"format": "something-else"}')
    assert load_model("resnext_tiny_in", tmp_path / "tv.pth").source_format == "torchvision_int8"
