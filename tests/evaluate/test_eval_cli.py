"""`resnext eval` end to end: a training checkpoint on an ImageFolder and on real CIFAR-10 data."""

from __future__ import annotations

import argparse
import csv
import json
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from eval_helpers import random_images
from PIL import Image

import resnext
from resnext.commands import eval_cmd
from resnext.errors import DataError

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406])
IMAGENET_STD = np.array([0.229, 0.224, 0.225])


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    eval_cmd.add_parser(parser.add_subparsers())
    return parser.parse_args(["eval", *argv])


def _checkpoint(tmp_path: Path, classes: int, kind: str) -> tuple[Path, torch.nn.Module]:
    model = resnext.create_model("resnext_tiny", num_classes=classes).eval()
    path = tmp_path / "ckpt.pt"
    config = {
        "model": {"name": "resnext_tiny", "spec": {}},
        "data": {"kind": kind, "image_size": 32},
    }
    torch.save({"model": model.state_dict(), "config": config, "epoch": 1}, path)
    return path, model


def _image_folder(tmp_path: Path) -> list[tuple[Path, int]]:
    items = []
    for i, img in enumerate(random_images(9, seed=41)):
        label = i % 3
        folder = tmp_path / "data" / f"class{label}"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"img{i}.png"
        img.save(path)
        items.append((path, label))
    return items


def test_eval_checkpoint_on_image_folder(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    items = _image_folder(tmp_path)
    ckpt, model = _checkpoint(tmp_path, 3, "imagefolder")
    out = tmp_path / "out"
    args = _parse(
        ["--weights", str(ckpt), "--data", str(tmp_path / "data"), "--json", "--output", str(out)]
    )
    assert eval_cmd.run(args) == 0
    report = json.loads(capsys.readouterr().out)
    # Independent pipeline: shorter side 37 (= 32 * 8/7), bicubic (fb.resnet.torch's evaluation
    # filter, which the run's ImageFolder validation used), centre 32 crop, ImageNet statistics.
    hits = 0
    for path, label in items:
        img = Image.open(path).convert("RGB")
        w, h = img.size
        size = (37, math.floor(37 * h / w)) if w <= h else (math.floor(37 * w / h), 37)
        arr = np.asarray(img.resize(size, Image.Resampling.BICUBIC), dtype=np.float64) / 255
        top, left = -(-(size[1] - 32) // 2), -(-(size[0] - 32) // 2)
        arr = (arr[top : top + 32, left : left + 32] - IMAGENET_MEAN) / IMAGENET_STD
        x = torch.from_numpy(arr.astype(np.float32)).permute(2, 0, 1)[None]
        with torch.no_grad():
            hits += int(model(x).argmax(1).item() == label)
    assert report["counts"]["images"] == 9
    assert report["top1"] == pytest.approx(hits / 9)
    assert report["dataset"]["kind"] == "imagefolder"
    assert report["protocol"]["resize"] == 37 and report["protocol"]["crop"] == 32
    assert report["protocol"]["interpolation"] == "bicubic"
    assert (out / "report.json").is_file() and (out / "per_class.csv").is_file()
    # A training checkpoint carries no class names: the rows take the dataset's folder names.
    with open(out / "per_class.csv", encoding="utf-8", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [(r["class"], r["name"], r["images"]) for r in rows] == [
        ("0", "class0", "3"),
        ("1", "class1", "3"),
        ("2", "class2", "3"),
    ]


def test_eval_detects_real_cifar(cifar10_mini: Path, tmp_path: Path, capsys) -> None:
    ckpt, _ = _checkpoint(tmp_path, 10, "cifar10")
    args = _parse(["--weights", str(ckpt), "--data", str(cifar10_mini.parent), "--json"])
    assert eval_cmd.run(args) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["dataset"]["kind"] == "cifar10"
    assert report["counts"]["images"] == 509  # the test split of cifar10-mini (its SOURCE.md)
    assert 0.0 <= report["top1"] <= report["top5"] <= 1.0


def test_eval_missing_data_is_a_data_error(tmp_path: Path) -> None:
    ckpt, _ = _checkpoint(tmp_path, 3, "imagefolder")
    with pytest.raises(DataError, match="nowhere"):
        eval_cmd.run(_parse(["--weights", str(ckpt), "--data", str(tmp_path / "nowhere")]))


@pytest.mark.parametrize("protocol", ["center", "tencrop"])
def test_eval_with_the_fast_path_scores_as_the_plain_model(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch, protocol: str
) -> None:
    from resnext.speed import fastpath

    _image_folder(tmp_path)
    ckpt, _ = _checkpoint(tmp_path, 3, "imagefolder")
    built = []
    original = fastpath.optimize
    monkeypatch.setattr(fastpath, "optimize", lambda *a, **k: built.append(k) or original(*a, **k))
    reports = {}
    for mode in ("off", "fp32"):
        argv = ["--weights", str(ckpt), "--data", str(tmp_path / "data"), "--json"]
        argv += ["--protocol", protocol, "--optimize", mode, "--batch-size", "2"]
        assert eval_cmd.run(_parse(argv)) == 0
        reports[mode] = json.loads(capsys.readouterr().out)
    assert len(built) == 1 and built[0]["backend"] == "none"  # built once, for the fp32 run
    views = 10 if protocol == "tencrop" else 1
    assert built[0]["example_input"].shape[0] == 2 * views  # timed at the batch's shape
    assert reports["fp32"]["fast_path"] == "fp32" and reports["off"]["fast_path"] == "off"
    # float32 fast path: the same function to ~1e-6, so the same hits on these 9 images
    assert reports["fp32"]["counts"] == reports["off"]["counts"]


def _precisions_built(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The precisions `resnext.optimize` is asked for from now on (a list it appends to)."""
    from resnext.speed import fastpath

    built: list[str] = []
    original = fastpath.optimize
    monkeypatch.setattr(
        fastpath, "optimize", lambda *a, **k: built.append(a[1]) or original(*a, **k)
    )
    return built


def test_eval_with_fp16_products_asks_optimize_for_them_and_reports_it(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    built = _precisions_built(monkeypatch)
    argv = _fast_path_argv(tmp_path)
    with warnings.catch_warnings():  # where the CPU has no float16 kernel: float32, warned
        warnings.simplefilter("ignore", RuntimeWarning)
        assert eval_cmd.run(_parse([*argv, "--optimize", "fp16"])) == 0
    assert json.loads(capsys.readouterr().out)["fast_path"] == "fp16"
    assert built == ["fp16"]


@pytest.mark.parametrize("faster", [True, False])
def test_eval_with_the_auto_fast_path_reports_the_precision_it_took(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch, faster: bool
) -> None:
    from resnext.speed import capability, fastpath, pointwise_fp16

    if faster and not capability.bf16_supported():
        pytest.skip("this CPU has no native bf16 to score in")
    monkeypatch.setattr(capability, "bf16_faster", lambda: faster)
    monkeypatch.setattr(fastpath, "bf16_faster", lambda: faster)
    built = _precisions_built(monkeypatch)
    assert eval_cmd.run(_parse([*_fast_path_argv(tmp_path), "--optimize", "auto"])) == 0
    fp16 = pointwise_fp16.unavailable_reason() is None  # float16 products where they run
    want = "bf16" if faster else "fp16" if fp16 else "fp32"
    assert json.loads(capsys.readouterr().out)["fast_path"] == want
    assert built == [want]


def _fast_path_argv(tmp_path: Path) -> list[str]:
    """eval's arguments for 9 images of 3 classes in batches of 4, written under `tmp_path`."""
    _image_folder(tmp_path)
    ckpt, _ = _checkpoint(tmp_path, 3, "imagefolder")
    argv = ["--weights", str(ckpt), "--data", str(tmp_path / "data"), "--json"]
    return [*argv, "--batch-size", "4"]


def test_eval_with_the_compiled_fast_path_scores_as_the_plain_model(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    from torch._dynamo.utils import counters

    from resnext.errors import ConfigError
    from resnext.speed.fastpath import FrozenInductor

    to_graph, graph_calls = FrozenInductor._compiled, []
    monkeypatch.setattr(
        FrozenInductor, "_compiled", lambda self, x: graph_calls.append(len(x)) or to_graph(self, x)
    )

    argv = _fast_path_argv(tmp_path)  # the last batch of 1 runs without the graph
    with pytest.raises(ConfigError, match="--compile: compiles the fast path, so it needs"):
        eval_cmd.run(_parse([*argv, "--compile"]))
    reports = {}
    graphs = counters["stats"]["unique_graphs"]
    for extra in ([], ["--optimize", "fp32", "--compile"]):
        assert eval_cmd.run(_parse([*argv, *extra])) == 0
        reports[bool(extra)] = json.loads(capsys.readouterr().out)
    assert counters["stats"]["unique_graphs"] == graphs + 1  # one graph, for batches of 4
    assert graph_calls == [4, 4, 4]  # built on one, then the two full batches
    assert reports[True]["counts"] == reports[False]["counts"]
    assert reports[True]["fast_path_compiled"] and not reports[False]["fast_path_compiled"]


def test_eval_fast_path_refuses_the_dense_protocol(tmp_path: Path) -> None:
    from resnext.errors import ConfigError

    _image_folder(tmp_path)
    ckpt, _ = _checkpoint(tmp_path, 3, "imagefolder")
    argv = ["--weights", str(ckpt), "--data", str(tmp_path / "data"), "--protocol", "dense"]
    with pytest.raises(ConfigError, match="--optimize: the dense protocol"):
        eval_cmd.run(_parse([*argv, "--optimize", "fp32"]))
    # the library refuses it too, by name
    from resnext.evaluate.protocols import get_protocol
    from resnext.evaluate.scoring import Scorer

    model = resnext.create_model("resnext_tiny", num_classes=3)
    with pytest.raises(ConfigError, match="optimize: the dense protocol"):
        Scorer(model, get_protocol("dense", resize=32, crop=32), fast=model)


def test_eval_fast_path_replayed_scores_as_the_plain_model(tmp_path: Path, capsys) -> None:
    from resnext.errors import ConfigError
    from resnext.speed import replay

    argv = _fast_path_argv(tmp_path)  # the last batch of 1 runs without the replay
    with pytest.raises(ConfigError, match="--replay: replays the fast path, so it needs"):
        eval_cmd.run(_parse([*argv, "--replay"]))
    with pytest.raises(SystemExit):  # argparse: --replay not allowed with --compile
        _parse([*argv, "--optimize", "fp32", "--compile", "--replay"])
    reports = {}
    for extra in ([], ["--optimize", "fp32", "--replay"]):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert eval_cmd.run(_parse([*argv, *extra])) == 0
        # where the replay can run, nothing fell back to the eager fast path
        fallbacks = [w for w in caught if "replay" in str(w.message)]
        assert not fallbacks or replay.unavailable_reason() is not None
        reports[bool(extra)] = json.loads(capsys.readouterr().out)
    assert reports[True]["counts"] == reports[False]["counts"]
    assert reports[True]["fast_path_replayed"] and not reports[False]["fast_path_replayed"]
    assert not reports[True]["fast_path_compiled"]


def _refuse_evaluation(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*args: object, **kwargs: object) -> None:
        raise AssertionError("evaluated although the options were bad")

    monkeypatch.setattr(eval_cmd, "evaluate", fail)


def test_eval_output_that_is_a_file_fails_before_evaluating(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from resnext.errors import ConfigError

    _image_folder(tmp_path)
    ckpt, _ = _checkpoint(tmp_path, 3, "imagefolder")
    taken = tmp_path / "taken"
    taken.write_text("keep me")
    _refuse_evaluation(monkeypatch)
    argv = ["--weights", str(ckpt), "--data", str(tmp_path / "data"), "--output", str(taken)]
    with pytest.raises(ConfigError, match="taken: exists and is not a folder"):
        eval_cmd.run(_parse(argv))
    assert taken.read_text() == "keep me"
    # a folder not there yet is made up front, before the run
    fresh = tmp_path / "fresh" / "out"
    with pytest.raises(AssertionError, match="evaluated"):
        eval_cmd.run(_parse([*argv[:-1], str(fresh)]))
    assert fresh.is_dir()


def test_eval_refuses_a_model_whose_head_does_not_fit_the_dataset(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from resnext.errors import ConfigError

    _image_folder(tmp_path)  # 3 classes
    ckpt, _ = _checkpoint(tmp_path, 10, "imagefolder")
    argv = ["--weights", str(ckpt), "--data", str(tmp_path / "data"), "--json"]
    with pytest.raises(ConfigError, match="dataset has 3 classes but the model's head has 10"):
        eval_cmd.run(_parse(argv))
    # scoring a subset of the model's classes is what a smaller dataset is for
    (tmp_path / "subset.txt").write_text("0 1 2\n")
    assert eval_cmd.run(_parse([*argv, "--classes-subset", str(tmp_path / "subset.txt")])) == 0
    assert json.loads(capsys.readouterr().out)["counts"]["scored_classes"] == 3


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        (["--protocol", "dense", "--scales", "64,x"], "--scales: expected positive"),
        (["--protocol", "dense", "--scales", "0"], "--scales: expected positive"),
        (["--batch-size", "0"], "batch_size: expected an integer >= 1, got 0"),
        (["--workers", "-1"], "num_workers: expected an integer >= 0, got -1"),
        (["--flip"], "--flip: only --protocol dense uses it"),
        (["--protocol", "tencrop", "--scales", "32"], "--scales: only --protocol dense"),
    ],
)
def test_eval_bad_options_are_config_errors(tmp_path: Path, extra: list[str], match: str) -> None:
    from resnext.errors import ConfigError

    _image_folder(tmp_path)
    ckpt, _ = _checkpoint(tmp_path, 3, "imagefolder")
    argv = ["--weights", str(ckpt), "--data", str(tmp_path / "data"), "--no-progress"]
    with pytest.raises(ConfigError, match=match):
        eval_cmd.run(_parse([*argv, *extra]))


def test_library_evaluate_and_protocol_refuse_bad_settings() -> None:
    from resnext.errors import ConfigError
    from resnext.evaluate import Normalization, Protocol, evaluate, get_protocol

    model = resnext.create_model("resnext_tiny", num_classes=3)
    norm = Normalization([0.5] * 3, [0.25] * 3)
    data = [(img, 0) for img in random_images(2, seed=1)]
    protocol = get_protocol("center", resize=32, crop=32)
    for kwargs in ({"batch_size": 0}, {"batch_size": True}, {"num_workers": -1}):
        with pytest.raises(ConfigError, match=next(iter(kwargs))):
            evaluate(model, data, protocol, norm, num_classes=3, **kwargs)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="only dense testing uses them"):
        get_protocol("center", flip=True)
    with pytest.raises(ConfigError, match="only dense testing uses them"):
        Protocol("x", "tencrop", scales=(32,))


def test_eval_reports_why_a_cifar_archive_or_folder_cannot_be_read(tmp_path: Path) -> None:
    import gzip
    import io
    import tarfile

    ckpt, _ = _checkpoint(tmp_path, 10, "cifar10")
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        payload = np.random.default_rng(0).bytes(200_000)  # incompressible: truncation bites
        info = tarfile.TarInfo("cifar-10-batches-py/test_batch")
        info.size = len(payload)
        tar.addfile(info, io.BytesIO(payload))
    packed = gzip.compress(buffer.getvalue())
    archive = tmp_path / "cifar-10-python.tar.gz"
    archive.write_bytes(packed[: len(packed) // 2])
    with pytest.raises(DataError) as caught:
        eval_cmd.run(_parse(["--weights", str(ckpt), "--data", str(archive)]))
    assert "cifar-10-python.tar.gz" in str(caught.value)
    assert "ImageFolder" not in str(caught.value)
    # a batches folder without its meta file: the CIFAR reader's message, not ImageFolder's
    folder = tmp_path / "batches"
    folder.mkdir()
    (folder / "test_batch").write_bytes(b"")
    with pytest.raises(DataError, match="no CIFAR data found"):
        eval_cmd.run(_parse(["--weights", str(ckpt), "--data", str(folder)]))


def test_tencrop_and_dense_follow_the_weights_crop(tmp_path: Path, capsys) -> None:
    # A network trained on 32-pixel crops (resize 37) given the paper's 256/224 views, or dense
    # passes at 224-640 pixels, scores near chance: both protocols follow the weights' sizes.
    _image_folder(tmp_path)
    ckpt, _ = _checkpoint(tmp_path, 3, "imagefolder")
    base = ["--weights", str(ckpt), "--data", str(tmp_path / "data"), "--json"]
    assert eval_cmd.run(_parse([*base, "--protocol", "tencrop"])) == 0
    tencrop = json.loads(capsys.readouterr().out)["protocol"]
    assert (tencrop["resize"], tencrop["crop"]) == (37, 32)
    assert eval_cmd.run(_parse([*base, "--protocol", "dense"])) == 0
    dense = json.loads(capsys.readouterr().out)["protocol"]
    # He et al.'s 224, 256, 384, 480, 640 times 32/224, rounded by hand
    assert tuple(dense["scales"]) == (32, 37, 55, 69, 91)
    assert eval_cmd.run(_parse([*base, "--protocol", "dense", "--scales", "40"])) == 0
    assert tuple(json.loads(capsys.readouterr().out)["protocol"]["scales"]) == (40,)


def test_tencrop_keeps_the_papers_margin_for_weights_with_another_centre_resize(
    tmp_path: Path, capsys
) -> None:
    # torchvision's V2 weights say 232/224: ten-crop stays the paper's 256/224 (corners that differ
    # from the centre), as it would for weights whose centre crop fills the resize (288/288)
    from resnext.weights import Preprocessing, save_weights

    _image_folder(tmp_path)
    model = resnext.create_model("resnext_tiny", num_classes=3)
    weights = tmp_path / "w.safetensors"
    save_weights(
        model,
        weights,
        preprocessing=Preprocessing(resize=232, crop=224),
        class_names=None,
        provenance={"source": "test"},
        model_name="resnext_tiny",
    )
    base = ["--weights", str(weights), "--data", str(tmp_path / "data"), "--json"]
    assert eval_cmd.run(_parse([*base, "--protocol", "tencrop"])) == 0
    tencrop = json.loads(capsys.readouterr().out)["protocol"]
    assert (tencrop["resize"], tencrop["crop"]) == (256, 224)
    assert eval_cmd.run(_parse([*base, "--protocol", "tencrop", "--resize", "240"])) == 0
    assert json.loads(capsys.readouterr().out)["protocol"]["resize"] == 240
