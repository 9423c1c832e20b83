"""Where ResNeXt-50's extra time over ResNet-50's goes on a GPU: each step's device time by kind of work.

Usage: python benchmarks/bench_gpu_ops.py [--models resnext50_32x4d,resnet50] [--batch 256]
       [--tasks train,infer] [--steps 3] [--device cuda]

Each model's training step (SGD, bf16 autocast, channels-last: `resnext bench gpu`'s
train-ours-eager) and inference (infer-ours-eager) are profiled with torch.profiler; each
operator's self kernel time is put under a kind of work (`resnext.speed.op_kinds`: 1×1
convolutions, grouped and dense 3×3s, their backward passes, batch norms, ReLUs and adds, the
optimiser, …) and summed per step. Printed per kind: ms per step of each model and the first
minus the second, so that the gap between the networks is split by kind. `--device cpu` with a
small `--batch`/`--image-size` is a smoke run (CPU self time instead of kernel time).
"""

from __future__ import annotations

import sys

import torch

import bench_args
import resnext
from resnext.speed import gpu_bench
from resnext.speed.op_kinds import kind_ms_per_step
from resnext.speed.provenance import write_results

TASKS = ("train", "infer")


def main() -> int:
    parser = bench_args.parser(
        __doc__, models="resnext50_32x4d,resnet50", batch=256, image_size=224
    )
    parser.add_argument("--tasks", default="train,infer", help="train and/or infer")
    parser.add_argument("--steps", type=int, default=3, help="profiled calls per model and task")
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    tasks = args.tasks.split(",")
    if set(tasks) - set(TASKS) or args.steps < 1:
        print(f"--tasks: expected some of {list(TASKS)}; --steps: expected >= 1")
        return 1
    try:
        device = torch.device(args.device)
    except RuntimeError:
        print(f"--device: expected cuda, cuda:N or cpu, got {args.device!r}")
        return 1
    if device.type == "cuda" and not torch.cuda.is_available():
        print("--device: 'cuda' asked for, but torch sees no CUDA device here")
        return 1
    torch.backends.cudnn.benchmark = True
    models = args.models.split(",")
    size = args.image_size
    x = torch.randn(args.batch, 3, size, size, device=device)
    results: dict[str, dict[str, dict[str, float]]] = {}
    for task in tasks:
        results[task] = {}
        for name in models:
            model = resnext.create_model(name).to(device)
            y = torch.randint(0, model.num_classes, (args.batch,), device=device)
            if task == "train":
                call = gpu_bench.training_step("eager", model, x, y, ours=True)
            else:
                call = gpu_bench.inference_call("eager", model, x, ours=True)
            results[task][name] = kind_ms_per_step(call, device, steps=args.steps)
        _print_table(task, models, results[task])
    config = {"models": models, "tasks": tasks, "batch": args.batch, "image_size": size,
              "steps": args.steps, "device": str(device)}  # fmt: skip
    print(f"results: {write_results(args.out, 'bench-gpu-ops', config, results)}")
    return 0


def _print_table(task: str, models: list[str], rows: dict[str, dict[str, float]]) -> None:
    kinds = sorted(
        {k for row in rows.values() for k in row}, key=lambda k: -rows[models[0]].get(k, 0)
    )
    head = "".join(f"{m:>18s}" for m in models)
    extra = f"{'first - second':>16s}" if len(models) >= 2 else ""
    print(f"{task}, ms per step by kind:{head}{extra}")
    for kind in [*kinds, "total"]:
        values = [
            sum(rows[m].values()) if kind == "total" else rows[m].get(kind, 0.0) for m in models
        ]
        cells = "".join(f"{v:18.2f}" for v in values)
        diff = f"{values[0] - values[1]:16.2f}" if len(values) >= 2 else ""
        print(f"  {kind:30s}{cells}{diff}")


if __name__ == "__main__":
    sys.exit(main())
