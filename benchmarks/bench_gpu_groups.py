"""ResNeXt-50's grouped 3×3s on a GPU as fewer, wider groups (block-diagonal weights), layer and network.

Usage: python benchmarks/bench_gpu_groups.py [--batch 256] [--parts layers,eager,optimize,compile]

Issue 5's target 5 asks ResNeXt-50 ÷ ResNet-50 time per image ≤ 1.05 on a GPU. Parts, in order,
the results JSON rewritten after each (a time limit loses only the part it stops):
- layers: each distinct grouped 3×3 of ResNeXt-50 at the batch, bf16 channels_last, forward and
  forward + backward, with 1 (cuDNN's grouped kernel), 2, 4, … 32 groups merged into one; and
  ResNet-50's 3×3s for reference. Gives each layer's fastest factor, for inference and training.
- eager: ResNeXt-50 with its grouped 3×3s as they are and merged by those factors, and
  ResNet-50, bf16 autocast channels_last, inference and a training step, interleaved rounds.
- optimize: the same three through `resnext.optimize` (BN folded, frozen inductor graph).
- compile: the training step of the three under torch.compile.
Every merged network is first checked to compute the plain one's function (float32, TF32 off).
`--device cpu` with a small `--batch`/`--image-size` is a smoke run of the code path.
"""

from __future__ import annotations

import argparse
import copy
from collections import Counter
from pathlib import Path

import torch

import bench_args
import resnext
from resnext.speed import gpu_bench
from resnext.speed.measure import interleaved
from resnext.speed.merged_groups import (
    FACTORS,
    choose_factors,
    grouped_layers,
    merge_groups,
    widen_groups,
)
from resnext.speed.provenance import write_results

PARTS = ("layers", "eager", "optimize", "compile")
MODELS = ("resnext50_32x4d", "resnet50")


def resnet_3x3s(model: torch.nn.Module) -> list[str]:
    """Names of the 3×3 convolutions inside ResNet's blocks (its stem is 7×7)."""
    return [
        n
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3)
    ]


def layer_part(args: argparse.Namespace, device: torch.device, record: dict) -> dict[str, dict]:
    """Time every factor on every distinct grouped layer; return the chosen factors."""
    x = torch.randn(args.batch, 3, args.image_size, args.image_size, device=device)
    net = resnext.create_model(MODELS[0]).to(device).eval()
    layers = grouped_layers(net, x)
    counts = Counter(layer.label for layer in layers.values())
    ref_net = resnext.create_model(MODELS[1]).to(device).eval()
    ref_layers = grouped_layers(ref_net, x, resnet_3x3s(ref_net))
    ref_counts = Counter(layer.label for layer in ref_layers.values())
    chosen = {}
    for task, train in (("infer", False), ("train", True)):
        picks, times = choose_factors(layers, device, train=train, iters=args.iters)
        _, ref_times = choose_factors(ref_layers, device, train=train, candidates=(1,))
        chosen[task] = picks
        grouped_total = {f: sum(counts[k] * row.get(f, row[1]) for k, row in times.items())
                         for f in FACTORS}  # fmt: skip
        best_total = sum(counts[k] * min(row.values()) for k, row in times.items())
        ref_total = sum(ref_counts[k] * row[1] for k, row in ref_times.items())
        record[f"layers_{task}"] = {
            "ms_per_factor": {k: {str(f): v for f, v in row.items()} for k, row in times.items()},
            "count": dict(counts),
            "network_ms_at_factor": {str(f): v for f, v in grouped_total.items()},
            "network_ms_best_per_layer": best_total,
            "resnet50_3x3_ms": {k: row[1] for k, row in ref_times.items()},
            "resnet50_3x3_count": dict(ref_counts),
            "resnet50_3x3_network_ms": ref_total,
            "chosen": picks,
        }
        print(f"{task}: ResNeXt-50's 16 grouped 3x3s {grouped_total[1]:.2f} ms as they are, "
              f"{best_total:.2f} ms at the best factor per layer; ResNet-50's 3x3s "
              f"{ref_total:.2f} ms")  # fmt: skip
        for label, row in times.items():
            cells = "  ".join(f"{f}:{v:.3f}" for f, v in row.items())
            print(f"  {task} {label} x{counts[label]}  {cells}")
    return chosen


def networks(chosen: dict[str, dict], device: torch.device, probe: torch.Tensor) -> dict:
    """Plain ResNeXt-50 (BN statistics varied), its merged copies and ResNet-50, checked."""
    plain = resnext.create_model(MODELS[0])
    gpu_bench.vary_batch_norms(plain)
    wide = widen_groups(copy.deepcopy(plain), chosen["infer"])
    merged = merge_groups(copy.deepcopy(plain), chosen["train"])
    errors = {}
    with torch.no_grad(), gpu_bench.exact_float32():
        reference = plain.to(device).eval()(probe)
        for label, net in (("widened", wide), ("merged", merged)):
            errors[label] = gpu_bench.relative_error(net.to(device).eval()(probe), reference)
            gpu_bench.require_parity(f"ResNeXt-50 {label}", errors[label])
    resnet = resnext.create_model(MODELS[1])
    gpu_bench.vary_batch_norms(resnet)
    return {"plain": plain, "widened": wide, "merged": merged, "resnet50": resnet, "err": errors}


def timed(calls: dict, device: torch.device, args: argparse.Namespace) -> dict:
    """Interleaved timing of `calls` (label -> call); img/s and ratios to the plain ResNeXt-50."""
    sync = {k: (gpu_bench.synchronised(fn, device), args.batch) for k, fn in calls.items()}
    timings = interleaved(sync, rounds=args.rounds, iters=args.iters, warmup=1)
    out = {k: t.as_dict() for k, t in timings.items()}
    for task in ("infer", "train"):
        ref = timings.get(f"{task}-resnet50")
        for k, t in timings.items():
            if k.startswith(task) and ref is not None:
                out[k]["time_per_image_over_resnet50"] = t.median_s / ref.median_s
    for k, row in out.items():
        extra = row.get("time_per_image_over_resnet50")
        ratio = f"  ÷ ResNet-50 {extra:.3f}" if extra else ""
        print(f"  {k:32s} {row['throughput']:9.1f} img/s{ratio}")
    return out


def main() -> int:
    parser = bench_args.parser(__doc__, batch=256, image_size=224, rounds=5)
    parser.add_argument("--iters", type=int, default=10, help="calls per round")
    parser.add_argument("--parts", default=",".join(PARTS), help="comma-separated, in order")
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    parts = args.parts.split(",")
    unknown = set(parts) - set(PARTS)
    if unknown:
        parser.error(f"--parts: unknown {sorted(unknown)}; expected some of {list(PARTS)}")
    try:
        device = torch.device(args.device)
    except RuntimeError:
        parser.error(f"--device: expected cuda, cuda:N or cpu, got {args.device!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device: 'cuda' asked for, but torch sees no CUDA device here")
    torch.backends.cudnn.benchmark = True
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    record: dict[str, object] = {}
    written: list[Path] = []

    def save() -> None:
        written.append(write_results(args.out, "bench-gpu-groups", config, record))
        for old in written[:-1]:
            old.unlink(missing_ok=True)
        written[:] = written[-1:]

    chosen = layer_part(args, device, record)
    save()
    probe = torch.randn(4, 3, args.image_size, args.image_size, device=device)
    nets = networks(chosen, device, probe)
    record["parity"] = nets["err"]
    x = torch.randn(args.batch, 3, args.image_size, args.image_size, device=device)
    y = torch.randint(0, 1000, (args.batch,), device=device)
    infer_nets = {"resnext50": nets["plain"], "resnext50-widened": nets["widened"],
                  "resnet50": nets["resnet50"]}  # fmt: skip
    train_nets = {"resnext50": nets["plain"], "resnext50-merged": nets["merged"],
                  "resnet50": nets["resnet50"]}  # fmt: skip
    for part in parts:
        print(f"== {part}")
        if part == "eager":
            calls = {f"infer-{k}": gpu_bench.inference_call("eager", copy.deepcopy(m), x, True)
                     for k, m in infer_nets.items()}  # fmt: skip
            calls |= {f"train-{k}": gpu_bench.training_step("eager", copy.deepcopy(m), x, y, True)
                      for k, m in train_nets.items()}  # fmt: skip
        elif part == "optimize":
            calls = {f"infer-{k}": gpu_bench.inference_call("optimize", copy.deepcopy(m), x, True)
                     for k, m in infer_nets.items()}  # fmt: skip
        elif part == "compile":
            calls = {f"train-{k}": gpu_bench.training_step("compile", copy.deepcopy(m), x, y, True)
                     for k, m in train_nets.items()}  # fmt: skip
        else:  # layers: done first whatever was asked, since the others use its factors
            continue
        for fn in calls.values():  # compile and warm up before any timing
            fn()
        record[part] = timed(calls, device, args)
        save()
    print(f"results: {written[-1]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
