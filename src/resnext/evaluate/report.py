"""Evaluation outputs: the JSON report, the per-class accuracy CSV and the confusion-matrix PNG."""

from __future__ import annotations

import csv
import json
import platform
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from resnext.evaluate.runner import EvalResult
from resnext.io.atomic import replacing, write_text
from resnext.io.folders import output_folder


def build_report(
    result: EvalResult,
    *,
    model: str,
    weights: str | None,
    preprocessing: dict[str, Any],
    dataset: dict[str, Any],
    subset: Sequence[int] | None = None,
    fast_path: str = "off",
    fast_path_compiled: bool = False,
    fast_path_replayed: bool = False,
) -> dict[str, Any]:
    """The JSON-ready report: what was evaluated, how, on what, and the accuracies as fractions."""
    c = result.counter
    top1, top5 = c.accuracy(1), c.accuracy(5)
    return {
        "model": model,
        "weights": weights,
        "protocol": result.protocol.to_dict(),
        "fast_path": fast_path,  # `resnext.optimize` precision, or "off" (the plain model)
        "fast_path_compiled": fast_path_compiled,  # with inductor's graph (`--compile`)
        "fast_path_replayed": fast_path_replayed,  # its kernel calls replayed (`--replay`)
        "preprocessing": preprocessing,
        "dataset": dataset,
        "restricted_classes": list(subset) if subset is not None else None,
        "counts": {
            "images": c.total,
            "scored_classes": c.num_classes,
            "top1_correct": int(c.hits[0]),
            "top5_correct": int(c.hits[1]),
        },
        "top1": top1,
        "top5": top5,
        "top1_err": 1.0 - top1,
        "top5_err": 1.0 - top5,
        "time": {
            "seconds": result.seconds,
            "images_per_second": c.total / result.seconds if result.seconds > 0 else None,
        },
        "world_size": result.world_size,
        "versions": {"python": platform.python_version(), "torch": torch.__version__},
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def per_class_csv(result: EvalResult, class_names: Sequence[str] | None = None) -> str:
    """CSV text: class index, name, images, correct, top-1 accuracy."""
    rows = [["class", "name", "images", "top1_correct", "top1_accuracy"]]
    for cls, total, correct in result.counter.per_class():
        name = class_names[cls] if class_names is not None and cls < len(class_names) else ""
        acc = f"{correct / total:.6f}" if total else ""
        rows.append([str(cls), name, str(total), str(correct), acc])
    lines: list[str] = []

    class _Sink:
        def write(self, s: str) -> None:
            lines.append(s)

    csv.writer(_Sink(), lineterminator="\n").writerows(rows)
    return "".join(lines)


def confusion_png(result: EvalResult, path: Path, title: str) -> str | None:
    """Draw the confusion matrix with matplotlib; returns why not when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install matplotlib)"
    conf = result.counter.confusion.double()
    rows = conf.sum(1, keepdim=True).clamp_min(1)
    fig, ax = plt.subplots(figsize=(6, 5), dpi=100)
    im = ax.imshow((conf / rows).numpy(), cmap="viridis", vmin=0.0, vmax=1.0)
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(title)
    fig.colorbar(im, ax=ax, label="fraction of the true class")
    fig.tight_layout()
    try:
        with replacing(path) as tmp:
            fig.savefig(tmp)
    finally:
        plt.close(fig)
    return None


def write_outputs(
    report: dict[str, Any],
    result: EvalResult,
    output_dir: str | Path,
    class_names: Sequence[str] | None = None,
) -> dict[str, str]:
    """Write report.json, per_class.csv and confusion.png into `output_dir`; returns their paths."""
    out = output_folder(output_dir)
    paths = {"per_class_csv": str(out / "per_class.csv"), "report": str(out / "report.json")}
    write_text(out / "per_class.csv", per_class_csv(result, class_names), newline="")
    why_not = confusion_png(
        result, out / "confusion.png", f"{report['model']} ({report['protocol']['name']})"
    )
    if why_not is None:
        paths["confusion_png"] = str(out / "confusion.png")
    report = {
        **report,
        "outputs": {
            **paths,
            "confusion_png": paths.get("confusion_png"),
            "confusion_png_skipped": why_not,
        },
    }
    write_text(out / "report.json", json.dumps(report, indent=2) + "\n")
    return paths
