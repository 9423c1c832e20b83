"""What this CPU can do fast: native bf16 matrix instructions, the oneDNN (mkldnn) backend, and
whether bf16 is the faster precision here (measured, not read from the flags)."""

from __future__ import annotations

import functools
import platform
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch


def cpu_flags() -> set[str]:
    """The feature flags of the first CPU in /proc/cpuinfo (empty where it cannot be read)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def cpu_model() -> str:
    """The first CPU's model name from /proc/cpuinfo, else the platform's processor string."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


@functools.lru_cache(maxsize=1)
def has_avx512_bf16() -> bool:
    """Whether the CPU has AVX512-BF16 (our C kernels' bf16 dot products); read once per process."""
    return "avx512_bf16" in cpu_flags()


@dataclass(frozen=True)
class CpuCapability:
    """The CPU features that decide which fast path `optimize` takes."""

    mkldnn: bool
    isa: str
    native_bf16: bool
    amx: bool
    threads: int

    def as_dict(self) -> dict[str, object]:
        return {
            "mkldnn": self.mkldnn,
            "isa": self.isa,
            "native_bf16": self.native_bf16,
            "amx": self.amx,
            "threads": self.threads,
        }


def cpu_capability() -> CpuCapability:
    """Probe torch and /proc/cpuinfo for oneDNN, the vector ISA and native bf16 support."""
    flags = cpu_flags()
    mkldnn = bool(torch.backends.mkldnn.is_available())
    bf16_op = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    # oneDNN's own check when it exists, else the ISA flags (AVX512-BF16 or AMX-BF16).
    if mkldnn and bf16_op is not None:
        native_bf16 = bool(bf16_op())
    else:
        native_bf16 = bool({"avx512_bf16", "amx_bf16"} & flags)
    return CpuCapability(
        mkldnn=mkldnn,
        isa=str(torch.backends.cpu.get_cpu_capability()),
        native_bf16=native_bf16,
        amx="amx_bf16" in flags,
        threads=torch.get_num_threads(),
    )


def bf16_supported() -> bool:
    """True when bf16 convolutions run natively (bf16 instructions), not emulated."""
    return cpu_capability().native_bf16


# Near parity float32 wins (exact, no casts); every bf16 CPU measured so far is far from it on
# either side: AMD Zen 4 1.9-2.0×, Xeons with AMX 2-5×, a Xeon with AMX hidden 0.6×.
BF16_MIN_SPEEDUP = 1.2


def conv_speedup(rounds: int = 7) -> float:
    """float32 time ÷ bf16 time of one oneDNN 1×1 convolution (256 → 256 channels, 8 × 28²,
    channels-last, as autocast runs a bottleneck's), median of `rounds` alternated pairs."""
    x = torch.randn(8, 256, 28, 28).contiguous(memory_format=torch.channels_last)
    w = torch.randn(256, 256, 1, 1).contiguous(memory_format=torch.channels_last) / 16
    pairs = {dtype: (w.to(dtype), x.to(dtype)) for dtype in (torch.float32, torch.bfloat16)}

    def once(dtype: torch.dtype) -> float:
        weight, data = pairs[dtype]
        start = time.perf_counter()
        torch.nn.functional.conv2d(data, weight)
        return time.perf_counter() - start

    with torch.no_grad():
        for dtype in pairs:  # oneDNN builds its kernels on the first call
            once(dtype)
            once(dtype)
        ratios = [once(torch.float32) / once(torch.bfloat16) for _ in range(rounds)]
    return statistics.median(ratios)


@functools.lru_cache(maxsize=1)
def bf16_speedup() -> float:
    """How many times faster than float32 bf16 convolutions run here: `conv_speedup()`, measured
    once per process (~10-70 ms); 0.0 without native bf16 (emulated bf16 is several times slower)
    or where the measurement fails (float32 is the safe choice)."""
    if not bf16_supported():
        return 0.0
    try:
        return conv_speedup()
    except RuntimeError:  # oneDNN refusing a bf16 convolution here: not a faster one
        return 0.0


def bf16_faster() -> bool:
    """True where bf16 convolutions run natively and at least `BF16_MIN_SPEEDUP`× float32's speed:
    what the `auto` precision choices ask. Native is not enough: on a Xeon with AVX512-BF16 but no
    AMX, bf16 ran 0.6-0.65× float32's speed (benchmarks/RESULTS.md, stop 53)."""
    return bf16_speedup() >= BF16_MIN_SPEEDUP


def bf16_runs_on(device: torch.device) -> bool:
    """Whether bf16 convolutions run natively on `device` (native bf16 CPU, or a CUDA GPU with it)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and bf16_supported()


def fastest_dtype(device: torch.device) -> torch.dtype:
    """`dtype='auto'`: bf16 where `device` runs it natively and faster than float32 (a CUDA GPU
    with bf16; a CPU where `bf16_faster()` measures it so), else float32."""
    faster = device.type == "cuda" or bf16_faster()
    return torch.bfloat16 if bf16_runs_on(device) and faster else torch.float32


def fastest_precision(device: torch.device) -> str:
    """The fast path's 'auto': 'bf16' where `fastest_dtype` takes bf16; else, on a CPU with the
    float16 1×1 kernel (AVX512-FP16), 'fp16' (float32 with float16 products in the 1×1s, which
    round less than bf16 does); else 'fp32'."""
    if fastest_dtype(device) == torch.bfloat16:
        return "bf16"
    if device.type == "cpu":
        from resnext.speed import pointwise_fp16  # lazily: its kernel is built on first use

        if pointwise_fp16.unavailable_reason() is None:
            return "fp16"
    return "fp32"
