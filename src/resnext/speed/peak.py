"""This machine's measured ceilings: arithmetic peak (fp32 FMA, bf16 dot product) and memory bandwidth.

The arithmetic peak comes from `kernels/peak.c` (independent chains of one vector instruction
per thread); the bandwidth from reading and copying a buffer much larger than the caches. They
are what a speed target is compared with: no convolution can run faster than the first, no
memory-bound pass faster than the second.
"""

from __future__ import annotations

import ctypes
import functools
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from resnext import native
from resnext.speed.capability import has_avx512_bf16

SOURCE = Path(__file__).with_name("kernels") / "peak.c"
FLAGS = ("-O3", "-mavx512f", "-fopenmp")
REQUIRED_FLAGS = frozenset({"avx512f"})
KINDS = {torch.float32: 0, torch.bfloat16: 1}
BANDWIDTH_MB = 512  # well beyond any L3 of this class of machine


@dataclass(frozen=True)
class Peaks:
    """Measured ceilings of this machine with `threads` threads (GFLOP/s, GB/s)."""

    threads: int
    fp32_gflops: float
    bf16_gflops: float | None  # None where the CPU has no AVX512-BF16
    read_gbps: float
    copy_gbps: float  # bytes read plus bytes written, per second

    def as_dict(self) -> dict[str, object]:
        return asdict(self)

    def gflops(self, dtype: torch.dtype) -> float:
        """The arithmetic peak for convolutions in `dtype` (bf16 falls back to fp32 without it)."""
        if dtype == torch.bfloat16 and self.bf16_gflops is not None:
            return self.bf16_gflops
        return self.fp32_gflops


@functools.lru_cache(maxsize=1)
def _library() -> ctypes.CDLL:
    lib = native.load(SOURCE, FLAGS, cpu_needs=REQUIRED_FLAGS)
    lib.peak_run.argtypes = [ctypes.c_int, ctypes.c_long, ctypes.c_int, ctypes.c_void_p]
    lib.peak_run.restype = ctypes.c_double
    return lib


def unavailable_reason(dtype: torch.dtype = torch.float32) -> str | None:
    """None if the peak of `dtype` can be measured here, else why not (one line)."""
    if dtype not in KINDS:
        return f"dtype: expected float32 or bfloat16, got {dtype}"
    if dtype == torch.bfloat16 and not has_avx512_bf16():
        return "this CPU lacks ['avx512_bf16']"
    return native.problem(_library)


def arithmetic_peak(
    dtype: torch.dtype = torch.float32, threads: int | None = None, seconds: float = 0.2
) -> float:
    """GFLOP/s of `threads` threads (default: torch's) doing only FMAs (fp32) or bf16 dot products.

    The best of three runs of about `seconds` each.
    """
    reason = unavailable_reason(dtype)
    if reason is not None:
        raise RuntimeError(f"arithmetic_peak({dtype}): {reason}")
    if seconds <= 0:
        raise ValueError(f"seconds: expected > 0, got {seconds}")
    threads = torch.get_num_threads() if threads is None else threads
    if threads < 1:
        raise ValueError(f"threads: expected >= 1, got {threads}")
    lib, kind, sink = _library(), KINDS[dtype], ctypes.c_double()
    iters = 10_000
    while True:  # grow the run until it is long enough to time
        start = time.perf_counter()
        lib.peak_run(kind, iters, threads, ctypes.byref(sink))
        elapsed = time.perf_counter() - start
        if elapsed >= seconds / 4:
            break
        iters *= 4
    iters = max(1, int(iters * seconds / elapsed))
    best = 0.0
    for _ in range(3):
        start = time.perf_counter()
        flop = lib.peak_run(kind, iters, threads, ctypes.byref(sink))
        best = max(best, flop / (time.perf_counter() - start) / 1e9)
    return best


def memory_bandwidth(megabytes: int = BANDWIDTH_MB, repeats: int = 5) -> tuple[float, float]:
    """(read GB/s, copy GB/s) of torch's threads on a `megabytes` float32 buffer; best of `repeats`.

    Copy counts the bytes read and the bytes written.
    """
    if megabytes < 1 or repeats < 1:
        raise ValueError(f"megabytes and repeats: expected >= 1, got {megabytes}, {repeats}")
    x = torch.ones(megabytes * 2**20 // 4)
    y = torch.empty_like(x)
    nbytes = x.numel() * 4
    read = copy = 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        x.sum()
        read = max(read, nbytes / (time.perf_counter() - start) / 1e9)
        start = time.perf_counter()
        y.copy_(x)
        copy = max(copy, 2 * nbytes / (time.perf_counter() - start) / 1e9)
    return read, copy


def measure_peaks(threads: int | None = None, seconds: float = 0.2) -> Peaks:
    """Every ceiling of this machine, measured now with `threads` threads (default: torch's)."""
    threads = torch.get_num_threads() if threads is None else threads
    bf16 = None
    if unavailable_reason(torch.bfloat16) is None:
        bf16 = arithmetic_peak(torch.bfloat16, threads, seconds)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        read, copy = memory_bandwidth()
    finally:
        torch.set_num_threads(previous)
    return Peaks(threads, arithmetic_peak(torch.float32, threads, seconds), bf16, read, copy)
