"""`resnext export`: a model and weights as ONNX (checked with onnxruntime) or a torch.export archive."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch

from resnext.commands.options import positive_int
from resnext.errors import ConfigError
from resnext.export import export_onnx, export_program, onnx_parity, save_program
from resnext.inference.inputs import preprocessed_images
from resnext.inference.loading import LoadedModel, load_model


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "export",
        help="export to ONNX or torch.export (.pt2)",
        description="Export a model with a dynamic batch axis. ONNX files are checked against "
        "onnxruntime on random inputs and the largest difference is printed.",
    )
    parser.add_argument("name", help="model name")
    parser.add_argument("--weights", help="weights file, weights tag or `resnext train` checkpoint")
    parser.add_argument("--format", required=True, choices=("onnx", "torch-export"))
    parser.add_argument("--output", required=True, help="output file (.onnx or .pt2)")
    parser.add_argument(
        "--image-size", type=positive_int, help="input side, >= 1 (default: the weights' crop)"
    )
    parser.add_argument(
        "--check-images",
        nargs="+",
        default=[],
        metavar="PATH",
        help="real images (files or folders) to compare ONNX and PyTorch on, besides random ones",
    )
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    """Export and verify; prints a JSON summary."""
    loaded = load_model(args.name, args.weights)
    if loaded.source_format == "torchvision_int8":
        # torch.ao's packed int8 layers have no ONNX or torch.export form: it fails deep inside
        raise ConfigError(
            f"--weights {args.weights}: an int8 (quantized) network cannot be exported; export "
            "the float weights it was quantized from"
        )
    size = args.image_size if args.image_size is not None else loaded.preprocessing.crop
    out = Path(args.output)
    summary: dict[str, Any] = {"model": loaded.name, "weights": loaded.weights, "image_size": size}
    if args.format == "onnx":
        checks = {
            "random_b1": torch.randn(1, 3, size, size),
            "random_b3": torch.randn(3, 3, size, size),
        }
        if args.check_images:
            # Read before exporting: an unreadable image must not leave an unchecked file behind.
            checks["images"] = _real_batch(loaded, args.check_images, size)
        export_onnx(loaded.model, out, image_size=size)
        parity = onnx_parity(loaded.model, out, checks)
        summary["onnxruntime_max_abs_diff"] = parity.max_abs_diff
    else:
        program = export_program(loaded.model, image_size=size)
        save_program(program, out)
        x = torch.randn(2, 3, size, size)
        with torch.no_grad():
            diff = (program.module()(x) - loaded.model(x)).abs().max().item()
        summary["max_abs_diff"] = diff
    summary["output"] = str(out)
    print(json.dumps(summary, indent=2))
    return 0


def _real_batch(loaded: LoadedModel, paths: list[str], size: int) -> torch.Tensor:
    """The images under `paths`, preprocessed as the weights expect, at `size`."""
    return preprocessed_images(paths, loaded.preprocessing, "--check-images", size=size)
