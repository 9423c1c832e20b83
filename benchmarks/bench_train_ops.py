"""A training step operator by operator, against this machine's measured arithmetic and memory ceilings.

Usage: .venv/bin/python benchmarks/bench_train_ops.py [--models resnext50_32x4d,resnet50]
       [--variant cl-bf16-fused-grouped-gemm-pool] [--batch 16] [--image-size 224] [--steps 3]
       [--warmup 4] [--top 25]
First the machine's ceilings are measured (`resnext.speed.peak`: fp32 FMA, bf16 dot-product and,
where the CPU has AMX, bf16 tile-product GFLOP/s, also with the operand tiles loaded; memory
read and copy GB/s). Then each model's step (one of `resnext bench train`'s
variants) is timed plainly and then operator by operator (`resnext.speed.step_ops`: a wall-clock
dispatch-mode timer, the project's C kernels as spans, FLOPs by torch's formulas). Per kind of
work it reports the measured ms per step, the GFLOP and the least bytes moved, and the ms it
would take at the machine's ceiling: compute kinds at the arithmetic peak, the rest at the copy
bandwidth. Their sum is the fastest step this machine could run with these operators.
"""

from __future__ import annotations

import bench_args
from resnext.speed.allocator import keep_freed_memory
from resnext.speed.peak import measure_peaks
from resnext.speed.provenance import write_results
from resnext.speed.step_ops import KINDS, by_kind, measure_step_ops, roofline


def main() -> int:
    parser = bench_args.parser(__doc__, models="resnext50_32x4d,resnet50", batch=16, image_size=224)
    parser.add_argument("--variant", default="cl-bf16-fused-grouped-gemm-pool")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--top", type=int, default=25, help="slowest operators kept per model")
    args = parser.parse_args()
    keep_freed_memory()  # as the CLI does: otherwise every step page-faults its activations
    peaks = measure_peaks()
    print(
        f"ceilings ({peaks.threads} threads): fp32 {peaks.fp32_gflops:.0f} GFLOP/s, bf16 "
        f"{peaks.bf16_gflops or 0:.0f} GFLOP/s, AMX bf16 {peaks.amx_bf16_gflops or 0:.0f} "
        f"GFLOP/s ({peaks.amx_bf16_loaded_gflops or 0:.0f} loading its operands), read "
        f"{peaks.read_gbps:.1f} GB/s, copy "
        f"{peaks.copy_gbps:.1f} GB/s",
        flush=True,
    )
    results: dict[str, object] = {"peaks": peaks.as_dict(), "models": {}}
    for name in args.models.split(","):
        step = measure_step_ops(
            name, args.variant, args.batch, args.image_size, args.steps, args.warmup
        )
        kinds = by_kind(step, peaks)
        summary = roofline(step, kinds)
        results["models"][name] = {
            "summary": summary,
            "kinds": kinds,
            "slowest_ops": step.rows()[: args.top],
        }
        print(
            f"\n{name} ({args.variant}, batch {args.batch}): step {summary['plain_step_ms']:.1f} "
            f"ms ({summary['plain_img_per_s']:.1f} img/s); with the timer "
            f"{summary['timed_step_ms']:.1f}, operators sum to {summary['sum_of_ops_ms']:.1f}"
        )
        print(
            f"  {'kind':26s} {'ms':>7s} {'GFLOP':>7s} {'MB':>7s} {'ceiling ms':>10s} {'rate':>12s}"
        )
        for kind in KINDS:
            row = kinds[kind]
            if row["ms"] == 0:
                continue
            rate = (
                f"{1e3 * row['gflop'] / row['ms']:.0f} GFLOP/s"
                if row["gflop"]
                else f"{row['mb'] / row['ms']:.1f} GB/s"
            )
            print(
                f"  {kind:26s} {row['ms']:7.1f} {row['gflop']:7.1f} {row['mb']:7.0f} "
                f"{row['ceiling_ms']:10.1f} {rate:>12s}"
            )
        print(
            f"  convolutions at the arithmetic peak, the rest as measured: "
            f"{summary['compute_at_peak_rest_as_measured_ms']:.1f} ms "
            f"({summary['compute_at_peak_rest_as_measured_img_per_s']:.1f} img/s); everything at "
            f"its ceiling: {summary['ceiling_ms']:.1f} ms ({summary['ceiling_img_per_s']:.1f} img/s)",
            flush=True,
        )
    config = vars(args)
    path = write_results(args.out, "bench-train-ops", config, results)
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
