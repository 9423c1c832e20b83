"""bf16 vs fp32 top-1 agreement of the `optimize` fast path with *trained* weights.

Usage: .venv/bin/python benchmarks/bench_bf16_agreement_trained.py --run runs/bench-cifar10-mini/resnext-seed1
The run folder is a `resnext train` output (config.json + checkpoints/best.pt). Every image of
its validation and training splits is classified, with the evaluation transform, by the plain
fp32 model and by `optimize(model, bf16)` (eager fast path with our grouped kernel where it is
faster, and compiled with inductor), and on CPUs with AVX512-FP16 by `optimize(model, "fp16")`
(float16 products in the 1×1s), and by `quantize_int8(model, …)` with histogram and min-max
ranges observed on the first `--calibration` training images (the histogram ones also with
torch's quantized engine alone, `-engine`, beside our int8 kernels); the record has the
agreements and the accuracies. It
stands in for the issue's ImageNet measurement, which needs pretrained weights this machine
cannot download.
"""

from __future__ import annotations

import copy
import itertools
from pathlib import Path

import torch
from torch.utils.data import DataLoader

import bench_args
from resnext.config.io import config_from_dict, read_file
from resnext.data import build_dataset, default_transforms
from resnext.inference.loading import load_model
from resnext.speed import pointwise_fp16
from resnext.speed.capability import cpu_flags
from resnext.speed.fastpath import optimize
from resnext.speed.int8 import VNNI_FLAGS, quantize_int8
from resnext.speed.provenance import write_results


def _splits(run: Path) -> dict[str, object]:
    data = config_from_dict(read_file(run / "config.json")).data
    tf = default_transforms(data.kind, "val", image_size=data.image_size)
    root = data.root or None
    return {
        split: build_dataset(data.kind, root, name, tf, image_size=data.image_size)
        for split, name in (("val", data.val_split), ("train", data.train_split))
    }


def main() -> int:
    parser = bench_args.parser(__doc__, batch=128)
    parser.add_argument("--run", type=Path, required=True)
    parser.add_argument("--checkpoint", default="best.pt")
    parser.add_argument("--calibration", type=int, default=256, help="int8 calibration images")
    args = parser.parse_args()
    model = load_model(weights=args.run / "checkpoints" / args.checkpoint).model.eval()
    splits = _splits(args.run)
    first = next(iter(DataLoader(splits["val"], batch_size=args.batch)))[0]
    variants = {
        "bf16-eager-fast": optimize(model, torch.bfloat16, backend="none", example_input=first),
        "bf16-inductor": optimize(model, torch.bfloat16, backend="inductor", example_input=first),
    }
    if pointwise_fp16.unavailable_reason() is None:  # float32 with float16 products in the 1×1s
        variants["fp16-eager-fast"] = optimize(model, "fp16", backend="none", example_input=first)
    # int8 after training, its ranges observed on the first `--calibration` training images
    # (which the train split's agreement then includes; the test split's does not)
    train_images = DataLoader(splits["train"], batch_size=args.batch)
    calibration = [x for x, _ in itertools.islice(train_images, -(-args.calibration // args.batch))]
    for observer in ("histogram", "minmax"):
        variants[f"int8-{observer}"] = quantize_int8(model, calibration, observer=observer)
        if VNNI_FLAGS & cpu_flags():  # activations on 8 bits where products sum in int32
            variants[f"int8-{observer}-8bit"] = quantize_int8(
                model, calibration, observer=observer, activation_bits=8
            )
    # the same int8 networks with torch's engine alone, none of our int8 kernels: what those
    # change (rounding ties only, by their tests) on trained weights
    for name in [k for k in variants if k.startswith("int8-histogram")]:
        variants[f"{name}-engine"] = copy.deepcopy(variants[name]).use_kernels(False)
    result: dict[str, object] = {"run": str(args.run), "checkpoint": args.checkpoint}
    for split, dataset in splits.items():
        labels, ref, outs = [], [], {k: [] for k in variants}
        for x, y in DataLoader(dataset, batch_size=args.batch):
            with torch.no_grad():
                ref.append(model(x).argmax(1))
                for name, fn in variants.items():
                    outs[name].append(fn(x).argmax(1))
            labels.append(y)
        y, r = torch.cat(labels), torch.cat(ref)
        row: dict[str, object] = {"images": len(y), "fp32_top1": float((r == y).float().mean())}
        for name, preds in outs.items():
            p = torch.cat(preds)
            row[f"{name}_agreement"] = float((p == r).float().mean())
            row[f"{name}_top1"] = float((p == y).float().mean())
        result[split] = row
        print(split, row)
    config = vars(args) | {"run": str(args.run), "out": str(args.out)}
    path = write_results(args.out, "bench-bf16-agreement-trained", config, result)
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
