"""`resnext info NAME`: the Table-1-style stage table and totals of one model."""

from __future__ import annotations

import argparse
import json

from resnext.commands.options import positive_int
from resnext.models import MODELS, count


def model_info(name: str, input_size: int | None = None) -> dict[str, object]:
    """Spec, stage table and totals of a named model as a JSON-ready dict."""
    entry = MODELS.get(name)
    spec = entry.spec
    c = count(spec, input_size)
    stem = {
        "imagenet": f"7x7, {spec.stem_width}, stride 2; 3x3 max pool, stride 2",
        "deep": f"3x3 convs {spec.stem_width},{spec.stem_width},{spec.stem_out} (first stride 2); "
        "3x3 max pool, stride 2",
        "cifar": f"3x3, {spec.stem_width}",
    }[spec.stem]
    return {
        "name": entry.name,
        "source": entry.source,
        "template": spec.template,
        "spec": spec.to_dict(),
        "input_size": c.input_size,
        "stem": stem,
        "stages": [
            {
                "stage": s.name,
                "output_size": list(s.output_size),
                "block": s.shape,
                "repeats": s.blocks,
                "params": s.params,
                "gflops": s.macs / 1e9,
            }
            for s in c.stages
        ],
        "params": c.params,
        "params_conv_fc": c.params_conv_fc,
        "gflops": c.macs / 1e9,
        "gflops_mmcv": c.mmcv_flops / 1e9,
        "flops_convention": "multiply-adds of conv and fc layers per image (paper Table 1)",
    }


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="stage table (paper Table 1 style) and totals of a model")
    p.add_argument("name", help="model name or alias (see `resnext list`)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument(
        "--input-size",
        type=positive_int,
        default=None,
        help="square input side, >= 1 (default 224 / 32)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    info = model_info(args.name, args.input_size)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"{info['name']} ({info['template']}), input {info['input_size']}x{info['input_size']}")
    print(f"  source: {info['source']}")
    print(f"{'stage':<8} {'output':>9}  {'block':<40} {'x':>3} {'params':>12} {'GFLOPs':>8}")
    print(f"{'conv1':<8} {'':>9}  {info['stem']}")
    for s in info["stages"]:  # type: ignore[union-attr]
        size = "x".join(map(str, s["output_size"]))
        print(
            f"{s['stage']:<8} {size:>9}  [{s['block']}]".ljust(61)
            + f" {s['repeats']:>3} {s['params']:>12,} {s['gflops']:>8.3f}"
        )
    print(f"params: {info['params']:,} (without BN affine: {info['params_conv_fc']:,})")
    print(
        f"FLOPs: {info['gflops']:.3f} G multiply-adds (conv + fc, the paper's convention); "
        f"{info['gflops_mmcv']:.3f} G counting BN/ReLU/pool elements as mmcv does"
    )
    return 0
