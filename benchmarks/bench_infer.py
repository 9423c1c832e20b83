"""Benchmark script: `resnext bench infer` (same options; see --help). Writes benchmarks/results/."""

from __future__ import annotations

import sys

from resnext.commands.bench_cmd import main

if __name__ == "__main__":
    sys.exit(main(["infer", *sys.argv[1:]]))
