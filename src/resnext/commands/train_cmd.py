"""`resnext train --config FILE_OR_NAME [key=value ...]`: train or resume a run from a recipe."""

from __future__ import annotations

import argparse
import math
import os
from typing import TYPE_CHECKING

from resnext.config import list_recipes, load_config

if TYPE_CHECKING:
    from resnext.train import TrainResult


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train a model from a TOML recipe (resumes automatically from the run folder)",
        description="Train a model from a recipe. Recipes: " + ", ".join(list_recipes()),
    )
    p.add_argument(
        "--config", required=True, help="recipe name (see above) or path to a .toml file"
    )
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="dotted overrides, e.g. data.root=PATH output_dir=PATH epochs=N optim.lr=0.05",
    )
    p.add_argument(
        "--resume", default=None, help="checkpoint to resume from ('never' to start over)"
    )
    p.add_argument("--output-dir", default=None, help="run folder (same as output_dir=PATH)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from resnext.train import train

    overrides = list(args.overrides)
    if args.resume is not None:
        overrides.append(f"train.resume={args.resume}")
    if args.output_dir is not None:
        overrides.append(f"output_dir={args.output_dir}")
    cfg = load_config(args.config, overrides)
    result = train(cfg)
    # Under torchrun every rank returns here; rank 0 speaks for the job, as in training.
    if result.final and int(os.environ.get("RANK", "0")) == 0:
        print(
            f"done: {result.epochs_completed} epochs, {_errors(result)}; run folder {result.run_dir}"
        )
    return 0


def _errors(result: TrainResult) -> str:
    best = (
        f"best {result.best_val_top1_err:.2f}% at epoch {result.best_epoch}"
        if math.isfinite(result.best_val_top1_err)
        else "none validated yet"
    )
    final = result.final
    if "val_top1_err" not in final:  # train.eval_every skipped the last recorded epoch
        return f"last epoch not validated (val top-1 error: {best})"
    return (
        f"val top-1 error {final['val_top1_err']:.2f}% ({best}), "
        f"top-5 error {final['val_top5_err']:.2f}%"
    )
