"""Benchmark script: `resnext bench train` (same options; see --help). Writes benchmarks/results/."""

from __future__ import annotations

import sys

from resnext.commands.bench_cmd import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
