"""`resnext convert SOURCE --model NAME --output FILE.safetensors`: any supported weights → native format."""

from __future__ import annotations

import argparse
import datetime as _dt
from pathlib import Path

from resnext.errors import WeightsError


def convert_weights(source: str, model_name: str, output: str | Path) -> Path:
    """Load `source` (a file in any supported format or a weights tag) and save it natively."""
    from resnext import __version__
    from resnext.inference.loading import load_training_checkpoint, torch_payload
    from resnext.weights import build_with_weights, load_weights, save_weights
    from resnext.weights.native import sidecar_path

    output = Path(output)
    if output.suffix != ".safetensors":
        raise WeightsError(f"--output {output}: expected a path ending in .safetensors")
    if output.exists():
        raise WeightsError(f"--output {output}: exists already; remove it or choose another path")
    side = sidecar_path(output)
    if side.exists():  # save_weights writes it beside the output: never replace someone's file
        raise WeightsError(
            f"--output {output}: its sidecar {side} exists already; remove it or choose another path"
        )
    # A `resnext train` checkpoint is read as eval/predict read it: with its config's spec
    # overrides and its run's preprocessing (as a plain state dict it would get ImageNet's).
    read = torch_payload(source)
    net = load_training_checkpoint(read, source, model_name)
    if net is not None:
        model, fmt = net, "resnext_train_checkpoint"
        preprocessing, class_names = net.preprocessing, net.class_names
    else:
        loaded = load_weights(source, payload=read)
        model, fmt = build_with_weights(model_name, loaded), loaded.source_format
        preprocessing, class_names = loaded.preprocessing, loaded.class_names
    return save_weights(
        model,
        output,
        preprocessing=preprocessing,
        class_names=class_names,
        provenance={
            "source": str(source),
            "source_format": fmt,
            "converted_by": f"resnext {__version__}",
            "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        },
        model_name=model_name,
    )


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "convert", help="convert weights of any supported format to native safetensors + JSON"
    )
    p.add_argument("source", help="weights file (.pth/.pyth/.pkl/.t7/.safetensors) or weights tag")
    p.add_argument("--model", required=True, help="model name, e.g. resnext50_32x4d")
    p.add_argument("--output", required=True, help="output path ending in .safetensors")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    sidecar = convert_weights(args.source, args.model, args.output)
    print(f"wrote {args.output} and {sidecar}")
    return 0
