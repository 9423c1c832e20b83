"""Prediction on paths, PIL images, arrays and tensors; preprocessing and names from the weights."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import resnext
from resnext.errors import ConfigError, DataError
from resnext.inference import Predictor, extract_features, imagenet1k_wnids, predict
from resnext.speed import capability, pointwise_fp16
from resnext.speed.replay import Replayed
from resnext.speed.replay import unavailable_reason as replay_unavailable
from resnext.weights import Preprocessing, save_weights

NAMES = ("ant", "bee", "cat", "dog", "eel")
# Deliberately unusual preprocessing, so the test sees that the sidecar's settings are used.
PREP = Preprocessing(resize=40, crop=36, mean=(0.2, 0.3, 0.4), std=(0.5, 0.6, 0.7))


@pytest.fixture
def weights_file(tmp_path: Path) -> tuple[Path, torch.nn.Module]:
    model = resnext.create_model("resnext_tiny", num_classes=5).eval()
    path = tmp_path / "tiny.safetensors"
    save_weights(
        model,
        path,
        preprocessing=PREP,
        class_names=NAMES,
        provenance={"source": "test"},
        model_name="resnext_tiny",
    )
    return path, model


def _images(n: int) -> list[np.ndarray]:
    rng = np.random.default_rng(3)
    return [rng.integers(0, 256, size=(44 + 3 * i, 50, 3), dtype=np.uint8) for i in range(n)]


def _hand_logits(model: torch.nn.Module, arr: np.ndarray) -> torch.Tensor:
    img = Image.fromarray(arr)
    w, h = img.size  # 50 wide, >= 44 high: the width is the shorter side only when h > 50
    size = (40, int(40 * h / w)) if w <= h else (int(40 * w / h), 40)
    x = np.asarray(img.resize(size, Image.Resampling.BILINEAR), dtype=np.float64) / 255
    top, left = -(-(size[1] - 36) // 2), -(-(size[0] - 36) // 2)
    x = (x[top : top + 36, left : left + 36] - np.array(PREP.mean)) / np.array(PREP.std)
    with torch.no_grad():
        return model(torch.from_numpy(x.astype(np.float32)).permute(2, 0, 1)[None])[0]


def test_all_input_kinds_agree_with_hand_pipeline(weights_file, tmp_path: Path) -> None:
    path, model = weights_file
    arrays = _images(3)
    files = []
    for i, arr in enumerate(arrays):
        files.append(tmp_path / f"im{i}.png")
        Image.fromarray(arr).save(files[-1])
    predictor = Predictor(weights=path, batch_size=2)
    assert predictor.loaded.class_names == NAMES
    assert predictor.loaded.preprocessing == PREP
    kinds = {
        "paths": [str(f) for f in files],
        "pil": [Image.fromarray(a) for a in arrays],
        "arrays": arrays,
        "tensors": [torch.from_numpy(a).permute(2, 0, 1).float() / 255 for a in arrays],
    }
    results = {k: predictor(v, topk=3) for k, v in kinds.items()}
    for i, arr in enumerate(arrays):
        probs = torch.softmax(_hand_logits(model, arr), 0)
        scores, labels = probs.topk(3)
        for kind, preds in results.items():
            pred = preds[i]
            assert pred.topk_labels == labels.tolist(), kind
            assert pred.pred_label == int(labels[0])
            assert pred.pred_class == NAMES[int(labels[0])]
            assert pred.pred_score == pytest.approx(float(scores[0]), abs=1e-5)
            assert pred.topk_classes == [NAMES[j] for j in labels.tolist()]
    assert results["paths"][0].source == str(files[0])


def test_one_shot_predict_and_batched_tensor(weights_file) -> None:
    path, _ = weights_file
    batch = torch.rand(4, 3, 40, 40)
    preds = predict(batch, weights=path, topk=2)
    assert len(preds) == 4 and all(len(p.topk_scores) == 2 for p in preds)
    assert all(p.topk_scores[0] >= p.topk_scores[1] for p in preds)


def test_features_are_pooled_last_stage(weights_file) -> None:
    path, model = weights_file
    arrays = _images(2)
    feats = extract_features(arrays, weights=path)
    info = model.feature_info[1:]  # each stage's channels and stride, from the model itself
    assert [f.shape[1] for f in feats.stages] == [i["num_chs"] for i in info]
    assert [f.shape[-1] for f in feats.stages] == [-(-36 // i["reduction"]) for i in info]
    torch.testing.assert_close(feats.pooled, feats.stages[-1].mean(dim=(2, 3)))
    with torch.no_grad():
        logits = model.fc(feats.pooled)
    torch.testing.assert_close(logits[0], _hand_logits(model, arrays[0]), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(
    "bad",
    [np.zeros((4, 4, 3), dtype=np.float32), torch.zeros(4, 4), torch.full((3, 4, 4), 2.0), 3.5],
)
def test_bad_inputs_are_config_errors(weights_file, bad: object) -> None:
    with pytest.raises(ConfigError):
        Predictor(weights=weights_file[0])([bad])


def test_missing_image_is_a_data_error(weights_file, tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"nope\.png"):
        Predictor(weights=weights_file[0])([tmp_path / "nope.png"])
    # a folder exists: it is not "no such file", it is the wrong kind of input
    with pytest.raises(DataError, match="a folder; expected an image file"):
        Predictor(weights=weights_file[0])([tmp_path])


def test_imagenet_names_follow_the_sorted_wnids(imagenet_sample: Path) -> None:
    # The sample's files are named <wnid>_<name>; sorted, they are in ImageNet class order.
    wnids = sorted({p.name.split("_", 1)[0] for p in imagenet_sample.glob("*.JPEG")})
    assert len(wnids) == 1000
    assert list(imagenet1k_wnids()) == wnids


@pytest.mark.parametrize(
    "extra", [[], ["--optimize", "fp32"], ["--optimize", "fp32", "--no-timing-cache"]]
)
def test_predict_cli_recurses_folders(weights_file, tmp_path: Path, capsys, extra) -> None:
    from resnext.commands import predict_cmd
    from resnext.speed.grouped_kernel import unavailable_reason
    from resnext.speed.timing_cache import default_folder

    path, _ = weights_file
    (tmp_path / "pics" / "deep").mkdir(parents=True)
    for i, arr in enumerate(_images(3)):
        Image.fromarray(arr).save(tmp_path / "pics" / ("deep" if i else "") / f"{i}.png")
    (tmp_path / "pics" / "notes.txt").write_text("not an image")
    import argparse

    parser = argparse.ArgumentParser()
    predict_cmd.add_parser(parser.add_subparsers())
    args = parser.parse_args(
        ["predict", str(tmp_path / "pics"), "--weights", str(path), "--json", "--topk", "2", *extra]
    )
    assert predict_cmd.run(args) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(lines) == 3
    assert {Path(r["source"]).name for r in lines} == {"0.png", "1.png", "2.png"}
    assert all(r["pred_class"] in NAMES and len(r["topk_labels"]) == 2 for r in lines)
    # the fast path's per-layer timings are kept for the next run, unless asked not to
    kept = list(default_folder().glob("*.json"))  # the test's own folder (conftest)
    timed = "--optimize" in extra and unavailable_reason() is None
    assert bool(kept) == (timed and "--no-timing-cache" not in extra)


@pytest.mark.parametrize("compile_", [False, True])
def test_optimized_predictor_agrees_with_hand_pipeline(
    weights_file, compile_: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    from torch._dynamo.utils import counters

    from resnext.speed.fastpath import FrozenInductor

    to_graph, graph_calls = FrozenInductor._compiled, []
    monkeypatch.setattr(
        FrozenInductor, "_compiled", lambda self, x: graph_calls.append(len(x)) or to_graph(self, x)
    )
    path, model = weights_file
    arrays = _images(4)
    predictor = Predictor(weights=path, batch_size=3, optimize="fp32", compile=compile_)
    assert predictor.fast is not None
    graphs = counters["stats"]["unique_graphs"]
    preds = predictor(arrays, topk=3)
    # the full batch runs on the graph built for it; the last batch of 1 without a graph of its
    # own, which would take ~10 s to compile for a ResNeXt-50 on a small CPU
    assert counters["stats"]["unique_graphs"] == graphs
    assert graph_calls == ([3, 3] if compile_ else [])
    for arr, pred in zip(arrays, preds, strict=True):
        scores, labels = torch.softmax(_hand_logits(model, arr), 0).topk(3)
        assert pred.topk_labels == labels.tolist()
        assert pred.pred_score == pytest.approx(float(scores[0]), abs=1e-5)


def test_auto_optimize_takes_float32_where_neither_bf16_nor_float16_products_help(
    weights_file, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(capability, "bf16_faster", lambda: False)
    monkeypatch.setattr(pointwise_fp16, "unavailable_reason", lambda: "as on a CPU without it")
    path, model = weights_file
    arrays = _images(2)
    predictor = Predictor(weights=path, batch_size=2, optimize="auto")
    assert predictor.fast is not None
    for arr, pred in zip(arrays, predictor(arrays, topk=3), strict=True):
        scores, labels = torch.softmax(_hand_logits(model, arr), 0).topk(3)
        assert pred.topk_labels == labels.tolist()
        # float32's ~1e-6, where bf16's 8 significant bits would move the score by ~1e-3
        assert pred.pred_score == pytest.approx(float(scores[0]), abs=1e-5)


@pytest.mark.skipif(
    pointwise_fp16.unavailable_reason() is not None,
    reason=f"fp16 kernel unavailable: {pointwise_fp16.unavailable_reason()}",
)
def test_fp16_optimize_classifies_with_float16_products_to_their_precision(weights_file) -> None:
    path, model = weights_file
    arrays = _images(2)
    predictor = Predictor(weights=path, batch_size=2, optimize="fp16")
    assert predictor.fast is not None
    assert any(c.variant.startswith("fp16") for c in predictor.fast.pointwise_choices)
    for arr, pred in zip(arrays, predictor(arrays, topk=5), strict=True):
        scores = torch.softmax(_hand_logits(model, arr), 0)
        got = torch.tensor(pred.topk_scores)[torch.tensor(pred.topk_labels).argsort()]
        # float16's 11 significant bits: ~1e-3 of the logits, where float32 gives ~1e-6
        assert (got - scores).abs().max() < 1e-2


def test_optimize_option_is_checked(weights_file) -> None:
    with pytest.raises(ConfigError, match="optimize"):
        Predictor(weights=weights_file[0], optimize="fp8")
    with pytest.raises(ConfigError, match="compile: compiles the fast path, so it needs"):
        Predictor(weights=weights_file[0], compile=True)
    with pytest.raises(ConfigError, match="replay: replays the fast path, so it needs"):
        Predictor(weights=weights_file[0], replay=True)
    with pytest.raises(ConfigError, match="compile, replay: the fast path is compiled or replayed"):
        Predictor(weights=weights_file[0], optimize="fp32", compile=True, replay=True)
    with pytest.raises(
        ConfigError, match="device: the network runs on 'cpu' or 'cuda', got 'meta'"
    ):
        Predictor(weights=weights_file[0], optimize="fp32", device="meta")


@pytest.mark.skipif(
    replay_unavailable() is not None, reason=f"no replay here: {replay_unavailable()}"
)
def test_a_replayed_predictor_agrees_with_hand_pipeline(weights_file) -> None:
    path, model = weights_file
    arrays = _images(4)
    predictor = Predictor(weights=path, batch_size=3, optimize="fp32", replay=True)
    assert isinstance(predictor.fast, Replayed)
    preds = predictor(arrays, topk=3)
    # recorded for the full batches only: the last batch of 1 runs on the eager fast path
    assert [key[0] for key in predictor.fast.recordings] == [(3, 3, PREP.crop, PREP.crop)]
    for arr, pred in zip(arrays, preds, strict=True):
        scores, labels = torch.softmax(_hand_logits(model, arr), 0).topk(3)
        assert pred.topk_labels == labels.tolist()
        assert pred.pred_score == pytest.approx(float(scores[0]), abs=1e-5)


def test_predict_cli_takes_compile_or_replay_not_both() -> None:
    from resnext.commands import predict_cmd

    parser = argparse.ArgumentParser()
    predict_cmd.add_parser(parser.add_subparsers())
    with pytest.raises(SystemExit):  # argparse: not allowed with argument --compile
        parser.parse_args(["predict", "x.jpg", "--optimize", "fp32", "--compile", "--replay"])
    args = parser.parse_args(["predict", "x.jpg", "--optimize", "fp32", "--replay"])
    assert args.replay and not args.compile


def test_rgba_array_pil_and_path_give_the_same_pixels(tmp_path: Path) -> None:
    from resnext.inference import to_pil

    rgba = np.zeros((4, 6, 4), dtype=np.uint8)
    rgba[..., 0], rgba[..., 1], rgba[..., 2] = 200, 40, 10
    rgba[:, 3:, 3] = 255  # the right half opaque, the left half fully transparent
    rgba[0, 0, 3] = 51  # 20 % opaque: 0.2 * colour + 0.8 * white
    Image.fromarray(rgba).save(tmp_path / "rgba.png")
    expected = np.empty((4, 6, 3), dtype=np.uint8)
    expected[:, :3] = 255  # transparent: the white background, as for files
    expected[:, 3:] = (200, 40, 10)
    expected[0, 0] = (round(0.2 * 200 + 0.8 * 255), round(0.2 * 40 + 0.8 * 255), 206)
    kinds = {
        "array": rgba,
        "pil": Image.fromarray(rgba),
        "path": tmp_path / "rgba.png",
    }
    for kind, item in kinds.items():
        got = np.asarray(to_pil(item))
        np.testing.assert_allclose(got.astype(int), expected.astype(int), atol=1, err_msg=kind)
    arrays = {kind: np.asarray(to_pil(item)) for kind, item in kinds.items()}
    assert np.array_equal(arrays["array"], arrays["pil"])
    assert np.array_equal(arrays["array"], arrays["path"])


def test_non_finite_tensor_and_empty_feature_batch_are_config_errors(weights_file) -> None:
    predictor = Predictor(weights=weights_file[0])
    nan = torch.full((3, 8, 8), 0.5)
    nan[1, 2, 3] = float("nan")
    with pytest.raises(ConfigError, match="finite"):
        predictor([nan])
    with pytest.raises(ConfigError, match="finite"):
        predictor([torch.full((3, 8, 8), float("inf"))])
    with pytest.raises(ConfigError, match="at least one image"):
        predictor.features([])


@pytest.mark.parametrize("names", [["ant", "bee"], [1, 2, 3, 4, 5], [*NAMES, "fox"]])
def test_class_names_that_do_not_fit_the_head_are_refused(
    weights_file, tmp_path: Path, names: list
) -> None:
    from resnext.errors import WeightsError
    from resnext.inference.loading import load_model
    from resnext.weights.native import sidecar_path

    path, _ = weights_file
    sidecar = sidecar_path(path)
    meta = json.loads(sidecar.read_text())
    meta["class_names"] = names
    sidecar.write_text(json.dumps(meta))
    with pytest.raises(WeightsError, match="class_names"):
        load_model(weights=path)


@pytest.mark.parametrize(
    ("mean", "std", "match"),
    [
        ([0.5, 0.5], [0.2, 0.2, 0.2], "mean: expected 3 finite numbers"),
        ([0.5, 0.5, 0.5], [0.0, 0.2, 0.2], "std: expected 3 values > 0"),
        ([0.5, 0.5, 0.5], [-0.2, 0.2, 0.2], "std: expected 3 values > 0"),
        ([0.5, "x", 0.5], [0.2, 0.2, 0.2], "mean: expected 3 finite numbers"),
        ("abc", [0.2, 0.2, 0.2], "mean: expected 3 finite numbers"),
        ([0.5, 0.5, 0.5], 0.2, "std: expected 3 finite numbers"),
    ],
)
def test_preprocessing_mean_and_std_are_checked(
    weights_file, mean: object, std: object, match: str
) -> None:
    from resnext.errors import WeightsError
    from resnext.weights.native import sidecar_path

    path, _ = weights_file
    sidecar = sidecar_path(path)
    meta = json.loads(sidecar.read_text())
    meta["preprocessing"]["mean"], meta["preprocessing"]["std"] = mean, std
    sidecar.write_text(json.dumps(meta))
    with pytest.raises(WeightsError, match=match):
        Predictor(weights=path)
    with pytest.raises(WeightsError, match=match):
        Preprocessing(resize=40, crop=36, mean=mean, std=std)  # type: ignore[arg-type]
    with pytest.raises(WeightsError):
        Preprocessing(resize=40, crop=36, std=(0.2, float("nan"), 0.2))
