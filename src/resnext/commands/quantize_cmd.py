"""`resnext quantize`: a float model quantized to int8 on calibration images, saved in torchvision's layout."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch

from resnext.errors import ConfigError
from resnext.inference.inputs import preprocessed_images
from resnext.inference.loading import LoadedModel, load_model


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "quantize",
        help="quantize a model to int8 on calibration images",
        description="Quantize a float model to int8 after training (weights per output channel, "
        "activation ranges observed on the calibration images, preprocessed as the weights "
        "expect), and save it as torchvision saves its quantized checkpoints, with a JSON "
        "sidecar (the file name + .json) holding the float network's spec, preprocessing and class "
        "names. Load the file with `resnext predict --weights FILE IMAGES`, `resnext eval` or "
        "resnext.weights.build_int8_with_weights.",
    )
    parser.add_argument("name", help="model name")
    parser.add_argument("--weights", help="weights file, weights tag or `resnext train` checkpoint")
    parser.add_argument(
        "--calibration",
        nargs="+",
        required=True,
        metavar="PATH",
        help="images (files or folders) whose activations set the int8 ranges; a few hundred "
        "from the training distribution are usual, never the images you evaluate on",
    )
    parser.add_argument("--images", type=int, default=256, help="at most this many (default 256)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--observer", choices=("histogram", "minmax"), default="histogram")
    parser.add_argument(
        "--activation-bits",
        type=int,
        choices=(7, 8),
        default=7,
        help="7 (default, torchvision's) runs on any x86 CPU; 8 is more exact and needs VNNI",
    )
    parser.add_argument("--output", required=True, help="the int8 checkpoint to write (.pth)")
    parser.set_defaults(func=run)
    return parser


def calibration_batches(
    loaded: LoadedModel, paths: list[str], limit: int, batch_size: int
) -> list[torch.Tensor]:
    """Up to `limit` images under `paths`, preprocessed as `loaded`'s weights expect, batched."""
    if limit < 1 or batch_size < 1:
        raise ConfigError(f"--images, --batch-size: expected >= 1, got {limit}, {batch_size}")
    images = preprocessed_images(paths, loaded.preprocessing, "--calibration", limit=limit)
    return list(images.split(batch_size))


def run(args: argparse.Namespace) -> int:
    """Quantize, save, and print a JSON summary (with the int8 outputs' difference from float)."""
    from resnext.speed.int8 import check_quantizable, quantize_int8
    from resnext.weights.int8 import check_int8_sidecar_free, save_int8

    output = Path(args.output)
    if not output.name.endswith((".pth", ".pt")):
        raise ConfigError(f"--output: expected a .pth or .pt file, got {args.output}")
    # before loading and calibrating, not after
    if not output.parent.is_dir():
        raise ConfigError(f"--output {args.output}: folder {output.parent} does not exist")
    if output.is_dir():
        raise ConfigError(f"--output {args.output}: is a folder, expected a file")
    check_int8_sidecar_free(output)
    loaded = load_model(args.name, args.weights)
    check_quantizable(loaded.model)  # before the calibration images are read
    batches = calibration_batches(loaded, args.calibration, args.images, args.batch_size)
    net = quantize_int8(
        loaded.model, batches, observer=args.observer, activation_bits=args.activation_bits
    )
    out = save_int8(
        net,
        output,
        model_name=loaded.name,
        spec=getattr(loaded.model, "spec", None),
        preprocessing=loaded.preprocessing,
        class_names=loaded.class_names,
    )
    with torch.no_grad():
        want, got = loaded.model(batches[0]), net(batches[0])
    summary = {
        "model": loaded.name,
        "weights": loaded.weights,
        "calibration_images": sum(len(b) for b in batches),
        "observer": args.observer,
        "activation_bits": args.activation_bits,
        "top1_agreement_on_first_batch": (want.argmax(1) == got.argmax(1)).float().mean().item(),
        "max_rel_diff_on_first_batch": ((got - want).abs().max() / want.abs().max()).item(),
        "output": str(out),
    }
    print(json.dumps(summary, indent=2))
    return 0
