"""CIFAR-10-mini accuracy in a time budget: the CPU recipe's ResNeXt and its equal-complexity ResNet.

    python benchmarks/bench_cifar10_mini.py [--seeds 0 1 2] [--root PATH] [--recipe cifar10_mini_cpu]

Trains the recipe's ResNeXt and a ResNet (cardinality 1, bottleneck width chosen so the multiply-adds
match most closely) once per seed, one after the other in this process, and writes every run's
final and best test accuracy and wall time, mean ± std per model, the resolved configs and the
provenance to benchmarks/results/cifar10-mini-<time>.json. Run folders go to --runs.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import sys
from pathlib import Path

import bench_args
from resnext.config import config_to_dict, load_config
from resnext.models import ModelSpec, count, get_spec
from resnext.speed.provenance import write_results
from resnext.train import train

HERE = Path(__file__).resolve().parent
DEFAULT_ROOT = HERE.parent.parent / "shared" / "data" / "cifar10-mini" / "cifar-10-batches-py"


def equal_complexity_resnet(name: str, spec_overrides: dict) -> tuple[dict, dict]:
    """Spec overrides of the C = 1 network whose multiply-adds best match the ResNeXt's."""
    resnext_spec = get_spec(name, **spec_overrides)
    resnext = count(resnext_spec)

    def plain(width: int) -> ModelSpec:
        return dataclasses.replace(resnext_spec, cardinality=1, base_width=width)

    widths = range(1, 8 * resnext_spec.base_width * resnext_spec.cardinality)
    width = min(widths, key=lambda w: abs(count(plain(w)).macs - resnext.macs))
    resnet = count(plain(width))
    overrides = {**spec_overrides, "cardinality": 1, "base_width": width}
    sizes = {
        "resnext": {"params": resnext.params, "macs": resnext.macs},
        "resnet": {"params": resnet.params, "macs": resnet.macs},
    }
    return overrides, sizes


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def main(argv: list[str] | None = None) -> int:
    parser = bench_args.parser(__doc__)
    parser.add_argument("--recipe", default="cifar10_mini_cpu")
    parser.add_argument("--root", default=str(DEFAULT_ROOT), help="cifar-10-batches-py folder")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--models", nargs="+", default=["resnext", "resnet"])
    parser.add_argument("--runs", default="runs/bench-cifar10-mini", help="run folders")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="recipe overrides")
    args = parser.parse_args(argv)
    if not Path(args.root).is_dir():
        print(f"bench_cifar10_mini: {args.root} is not a folder (pass --root)", file=sys.stderr)
        return 2

    base = load_config(args.recipe, [f"data.root={args.root}", *args.overrides])
    resnet_spec, sizes = equal_complexity_resnet(base.model.name, dict(base.model.spec))
    variants = {"resnext": dict(base.model.spec), "resnet": resnet_spec}
    runs: list[dict] = []
    configs: dict[str, dict] = {}
    for model in args.models:
        spec_args = [f"model.spec.{k}={json.dumps(v)}" for k, v in variants[model].items()]
        for seed in args.seeds:
            out = Path(args.runs) / f"{model}-seed{seed}"
            cfg = load_config(
                args.recipe,
                [
                    f"data.root={args.root}",
                    *args.overrides,
                    *spec_args,
                    f"train.seed={seed}",
                    f"output_dir={out}",
                    "train.resume=never",
                ],
            )
            configs[model] = config_to_dict(cfg)
            result = train(cfg)
            best = 100.0 - result.best_val_top1_err
            run = {
                "model": model,
                "seed": seed,
                "final_top1_acc": result.val_top1_acc,
                "best_top1_acc": best,
                "final_top5_acc": 100.0 - float(result.final["val_top5_err"]),
                "wall_time_s": result.wall_time_s,
                "train_time_s": sum(r["epoch_time_s"] for r in result.history),
                "epochs": result.epochs_completed,
                "run_dir": str(out),
            }
            runs.append(run)
            print(
                f"[cifar10-mini] {model} seed {seed}: final top-1 {run['final_top1_acc']:.2f}% "
                f"(best {best:.2f}%) in {run['wall_time_s'] / 60:.1f} min",
                flush=True,
            )

    summary = {}
    for model in args.models:
        mine = [r for r in runs if r["model"] == model]
        acc = mean_std([r["final_top1_acc"] for r in mine])
        wall = mean_std([r["wall_time_s"] / 60 for r in mine])
        summary[model] = {
            **sizes[model],
            "final_top1_acc_mean": acc[0],
            "final_top1_acc_std": acc[1],
            "wall_min_mean": wall[0],
            "wall_min_std": wall[1],
            "runs": len(mine),
        }
        print(
            f"| {model} | {sizes[model]['params'] / 1e6:.2f} M | {sizes[model]['macs'] / 1e6:.0f} M "
            f"| {acc[0]:.2f} ± {acc[1]:.2f} | {wall[0]:.1f} ± {wall[1]:.1f} min |"
        )
    path = write_results(
        Path(args.out),
        "cifar10-mini",
        {"recipe": args.recipe, "overrides": args.overrides, "configs": configs},
        {"runs": runs, "summary": summary},
    )
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
