"""The JSON report, per-class CSV and confusion PNG written by an evaluation."""

from __future__ import annotations

import csv
import json

import numpy as np
from eval_helpers import MEAN, STD, ColourNet, random_images

from resnext.evaluate import Normalization, build_report, evaluate, get_protocol, write_outputs

K = 5


def test_report_keys_and_values(tmp_path) -> None:
    rng = np.random.default_rng(1)
    data = [(img, int(rng.integers(0, K))) for img in random_images(9, seed=31)]
    result = evaluate(
        ColourNet(K),
        data,
        get_protocol("center", resize=24, crop=24, interpolation="bicubic"),
        Normalization(MEAN.tolist(), STD.tolist()),
        num_classes=K,
    )
    report = build_report(
        result,
        model="colournet",
        weights=None,
        preprocessing={"mean": MEAN.tolist()},
        dataset={"kind": "memory", "images": len(data)},
    )
    names = [f"class{i}" for i in range(K)]
    paths = write_outputs(report, result, tmp_path / "out", names)
    saved = json.loads((tmp_path / "out" / "report.json").read_text())
    for key in ("model", "weights", "protocol", "preprocessing", "counts", "time"):
        assert key in saved
    # Accuracies are fractions of the confusion matrix, recomputed here from its diagonal.
    conf = result.counter.confusion
    assert saved["counts"]["images"] == 9
    assert abs(saved["top1"] - int(conf.diagonal().sum()) / 9) < 1e-12
    assert abs(saved["top1_err"] - (1 - saved["top1"])) < 1e-12
    assert abs(saved["top5_err"] - (1 - saved["top5"])) < 1e-12
    assert saved["top5"] == 1.0  # 5 classes: the true one is always among the top 5
    assert saved["protocol"]["interpolation"] == "bicubic"
    assert saved["protocol"]["backend"] == "PIL"
    with open(paths["per_class_csv"], encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["name"] for r in rows] == names
    assert sum(int(r["images"]) for r in rows) == 9
    assert sum(int(r["top1_correct"]) for r in rows) == int(conf.diagonal().sum())
    png = tmp_path / "out" / "confusion.png"
    if saved["outputs"]["confusion_png_skipped"] is None:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
