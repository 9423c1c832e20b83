"""The ImageNet stem (7×7/2 conv, ReLU, 3×3/2 max pooling) in one kernel against apart, ResNeXt-50.

Usage: .venv/bin/python benchmarks/bench_stem.py [--batches 1,16] [--repeats 20]
       [--dtypes bf16,fp32]
For each dtype and batch, ResNeXt-50's folded stem (random weights, 224² inputs, channels_last)
is timed in turns, `--repeats` calls each (best call kept), in these ways:
  - onednn+pool: oneDNN's convolution with the weight prepacked and the ReLU fused (as the
    frozen compiled graph runs it), then the pooling compiled by inductor (as the graph runs it);
  - x3+pool (float32): our bf16×3 convolution (`conv_x3`) with the ReLU, then the same pooling;
  - fused: the three in one kernel, `resnext.speed.stem` on AMX or else (bf16)
    `resnext.speed.stem_dot` on AVX512-BF16 (`stem_fusion.backend_for`), on the same input (the
    model's dtype, channels_last), and on the float32 NCHW image the network hands it (no cast
    before it);
  - onednn alone: the convolution without the pooling, for scale.
Then the whole network: one `optimize(..., backend="none", fuse_stem="on")` build, and a copy of
it whose stem is put back apart (the folded conv1, the ReLU and nn.MaxPool2d), each compiled
with inductor (frozen, C++ wrapper) and timed in turns: every other kernel choice is the same in
both, so the difference is the stem's alone (separate `optimize` builds time their choices
anew, and those differ by more than the stem's share). A dtype without a fused stem kernel on
this CPU (float32 without AMX) is skipped with the reason.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

import bench_args
import resnext
from resnext.speed import conv_x3, stem, stem_dot
from resnext.speed.allocator import keep_freed_memory
from resnext.speed.conv_x3_swap import ConvX3
from resnext.speed.fastpath import FrozenInductor, optimize
from resnext.speed.fold import fold_batchnorm
from resnext.speed.grouped_swap import time_each_ms
from resnext.speed.pointwise_fusion import onednn_conv
from resnext.speed.provenance import write_results
from resnext.speed.stem_fusion import backend_for


class _Pool(nn.Module):
    """The stem's max pooling, to be compiled as the graph compiles it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.max_pool2d(x, *stem.POOL)


def _ways(conv: nn.Conv2d, x: torch.Tensor, backend: str) -> dict[str, object]:
    onednn = onednn_conv(conv, list(x.shape), relu=True)

    pool = FrozenInductor(_Pool(), cpp_wrapper=True)
    with torch.no_grad():
        pool(onednn(x))  # compile for this shape first
    ways: dict[str, object] = {"onednn+pool": lambda x: pool(onednn(x))}
    if x.dtype == torch.float32 and conv_x3.unavailable_reason() is None:
        x3 = ConvX3(conv, relu=True)
        ways["x3+pool"] = lambda x: pool(x3(x))
    fused_bias = conv.bias.detach().float()
    k, s, p = conv.kernel_size[0], conv.stride[0], conv.padding[0]
    # the network hands the fused stem the caller's float32 NCHW image, without a cast first
    image = x.float().contiguous()
    if backend == "dot":
        packed = stem_dot.pack(conv.weight)
        ways["fused"] = lambda x: stem_dot.run(x, packed, fused_bias, k, s, p)
        ways["fused, float32 NCHW image"] = lambda x: stem_dot.run(
            image, packed, fused_bias, k, s, p
        )
    else:
        fused = stem.pack(conv.weight)
        bf16 = x.dtype == torch.bfloat16
        ways["fused"] = lambda x: stem.run(x, fused, fused_bias, k, s, p)
        ways["fused, float32 NCHW image"] = lambda x: stem.run(
            image, fused, fused_bias, k, s, p, bf16
        )
    ways["onednn alone"] = onednn
    return ways


def _whole(model: nn.Module, dtype: str, batch: int, repeats: int) -> dict[str, float]:
    """ResNeXt-50 compiled with the stem fused and with it apart, all else the same (ms)."""
    x = torch.randn(batch, 3, 224, 224)
    fused = optimize(model, dtype, backend="none", example_input=x, fuse_stem="on")
    apart = copy.deepcopy(fused)
    plain = fold_batchnorm(model).to(
        dtype=apart.dtype, memory_format=torch.channels_last
    )  # the stem as the model has it, BN folded
    apart.model.conv1, apart.model.bn1, apart.model.maxpool = (
        plain.conv1,
        nn.Identity(),
        plain.maxpool,
    )
    runs = [FrozenInductor(m, cpp_wrapper=True) for m in (apart, fused)]
    with torch.no_grad():
        for run in runs:
            run(x)
    times = time_each_ms(runs, x, repeats)
    return {"apart": times[0], "fused": times[1]}


def main() -> int:
    parser = bench_args.parser(__doc__, dtypes="bf16,fp32")
    parser.add_argument("--batches", type=bench_args.int_list, default="1,16")
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    dtypes = {"bf16": torch.bfloat16, "fp32": torch.float32}
    wanted = args.dtypes.split(",")
    if unknown := [d for d in wanted if d not in dtypes]:
        parser.error(f"--dtypes: expected names from {sorted(dtypes)}, got {unknown}")
    keep_freed_memory()  # as `resnext bench` runs: no page faults on each new output
    torch.manual_seed(0)
    model = resnext.create_model("resnext50_32x4d").eval()
    folded = fold_batchnorm(model)
    results: dict[str, object] = {}
    for name in wanted:
        backend, reason = backend_for(dtypes[name])
        if backend is None:
            print(f"{name}: skipped, no fused stem kernel runs here ({reason})")
            continue
        conv = copy.deepcopy(folded.conv1).to(dtypes[name])
        for batch in args.batches:
            x = torch.randn(batch, 3, 224, 224, dtype=dtypes[name])
            x = x.contiguous(memory_format=torch.channels_last)
            ways = _ways(conv, x, backend)
            times = time_each_ms(list(ways.values()), x, args.repeats)
            row = dict(zip(ways, times, strict=True))
            results[f"{name}/batch{batch}"] = {**row, "backend": backend}
            apart = min(v for k, v in row.items() if k.endswith("+pool"))
            print(
                f"{name} batch {batch}: "
                + ", ".join(f"{k} {v:.3f} ms" for k, v in row.items())
                + f"; fused ÷ fastest apart ×{row['fused'] / apart:.3f}"
            )
        for batch in args.batches:
            row = _whole(model, name, batch, max(5, args.repeats // 2))
            results[f"{name}/batch{batch}/resnext50_32x4d"] = row
            print(
                f"{name} batch {batch} ResNeXt-50 compiled: stem apart {row['apart']:.2f} ms, "
                f"fused {row['fused']:.2f} ms (×{row['fused'] / row['apart']:.3f})"
            )
    config = {k: str(v) for k, v in vars(args).items()}
    print(f"results: {write_results(args.out, 'bench-stem', config, results)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
