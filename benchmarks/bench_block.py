"""The AMX block kernel against oneDNN's last 1×1, per ResNeXt-50 block shape, and the cost of a call.

Usage: .venv/bin/python benchmarks/bench_block.py [--batch 16] [--rounds 9]
Per stage (an identity block, and the stride-2 first block of stages 2-4), interleaved: the
fused first 1×1 + grouped kernel followed by oneDNN's 1×1 with the add and ReLU writing a new
output or over the residual (as the compiled graph runs it), and the block kernel writing a new
output or over the residual, in the block-diagonal form and (4 or 8 channels per group at
stride 1: stages 1-2) in the quads form. Then, on a 1×64×4² block, the time of one call: the C function
alone, through `run_block_kernel`'s checks, and through each operator. Needs a CPU with AMX.
"""

from __future__ import annotations

import time

import torch

import bench_args
from resnext.speed import grouped_amx, grouped_quads
from resnext.speed.measure import interleaved
from resnext.speed.prepacked import onednn_weights
from resnext.speed.provenance import write_results

# (input channels, width, output channels, input size, stride) of ResNeXt-50 32×4d blocks
BLOCKS = [
    (256, 128, 256, 56, 1),
    (512, 256, 512, 28, 1),
    (1024, 512, 1024, 14, 1),
    (2048, 1024, 2048, 7, 1),
    (256, 256, 512, 56, 2),
    (512, 512, 1024, 28, 2),
    (1024, 1024, 2048, 14, 2),
]
GROUPS = 32


def _nhwc(*shape: int) -> torch.Tensor:
    return (torch.randn(*shape) * 0.1).bfloat16().contiguous(memory_format=torch.channels_last)


def block_variants(cin: int, c: int, cout: int, size: int, stride: int, batch: int) -> dict:
    """The four ways of computing one block, as calls for `interleaved`."""
    x = _nhwc(batch, cin, size, size)
    out = (size - 1) // stride + 1
    identity = cin == cout and stride == 1
    w1 = grouped_amx.pack_pointwise(torch.randn(c, cin, 1, 1) * 0.01)
    b1 = torch.randn(c) * 0.1
    w2 = torch.randn(c, c // GROUPS, 3, 3) * 0.01
    packed = grouped_amx.pack_weights(w2, GROUPS)
    b2 = torch.randn(c) * 0.1
    w3 = torch.randn(cout, c, 1, 1) * 0.01
    tail, b3 = grouped_amx.pack_pointwise(w3), torch.randn(cout) * 0.1
    conv3 = torch.nn.Conv2d(c, cout, 1)
    conv3.weight.data, conv3.bias.data = w3, b3
    _, b3_bf16, onednn = onednn_weights(conv3)  # as the compiled graph hands it to oneDNN
    # overwritten in place by the in-place ways: values drift, only the time counts
    residual = x if identity else _nhwc(batch, cout, out, out)

    def head() -> torch.Tensor:
        return grouped_amx.run_pointwise_kernel(x, w1, b1, packed, b2, GROUPS, stride, True)

    geometry = ([0, 0], [1, 1], [1, 1], 1)  # padding, stride, dilation, groups

    def onednn_new() -> object:
        return torch.ops.mkldnn._convolution_pointwise.binary(
            head(), residual, onednn, b3_bf16, *geometry, "add", None, "relu", [None], ""
        )

    def onednn_in_place() -> object:
        return torch.ops.mkldnn._convolution_pointwise_.binary(
            residual, head(), onednn, b3_bf16, *geometry, "add", 1.0, "relu", [None], ""
        )

    def fused(in_place: bool, quads: bool = False):
        weight = grouped_quads.pack_weights(w2, GROUPS) if quads else packed
        return lambda: grouped_amx.run_block_kernel(
            x, weight, b2, GROUPS, stride, tail, b3, residual, w1, b1, quads, in_place
        )

    ways = {
        "onednn 1x1, new output": (onednn_new, batch),
        "onednn 1x1, in place": (onednn_in_place, batch),
        "block kernel, new output": (fused(False), batch),
        "block kernel, in place": (fused(True), batch),
    }
    if grouped_quads.unavailable_reason() is None and grouped_quads.supports(c, GROUPS, stride):
        ways["block kernel quads, new output"] = (fused(False, True), batch)
        ways["block kernel quads, in place"] = (fused(True, True), batch)
    return ways


def call_overhead(calls: int) -> dict[str, float]:
    """µs per call on a 1×64×4² block: the C function, run_block_kernel, each operator."""
    x = _nhwc(1, 64, 4, 4)
    w1, b1 = grouped_amx.pack_pointwise(torch.randn(64, 64, 1, 1)), torch.randn(64)
    packed, b2 = grouped_amx.pack_weights(torch.randn(64, 4, 3, 3), 16), torch.randn(64)
    tail, b3 = grouped_amx.pack_pointwise(torch.randn(64, 64, 1, 1)), torch.randn(64)
    residual = x.clone()
    lib = grouped_amx._library()
    args = (packed, b2, 16, 1, tail, b3, residual, w1, b1)
    pointers = [t.data_ptr() for t in (x, w1, b1, packed, b2, tail, b3, residual, residual)]
    shape = (1, 4, 4, 64, 64, 64, 4, 1, torch.get_num_threads())  # N H W Cin C Cout cpg s threads
    ways = {
        "C function": lambda: lib.block_amx(*pointers, *shape),
        "run_block_kernel": lambda: grouped_amx.run_block_kernel(x, *args, in_place=True),
        "operator block_amx": lambda: torch.ops.resnext.block_amx(x, *args),
        "operator block_amx_": lambda: torch.ops.resnext.block_amx_(x, *args),
    }
    result = {}
    with torch.no_grad():
        for name, fn in ways.items():
            for _ in range(50):
                fn()
            start = time.perf_counter()
            for _ in range(calls):
                fn()
            result[name] = (time.perf_counter() - start) / calls * 1e6
    return result


def main() -> int:
    parser = bench_args.parser(__doc__, batch=16, rounds=9)
    parser.add_argument("--calls", type=int, default=2000)
    args = parser.parse_args()
    reason = grouped_amx.unavailable_reason()
    if reason is not None:
        print(f"skipped: the AMX kernel cannot run here ({reason})")
        return 0
    results: dict[str, object] = {"blocks": {}}
    with torch.no_grad():
        for cin, c, cout, size, stride in BLOCKS:
            key = f"{cin}->{c}->{cout} {size}x{size} stride {stride}"
            variants = block_variants(cin, c, cout, size, stride, args.batch)
            timings = interleaved(variants, rounds=args.rounds, iters=3)
            results["blocks"][key] = {name: t.as_dict() for name, t in timings.items()}
            cells = "  ".join(f"{name} {1e3 * t.median_s:.2f} ms" for name, t in timings.items())
            print(f"{key}: {cells}")
    results["call_us"] = call_overhead(args.calls)
    print("µs per call:", {k: round(v, 1) for k, v in results["call_us"].items()})
    config = {k: str(v) for k, v in vars(args).items()}
    print(f"results: {write_results(args.out, 'bench-block', config, results)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
