"""The fast path with large tensors on transparent huge pages against on 4 KB pages, process by process.

Usage: .venv/bin/python benchmarks/bench_huge_pages.py [--models resnext50_32x4d]
           [--batches 1,16] [--image-size 224] [--dtype fp32] [--backend replay] [--pairs 4]
           [--calls 15]

Torch reads its huge-page switch (THP_MEM_ALLOC_ENABLE, `allocator.request_huge_pages`) once per
process, so the two ways cannot take turns inside one: this script runs `--pairs` pairs of child
processes, one with the switch and one without, the order alternating from pair to pair. Each
child keeps freed memory (as `resnext` commands do), builds the model's fast path on the kernel
choices of one timing cache that all children share (so that both ways run the same kernels),
and reports the median of `--calls` timed calls per batch size and whether its tensors were on
huge pages. The ratio is the median over pairs of with ÷ without, times per call.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import bench_args
from resnext.speed.allocator import HUGE_PAGES_VAR
from resnext.speed.provenance import write_results

DTYPES = ("fp32", "bf16")
BACKENDS = ("none", "replay", "inductor")


def child(args: list[str]) -> None:
    """Time the fast path in this process; print one JSON line."""
    model_name, dtype, backend, cache, size, calls, *batches = args
    import torch

    import resnext
    from resnext.speed.allocator import huge_pages_in_use, keep_freed_memory
    from resnext.speed.fastpath import optimize

    keep_freed_memory()
    torch.manual_seed(0)
    model = resnext.create_model(model_name).eval()
    row: dict[str, object] = {"huge_pages": huge_pages_in_use()}
    for batch in map(int, batches):
        x = torch.randn(batch, 3, int(size), int(size))
        fast = optimize(model, dtype, backend=backend, example_input=x, timing_cache=cache)
        times = []
        with torch.no_grad():
            for _ in range(3):
                fast(x)
            for _ in range(int(calls)):
                start = time.perf_counter()
                fast(x)
                times.append(time.perf_counter() - start)
        row[f"batch{batch}"] = statistics.median(times) * 1e3
    print(json.dumps(row))


def run_child(argv: list[str], huge: bool) -> dict[str, object]:
    env = dict(os.environ)
    env[HUGE_PAGES_VAR] = "1" if huge else "0"
    done = subprocess.run(
        [sys.executable, __file__, "--child", *argv],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise SystemExit(f"a child run failed ({done.returncode}):\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2:])
        return 0
    parser = bench_args.parser(__doc__, models="resnext50_32x4d", image_size=224)
    parser.add_argument("--batches", type=bench_args.int_list, default="1,16")
    parser.add_argument("--dtype", choices=DTYPES, default="fp32")
    parser.add_argument("--backend", choices=BACKENDS, default="replay")
    parser.add_argument("--pairs", type=int, default=4)
    parser.add_argument("--calls", type=int, default=15)
    args = parser.parse_args()
    batches = args.batches
    if min(batches) < 1 or args.pairs < 1 or args.calls < 1:
        parser.error(
            f"--batches, --pairs, --calls: expected at least 1, got {batches}, {args.pairs}, "
            f"{args.calls}"
        )
    results: dict[str, object] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            cache = str(Path(tmp) / f"{name}-timings.json")
            argv = [name, args.dtype, args.backend, cache, str(args.image_size), str(args.calls)]
            argv += [str(b) for b in batches]
            runs: dict[bool, list[dict[str, object]]] = {True: [], False: []}
            for pair in range(args.pairs):
                for huge in (True, False) if pair % 2 == 0 else (False, True):
                    runs[huge].append(run_child(argv, huge))
            row: dict[str, object] = {
                "with huge pages": runs[True],
                "without": runs[False],
                "huge pages in use, with / without": (
                    all(r["huge_pages"] for r in runs[True]),
                    any(r["huge_pages"] for r in runs[False]),
                ),
            }
            for batch in batches:
                key = f"batch{batch}"
                ratios = [w[key] / o[key] for w, o in zip(runs[True], runs[False], strict=True)]
                row[f"{key}: with ÷ without, time"] = statistics.median(ratios)
                print(
                    f"{name} {args.dtype} {args.backend} batch {batch}: with huge pages "
                    f"{statistics.median(r[key] for r in runs[True]):.2f} ms, without "
                    f"{statistics.median(r[key] for r in runs[False]):.2f} ms; with ÷ without "
                    f"×{row[f'{key}: with ÷ without, time']:.3f} (median of {args.pairs} pairs: "
                    + ", ".join(f"{r:.3f}" for r in ratios)
                    + ")"
                )
            results[name] = row
    config = {k: str(v) for k, v in vars(args).items()}
    print(f"results: {write_results(args.out, 'bench-huge-pages', config, results)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
