"""What this CPU can do fast: native bf16 matrix instructions, the oneDNN (mkldnn) backend."""

from __future__ import annotations

import functools
import platform
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
    """True when bf16 convolutions run natively (faster than fp32), not emulated."""
    return cpu_capability().native_bf16
