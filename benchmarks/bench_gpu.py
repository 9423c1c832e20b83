"""Benchmark script: `resnext bench gpu` (same options; see --help). Writes benchmarks/results/.

ResNeXt-50 and ResNet-50 inference and training on one CUDA device, ours against timm's (and
torchvision's when asked), bf16 and channels_last, after checking the peers compute our function.
"""

from __future__ import annotations

import sys

from resnext.commands.bench_cmd import main

if __name__ == "__main__":
    sys.exit(main(["gpu", *sys.argv[1:]]))
