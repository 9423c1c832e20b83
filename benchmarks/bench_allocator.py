"""glibc malloc as is vs told to keep freed memory (keep_freed_memory), on a CIFAR training step.

    python benchmarks/bench_allocator.py [--model resnext29_4x16d] [--batch 128] [--rounds 3]

Each measurement is a fresh process (mallopt settings cannot be undone), alternating the two
allocator settings round by round so that machine noise hits both alike; medians and their ratio
are printed and written to benchmarks/results/allocator-<time>.json with provenance.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

import bench_args
from resnext.speed.provenance import write_results

HERE = Path(__file__).resolve().parent

CHILD = r"""
import json, sys, time
import torch
from torch import nn
import resnext
from resnext.speed.allocator import keep_freed_memory
name, batch, dtype, cl, keep = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4] == "1", sys.argv[5] == "1"
if keep:
    assert keep_freed_memory()
torch.manual_seed(0)
model = resnext.create_model(name, num_classes=10)
fmt = torch.channels_last if cl else torch.contiguous_format
model = model.to(memory_format=fmt)
opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True)
x = torch.randn(batch, 3, 32, 32).contiguous(memory_format=fmt)
y = torch.randint(0, 10, (batch,))
def step():
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16"):
        loss = nn.functional.cross_entropy(model(x), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
for _ in range(3):
    step()
t = time.perf_counter()
for _ in range(6):
    step()
print(json.dumps({"img_per_s": 6 * batch / (time.perf_counter() - t)}))
"""


def measure(model: str, batch: int, dtype: str, cl: bool, keep: bool) -> float:
    args = [model, str(batch), dtype, "1" if cl else "0", "1" if keep else "0"]
    out = subprocess.run(
        [sys.executable, "-c", CHILD, *args], capture_output=True, text=True, check=True
    ).stdout
    return float(json.loads(out.strip().splitlines()[-1])["img_per_s"])


def main(argv: list[str] | None = None) -> int:
    parser = bench_args.parser(__doc__, batch=128, rounds=3)
    parser.add_argument("--model", default="resnext29_4x16d")
    args = parser.parse_args(argv)
    settings = [("fp32", False), ("fp32", True), ("bf16", True)]
    results = {}
    for dtype, cl in settings:
        key = f"{dtype}-{'channels_last' if cl else 'nchw'}"
        plain, kept = [], []
        for _ in range(args.rounds):
            plain.append(measure(args.model, args.batch, dtype, cl, keep=False))
            kept.append(measure(args.model, args.batch, dtype, cl, keep=True))
        results[key] = {
            "glibc_img_per_s": statistics.median(plain),
            "kept_img_per_s": statistics.median(kept),
            "ratio": statistics.median(kept) / statistics.median(plain),
            "glibc_all": plain,
            "kept_all": kept,
        }
        r = results[key]
        print(
            f"| {key} | {r['glibc_img_per_s']:.1f} | {r['kept_img_per_s']:.1f} | "
            f"{r['ratio']:.2f}x |",
            flush=True,
        )
    path = write_results(Path(args.out), "allocator", vars(args), results)
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
