"""The compiled predictor on batches it was not compiled for: a graph each, or the eager fast path.

Usage: .venv/bin/python benchmarks/bench_predict_batches.py [--models resnext50_32x4d]
       [--batch 8] [--image-size 256] [--calls 8,1,3,8]

One `Predictor(optimize="fp32", compile=True)` per way, each for batches of `--batch`, in one
process, then calls of `--calls` random images in turn (timing cache on, as `resnext predict`
has it): 'eager' is what the predictor does (`new_shapes="eager"`: an input of another size runs
without the graph), 'compile' what it did before stop 32 (each new size compiles a graph).
Reports each call's seconds and the graphs dynamo built during the calls.
"""

from __future__ import annotations

import time

import numpy as np
import torch

import bench_args
from resnext.inference import Predictor
from resnext.speed.provenance import write_results

WAYS = ("eager", "compile")


def main() -> int:
    parser = bench_args.parser(__doc__, models="resnext50_32x4d", batch=8, image_size=256)
    parser.add_argument("--calls", default="8,1,3,8", help="images per call, comma-separated")
    args = parser.parse_args()
    from torch._dynamo.utils import counters

    try:
        calls = [int(n) for n in args.calls.split(",")]
    except ValueError:
        print(f"--calls {args.calls!r}: expected whole numbers, comma-separated")
        return 1
    if not calls or min(calls) < 1:
        print(f"--calls {args.calls!r}: expected positive image counts")
        return 1
    rng = np.random.default_rng(0)
    size = args.image_size
    images = [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(max(calls))]
    results: dict[str, object] = {}
    for name in args.models.split(","):
        for way in WAYS:
            start = time.perf_counter()
            predictor = Predictor(
                name, batch_size=args.batch, optimize="fp32", compile=True, timing_cache=True
            )
            build_s = time.perf_counter() - start
            if way == "compile":
                predictor.fast.new_shapes = "compile"  # type: ignore[union-attr]
            graphs = counters["stats"]["unique_graphs"]
            seconds = []
            for count in calls:
                start = time.perf_counter()
                with torch.no_grad():
                    predictor(images[:count])
                seconds.append(time.perf_counter() - start)
            new_graphs = counters["stats"]["unique_graphs"] - graphs
            results[f"{name}/{way}"] = {
                "build_s": build_s,
                "calls": calls,
                "seconds": seconds,
                "graphs_compiled_during_calls": new_graphs,
            }
            timed = ", ".join(f"{n}: {s:.2f} s" for n, s in zip(calls, seconds, strict=True))
            print(f"{name}/{way}: built in {build_s:.1f} s; {timed}; {new_graphs} new graphs")
    path = write_results(args.out, "bench-predict-batches", vars(args), results)
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
