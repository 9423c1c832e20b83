"""A replay that hands functional operators' outputs on against one that copies them into its arena.

Usage: .venv/bin/python benchmarks/bench_replay_donation.py [--models resnext50_32x4d]
           [--batches 1,16] [--image-size 224] [--dtype fp32] [--rounds 15]

For each model and batch: one eager fast path (`optimize(..., backend="none")`), recorded twice
on the same modules (`replay.Recorded` with `donate=False` and `donate=True`), and the eager path
itself, all three timed in turns (`measure.interleaved`, one call a turn). Each replay must give
the eager path's output bit for bit on a fresh input first. Ratios are medians over rounds of
the two times in the same round. The process keeps freed memory, as `resnext` commands run.
"""

from __future__ import annotations

import torch

import bench_args
import resnext
from resnext.speed.allocator import keep_freed_memory
from resnext.speed.fastpath import optimize
from resnext.speed.measure import interleaved, median_ratio
from resnext.speed.provenance import write_results
from resnext.speed.replay import Recorded

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def main() -> int:
    parser = bench_args.parser(__doc__, models="resnext50_32x4d", image_size=224, rounds=15)
    parser.add_argument("--batches", type=bench_args.int_list, default="1,16")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    args = parser.parse_args()
    batches = args.batches
    if args.rounds < 1 or min(batches) < 1:
        parser.error(f"--rounds, --batches: expected at least 1, got {args.rounds}, {batches}")
    keep_freed_memory()
    torch.manual_seed(0)
    results: dict[str, object] = {}
    for name in args.models.split(","):
        model = resnext.create_model(name).eval()
        for batch in batches:
            x = torch.randn(batch, 3, args.image_size, args.image_size)
            eager = optimize(model, DTYPES[args.dtype], backend="none", example_input=x)
            copying, handing = Recorded(eager, x, donate=False), Recorded(eager, x, donate=True)
            fresh = torch.randn_like(x)
            with torch.no_grad():
                want = eager(fresh)
                for label, run in (("copying", copying), ("handing on", handing)):
                    if not torch.equal(run(fresh), want):
                        raise SystemExit(f"{name} batch {batch}: the {label} replay differs")
                ways = {
                    "replay, copied": (lambda r=copying, x=x: r(x), batch),
                    "replay, handed on": (lambda r=handing, x=x: r(x), batch),
                    "eager fast path": (lambda e=eager, x=x: e(x), batch),
                }
                timings = interleaved(ways, rounds=args.rounds, iters=1, warmup=2)
            copied = timings["replay, copied"].seconds
            row: dict[str, object] = {k: t.median_s * 1e3 for k, t in timings.items()}
            row["donations"] = len(handing.plan.donations)
            row["handed on ÷ copied, time"] = median_ratio(
                timings["replay, handed on"].seconds, copied
            )
            row["eager ÷ copied, time"] = median_ratio(timings["eager fast path"].seconds, copied)
            results[f"{name}/batch{batch}"] = row
            print(
                f"{name} {args.dtype} batch {batch}: "
                + ", ".join(f"{k} {v:.2f} ms" for k, v in row.items() if k in ways)
                + f"; {row['donations']} outputs handed on; handed on ÷ copied ×"
                + f"{row['handed on ÷ copied, time']:.3f}, eager ÷ copied ×"
                + f"{row['eager ÷ copied, time']:.3f} (medians over {args.rounds} rounds)"
            )
    config = {k: str(v) for k, v in vars(args).items()}
    print(f"results: {write_results(args.out, 'bench-replay-donation', config, results)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
