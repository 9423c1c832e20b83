"""`resnext demo`: train the embedded digits recipe (under a minute on two cores) and print the accuracy reached."""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from resnext.commands.options import positive_int
from resnext.config import load_config
from resnext.train import TrainResult, train

# What a run leaves in its folder beyond the files a new run rewrites as it starts.
_EARLIER_RUN = ("checkpoints/last.pt", "checkpoints/best.pt", "result.json", "curves.png")


def run_demo(output_dir: str = "runs/digits_demo", epochs: int | None = None) -> TrainResult:
    """Train `digits_demo` (real handwritten digits, no download) into `output_dir`, from scratch:
    the previous demo run there is replaced."""
    overrides = [f"output_dir={output_dir}", "train.resume=never"]
    if epochs is not None:
        overrides.append(f"train.epochs={epochs}")
    cfg = load_config("digits_demo", overrides)
    run_dir = Path(cfg.resolved_output_dir())
    if _is_demo_run(run_dir, cfg.name):
        _remove_earlier_run(run_dir)
    return train(cfg)


def _is_demo_run(run_dir: Path, name: str) -> bool:
    """Whether `run_dir` holds an earlier demo run (its saved config names the demo recipe).
    Another run's folder is left alone: train() then refuses to start over in it."""
    try:
        saved = json.loads((run_dir / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(saved, dict) and saved.get("name") == name


def _remove_earlier_run(run_dir: Path) -> None:
    # train() refuses resume=never where a run's checkpoints are (the two runs would mix); the
    # demo starts over each time, so its earlier run goes first, whole.
    for name in _EARLIER_RUN:
        (run_dir / name).unlink(missing_ok=True)
    for path in run_dir.glob("provenance-resume-*.json"):
        path.unlink()
    # TensorBoard would overlay the earlier run's curves on the new one's
    shutil.rmtree(run_dir / "tensorboard", ignore_errors=True)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="train a small ResNeXt on the embedded handwritten digits (well under a minute on CPU)",
    )
    p.add_argument("--output-dir", default="runs/digits_demo", help="run folder")
    p.add_argument(
        "--epochs", type=positive_int, default=None, help="epochs, >= 1 (default: the recipe's)"
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    result = run_demo(args.output_dir, args.epochs)
    n_params = sum(v.numel() for k, v in _weights(result).items() if "running" not in k)
    accuracy = (
        f"{result.val_top1_acc:.2f}% top-1 ({100 - result.final['val_top5_err']:.2f}% top-5)"
        if "val_top5_err" in result.final
        else "not validated"
    )
    print(
        f"digits test accuracy: {accuracy} after {result.epochs_completed} epochs "
        f"in {result.wall_time_s:.0f}s, model with {n_params:,} parameters; "
        f"curves: {result.run_dir / 'curves.png'}"
    )
    return 0


def _weights(result: TrainResult) -> dict:
    from resnext.train import load_checkpoint

    return {
        k: v
        for k, v in load_checkpoint(result.last_checkpoint)["model"].items()
        if v.is_floating_point()
    }
