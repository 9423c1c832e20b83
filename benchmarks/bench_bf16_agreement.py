"""bf16 (or fp16) vs fp32 top-1 agreement of the `optimize` fast path on the real ImageNet sample
images.

Also the float32 fast path (with its bf16×3 convolutions where the CPU has AMX) against the
plain eval-mode model in float32: their top-1 agreement and largest relative difference.

Usage: .venv/bin/python benchmarks/bench_bf16_agreement.py --root /work/shared/data/imagenet-sample
       [--model resnext50_32x4d] [--weights FILE.safetensors] [--limit 1000] [--seed 0]
       [--fuse-block auto|on|off] [--precision bf16|fp16]
--precision fp16 compares `optimize(model, "fp16")` (float32, the 1×1s' products in float16) instead
of bf16.
Without --weights the network keeps its random initialisation from --seed (no pretrained weights
can be downloaded here); the record says which. A random network's logits are nearly tied, so its
agreement depends on the draw: compare settings (e.g. --fuse-block) on the same seed.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

import bench_args
import resnext
from resnext.data.images import load_rgb
from resnext.data.presets import imagenet_eval
from resnext.speed.data_bench import list_images
from resnext.speed.fastpath import optimize
from resnext.speed.provenance import write_results


def main() -> int:
    parser = bench_args.parser(__doc__, batch=25)
    parser.add_argument("--root", type=Path, required=True)
    parser.add_argument("--model", default="resnext50_32x4d")
    parser.add_argument("--weights", type=Path, default=None)
    parser.add_argument("--limit", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fuse-block", choices=("auto", "on", "off"), default="auto")
    parser.add_argument("--precision", choices=("bf16", "fp16"), default="bf16")
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    model = resnext.create_model(args.model).eval()
    if args.weights is not None:
        model.load_state_dict(load_file(str(args.weights)))
    files = list_images(args.root, args.limit)
    transform = imagenet_eval()
    example = torch.randn(args.batch, 3, 224, 224)
    fp32 = optimize(model, torch.float32, backend="jit", example_input=example)
    low = optimize(
        model, args.precision, backend="jit", example_input=example, fuse_block=args.fuse_block
    )
    agree, total, max_err, top5_overlap = 0, 0, 0.0, 0.0
    plain_agree, plain_err = 0, 0.0
    for start in range(0, len(files), args.batch):
        batch = torch.stack([transform(load_rgb(p)) for p in files[start : start + args.batch]])
        with torch.no_grad():
            a, b, plain = fp32(batch), low(batch), model(batch)
        plain_agree += int((a.argmax(1) == plain.argmax(1)).sum())
        plain_err = max(plain_err, float((a - plain).abs().max() / plain.abs().max()))
        agree += int((a.argmax(1) == b.argmax(1)).sum())
        total += len(batch)
        max_err = max(max_err, float((a - b).abs().max() / a.abs().max()))
        ta, tb = a.topk(5).indices, b.topk(5).indices
        top5_overlap += sum(
            len(set(x.tolist()) & set(y.tolist())) / 5 for x, y in zip(ta, tb, strict=True)
        )
    result = {
        "images": total,
        "top1_agreement": agree / total,
        "top5_overlap": top5_overlap / total,
        "max_rel_err": max_err,
        "fp32_fast_vs_plain_top1_agreement": plain_agree / total,
        "fp32_fast_vs_plain_max_rel_err": plain_err,
        "fp32_conv_x3_layers": sum(
            c.chosen == "kernel" for c in getattr(fp32, "conv_x3_choices", [])
        ),
        "precision": args.precision,
        "weights": str(args.weights)
        if args.weights
        else f"random initialisation, seed {args.seed}",
        "block_choices": [c.chosen for c in getattr(low, "block_choices", [])],
    }
    print(result)
    config = {k: str(v) for k, v in vars(args).items()}
    print(f"results: {write_results(args.out, 'bench-bf16-agreement', config, result)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
