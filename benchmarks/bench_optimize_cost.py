"""What one `resnext.optimize` call costs, without and with the on-disk timing cache.

Usage: .venv/bin/python benchmarks/bench_optimize_cost.py [--models resnext50_32x4d]
       [--batch 16] [--image-size 224] [--backends none,inductor] [--rounds 2]
Each call runs in a fresh Python process (as a `resnext predict --optimize` run would), in turns:
`optimize` with no cache, with an empty cache folder (timing every layer and saving the times),
and with the folder that call left (reading them). Per call it reports the wall time of
`optimize` alone (model built before), how many comparisons were read or timed, and whether the
choices equal the cold call's. The compile (inductor) is not cached by us: inductor's own FX
graph cache skips frozen graphs with oneDNN-packed weights.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile

import bench_args
from resnext.speed.provenance import write_results

CHILD = r"""
import json, sys, time, torch, resnext
from resnext.speed.fastpath import optimize
name, batch, size, backend, cache = sys.argv[1:6]
model = resnext.create_model(name).eval()
start = time.perf_counter()
fast = optimize(model, backend=backend, example_input=torch.randn(int(batch), 3, int(size),
                int(size)), timing_cache=None if cache == "-" else cache)
seconds = time.perf_counter() - start
kinds = ("grouped_choices", "pointwise_choices", "conv_x3_choices", "stem_choices",
         "fusion_choices", "block_choices")
choices = {k: [(c.name, c.chosen, c.variant) for c in getattr(fast, k)] for k in kinds}
tc = fast.timing_cache
print(json.dumps({"seconds": seconds, "hits": tc.hits if tc else None,
                  "misses": tc.misses if tc else None, "choices": choices}))
"""


def _call(model: str, batch: int, size: int, backend: str, cache: str) -> dict[str, object]:
    args = [sys.executable, "-c", CHILD, model, str(batch), str(size), backend, cache]
    done = subprocess.run(args, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"optimize failed ({backend}, cache {cache}):\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = bench_args.parser(
        __doc__, models="resnext50_32x4d", batch=16, image_size=224, rounds=2
    )
    parser.add_argument("--backends", default="none,inductor")
    args = parser.parse_args()
    rows = []
    for model in args.models.split(","):
        for backend in args.backends.split(","):
            for round_ in range(args.rounds):
                with tempfile.TemporaryDirectory() as folder:
                    plain = _call(model, args.batch, args.image_size, backend, "-")
                    cold = _call(model, args.batch, args.image_size, backend, folder)
                    warm = _call(model, args.batch, args.image_size, backend, folder)
                for way, got in (
                    ("no cache", plain),
                    ("cache, empty", cold),
                    ("cache, kept", warm),
                ):
                    row = {
                        "model": model,
                        "backend": backend,
                        "round": round_,
                        "way": way,
                        "seconds": round(got["seconds"], 2),
                        "read": got["hits"],
                        "timed": got["misses"],
                        "same_choices_as_cold": got["choices"] == cold["choices"],
                    }
                    rows.append(row)
                    print(
                        f"{model} {backend:8s} round {round_} {way:13s} {row['seconds']:6.1f} s  "
                        f"read {row['read']} timed {row['timed']}  "
                        f"same choices {row['same_choices_as_cold']}",
                        flush=True,
                    )
    config = {k: v for k, v in vars(args).items() if k != "out"}
    path = write_results(args.out, "bench-optimize-cost", config, {"calls": rows})
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
