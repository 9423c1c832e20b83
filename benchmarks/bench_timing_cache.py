"""What choosing kernels by timing costs a new process, without and with the on-disk timing cache.

Usage: .venv/bin/python benchmarks/bench_timing_cache.py [--models resnext50_32x4d]
       [--batch 16] [--image-size 224] [--ways none,inductor,train] [--rounds 2]
Each call runs in a fresh Python process (as a `resnext predict --optimize` or `resnext train`
run would), three calls in turns: with no cache, with an empty cache folder (timing and saving
the times), and with the folder that call left (reading them). The ways:
- `none` / `inductor`: `resnext.optimize` with that backend, its wall time alone (model built
  before), and whether its choices equal the cold call's;
- `train`: the first training step of the float32 CPU fast path (channels-last, fused batch
  norm, grouped kernels, chosen 1×1 products; SGD), when `autotune` times every product's
  candidates, and the second step for comparison.
It reports how many comparisons were read or timed. The inductor build is not cached by us:
inductor's own FX graph cache skips frozen graphs with oneDNN-packed weights.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile

import bench_args
from resnext.speed.provenance import write_results

OPTIMIZE = r"""
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

TRAIN = r"""
import contextlib, json, sys, time, torch, resnext
import torch.nn.functional as F
from resnext.speed import autotune
from resnext.speed.allocator import keep_freed_memory
from resnext.speed.timing_cache import TimingCache
from resnext.speed.train_paths import use_training_fast_paths
name, batch, size, _, cache = sys.argv[1:6]
keep_freed_memory()
model = resnext.create_model(name).to(memory_format=torch.channels_last).train()
use_training_fast_paths(model, fused_bn=True, grouped_kernels=True, gemm_weight_grad=True)
opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
x = torch.randn(int(batch), 3, int(size), int(size)).contiguous(memory_format=torch.channels_last)
y = torch.randint(0, 1000, (int(batch),))
tc = None if cache == "-" else TimingCache(cache)
steps = []
with autotune.CHOOSER.using(tc):
    for _ in range(2):
        start = time.perf_counter()
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        steps.append(time.perf_counter() - start)
choices = [(d.op, [str(k) for k in d.key], d.winner) for d in autotune.decisions()]
print(json.dumps({"seconds": steps[0], "second_step": steps[1], "hits": tc.hits if tc else None,
                  "misses": tc.misses if tc else None, "choices": choices}))
"""


def _call(model: str, batch: int, size: int, way: str, cache: str) -> dict[str, object]:
    child = TRAIN if way == "train" else OPTIMIZE
    args = [sys.executable, "-c", child, model, str(batch), str(size), way, cache]
    done = subprocess.run(args, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{way} failed (cache {cache}):\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = bench_args.parser(
        __doc__, models="resnext50_32x4d", batch=16, image_size=224, rounds=2
    )
    parser.add_argument("--ways", default="none,inductor,train")
    args = parser.parse_args()
    rows = []
    for model in args.models.split(","):
        for way in args.ways.split(","):
            for round_ in range(args.rounds):
                with tempfile.TemporaryDirectory() as folder:
                    plain = _call(model, args.batch, args.image_size, way, "-")
                    cold = _call(model, args.batch, args.image_size, way, folder)
                    warm = _call(model, args.batch, args.image_size, way, folder)
                for cache, got in (
                    ("no cache", plain),
                    ("cache, empty", cold),
                    ("cache, kept", warm),
                ):
                    row = {
                        "model": model,
                        "way": way,
                        "round": round_,
                        "cache": cache,
                        "seconds": round(got["seconds"], 2),
                        "second_step_seconds": got.get("second_step"),  # train only
                        "read": got["hits"],
                        "timed": got["misses"],
                        "same_choices_as_cold": got["choices"] == cold["choices"],
                    }
                    rows.append(row)
                    print(
                        f"{model} {way:8s} round {round_} {cache:13s} {row['seconds']:6.1f} s  "
                        f"read {row['read']} timed {row['timed']}  "
                        f"same choices {row['same_choices_as_cold']}"
                        + (f"  (second step {got['second_step']:.1f} s)" if way == "train" else ""),
                        flush=True,
                    )
    config = {k: v for k, v in vars(args).items() if k != "out"}
    path = write_results(args.out, "bench-timing-cache", config, {"calls": rows})
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
