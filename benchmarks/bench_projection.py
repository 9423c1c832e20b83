"""The paper's 90-epoch ImageNet run of ResNeXt-50 projected to 8 and 64 GPUs from a measured GPU rate.

Usage: .venv/bin/python benchmarks/bench_projection.py --gpu-json benchmarks/results/bench-gpu-….json
       [--variant resnext50_32x4d/train-ours-fast] [--devices 8,64] [--link-gb-per-s 450,50]
       [--loader-rate 858]

Issue 5's target 6, on paper: the training img/s of `--variant` in a `resnext bench gpu` result,
scaled perfectly to each device count; DDP's ring allreduce of the float32 gradients at each
count's link rate (defaults: NVLink 4's 450 GB/s per direction inside an 8-GPU node, and
InfiniBand NDR's 400 Gb/s = 50 GB/s per GPU across nodes: nominal rates, not measured here); and
the CPU cores per GPU that the data pipeline needs at `--loader-rate` images per second per core
(default: machine A's measured rate of the training transforms, benchmarks/RESULTS.md target 4).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

import bench_args
import resnext
from resnext.errors import ConfigError
from resnext.speed.projection import project
from resnext.speed.provenance import write_results


def main() -> int:
    parser = bench_args.parser(__doc__)
    parser.add_argument("--gpu-json", required=True, help="a `resnext bench gpu` results file")
    parser.add_argument("--variant", default="resnext50_32x4d/train-ours-fast")
    parser.add_argument("--devices", default="8,64", help="device counts, comma-separated")
    parser.add_argument("--link-gb-per-s", default="450,50", help="one per device count")
    parser.add_argument("--loader-rate", type=float, default=858.0, help="img/s per CPU core")
    args = parser.parse_args()
    try:
        record = json.loads(Path(args.gpu_json).read_text(encoding="utf-8"))
        row = record["results"]["throughput"][args.variant]
        rate, batch = float(row["throughput"]), int(row["batch"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        print(f"--gpu-json {args.gpu_json}: expected a bench-gpu result with a training row "
              f"{args.variant!r} ({type(exc).__name__}: {exc})")  # fmt: skip
        return 1
    try:
        devices = [int(n) for n in args.devices.split(",")]
        links = [float(b) for b in args.link_gb_per_s.split(",")]
    except ValueError as exc:
        print(f"--devices / --link-gb-per-s: expected comma-separated numbers ({exc})")
        return 1
    if len(links) != len(devices):
        print(f"--link-gb-per-s: expected {len(devices)} rates, one per device count")
        return 1
    name = args.variant.split("/")[0]
    with torch.device("meta"):
        params = sum(p.numel() for p in resnext.create_model(name).parameters())
    try:
        rows = [
            project(
                images_per_s=rate,
                batch_per_device=batch,
                params=params,
                devices=n,
                link_gb_per_s=link,
                loader_images_per_core_s=args.loader_rate,
            )
            for n, link in zip(devices, links, strict=True)
        ]
    except ConfigError as exc:  # a count, rate or batch out of range
        print(f"projection: {exc}")
        return 1
    print(f"{args.variant}: {rate:,.1f} img/s per device at batch {batch} "
          f"({record.get('machine', {}).get('gpus')}), {params:,} parameters")  # fmt: skip
    for p in rows:
        hidden = "hidden" if p.allreduce_ms_per_step < p.step_ms / 2 else "NOT hidden"
        print(f"  {p.devices:3d} devices, global batch {p.global_batch:,}: {p.compute_hours:.2f} h "
              f"of compute, {p.steps:,} steps of {p.step_ms:.1f} ms; allreduce "
              f"{p.allreduce_mb_per_device:.0f} MB = {p.allreduce_ms_per_step:.2f} ms per step "
              f"({hidden}; +{60 * p.comm_hours_if_not_overlapped:.1f} min if not overlapped); "
              f"{p.loader_cores_per_device:.1f} loader cores per device")  # fmt: skip
    config = {k: v for k, v in vars(args).items() if k != "out"}
    results = {"source": args.gpu_json, "source_commit": record.get("git_commit"),
               "images_per_s": rate, "batch": batch, "params": params,
               "projections": [p.as_dict() for p in rows]}  # fmt: skip
    print(f"results: {write_results(args.out, 'bench-projection', config, results)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
