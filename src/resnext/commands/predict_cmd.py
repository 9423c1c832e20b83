"""`resnext predict`: top-k classes of image files or folders, as a table or JSON lines."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from resnext.commands.options import add_fast_backend, add_no_timing_cache, add_optimize
from resnext.errors import DataError
from resnext.inference import Predictor, expand_paths


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "predict",
        help="classify images (files or folders, recursed)",
        description="Classify images with a model and weights; preprocessing and class names "
        "come from the weights' metadata.",
    )
    parser.add_argument("paths", nargs="+", help="image files or folders")
    parser.add_argument("--model", help="model name (default: the one the weights name)")
    parser.add_argument("--weights", help="weights file, weights tag or `resnext train` checkpoint")
    parser.add_argument("--topk", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", default="cpu")
    add_optimize(parser, "classify")
    add_fast_backend(parser)
    add_no_timing_cache(parser)
    parser.add_argument("--json", action="store_true", help="one JSON object per image")
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    """Predict every image found under the paths and print the results."""
    files = list(expand_paths(args.paths))
    if not files:
        raise DataError(f"no image files under {', '.join(args.paths)}")
    predictor = Predictor(
        args.model,
        args.weights,
        device=args.device,
        batch_size=args.batch_size,
        optimize=args.optimize,
        compile=args.compile,
        replay=args.replay,
        timing_cache=not args.no_timing_cache,
    )
    for pred in predictor(files, topk=args.topk):
        if args.json:
            sys.stdout.write(json.dumps(pred.to_dict()) + "\n")
        else:
            top = ", ".join(
                f"{name} {score:.3f}"
                for name, score in zip(pred.topk_classes, pred.topk_scores, strict=True)
            )
            print(f"{pred.source}\t{pred.pred_label}\t{top}")
    return 0
