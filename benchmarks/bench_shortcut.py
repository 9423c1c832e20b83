"""Projection shortcuts computed in their block's last 1×1 against computed apart, ResNeXt-50.

Usage: .venv/bin/python benchmarks/bench_shortcut.py [--batch 16] [--repeats 15]
       [--dtypes bf16,fp32]
For each dtype, ResNeXt-50 (random weights) goes through `optimize`'s passes up to the shortcut
pass with every fusion forced on (bf16: the AMX grouped kernel, the first 1×1 and the rest of
each block fused; float32: every dense convolution on the bf16×3 kernel). The shortcut pass then
times each of the four projection blocks both ways, in turns, `--repeats` calls each (best call
kept): apart (bf16: oneDNN's prepacked projection, then the block kernel writing over it;
float32: our projection, then the last 1×1 adding it in place) and as one call
(`block_amx_shortcut`, `conv_x3_shortcut`). Needs a CPU with AMX.
"""

from __future__ import annotations

from dataclasses import asdict

import torch

import bench_args
import resnext
from resnext.speed import conv_x3, grouped_amx
from resnext.speed.allocator import keep_freed_memory
from resnext.speed.block_fusion import fuse_blocks
from resnext.speed.conv_x3_swap import swap_convs_x3
from resnext.speed.fold import fold_batchnorm
from resnext.speed.grouped_swap import LayerChoice, swap_grouped_convs
from resnext.speed.pointwise_fusion import fuse_pointwise_convs
from resnext.speed.provenance import write_results
from resnext.speed.shortcut_fusion import fuse_shortcuts, fuse_x3_shortcuts


def _choices(dtype: torch.dtype, batch: int, repeats: int) -> list[LayerChoice]:
    torch.manual_seed(0)
    model = fold_batchnorm(resnext.create_model("resnext50_32x4d").eval())
    model = model.to(dtype=dtype, memory_format=torch.channels_last)
    x = torch.randn(batch, 3, 224, 224, dtype=dtype).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        if dtype == torch.bfloat16:
            swap_grouped_convs(model, x, mode="on")
            fuse_pointwise_convs(model, x, mode="on")
            fuse_blocks(model, x, mode="on")
            return fuse_shortcuts(model, x, mode="on", repeats=repeats)
        swap_convs_x3(model, x, mode="on")
        return fuse_x3_shortcuts(model, x, mode="on", repeats=repeats)


def main() -> int:
    parser = bench_args.parser(__doc__, batch=16, dtypes="bf16,fp32")
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    dtypes = {"bf16": torch.bfloat16, "fp32": torch.float32}
    wanted = args.dtypes.split(",")
    if unknown := [d for d in wanted if d not in dtypes]:
        parser.error(f"--dtypes: expected names from {sorted(dtypes)}, got {unknown}")
    reason = grouped_amx.unavailable_reason() or conv_x3.unavailable_reason()
    if reason is not None:
        print(f"skipped: the AMX kernels cannot run here ({reason})")
        return 0
    keep_freed_memory()  # as `resnext bench` runs: no page faults on each new output
    results: dict[str, object] = {}
    for name in wanted:
        choices = _choices(dtypes[name], args.batch, args.repeats)
        results[name] = [asdict(c) for c in choices]
        for c in choices:
            ratio = c.kernel_ms / c.native_ms
            print(
                f"{name} {c.name} {c.input_shape}: apart {c.native_ms:.3f} ms, one call "
                f"{c.kernel_ms:.3f} ms (×{ratio:.3f})"
            )
    config = {k: str(v) for k, v in vars(args).items()}
    print(f"results: {write_results(args.out, 'bench-shortcut', config, results)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
