"""This machine's measured ceilings: arithmetic peak (fp32 FMA on AVX-512 or AVX2, bf16 dot
product, AMX bf16 tile product) and memory bandwidth.

The arithmetic peak comes from `kernels/peak.c` (independent chains of one vector or tile
instruction per thread; for AMX also with its operand tiles loaded each round, as a matrix
product loads them); the bandwidth from reading and copying a buffer much larger than the
caches. They are what a speed target is compared with: no convolution can run faster than the
first, no memory-bound pass faster than the second.
"""

from __future__ import annotations

import ctypes
import functools
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from resnext import native
from resnext.speed.capability import cpu_flags, has_avx512_bf16

SOURCE = Path(__file__).with_name("kernels") / "peak.c"
FLAGS = ("-O3", "-fopenmp")  # each function of the source names the ISA it needs
KINDS = {torch.float32: 0, torch.bfloat16: 1}
AMX_KIND = 2  # peak_run's kind for AMX bf16 tile products
AVX2_FP32_KIND = 3  # float32 FMAs on 256-bit registers, for CPUs without AVX-512
AMX_LOADED_KIND = 4  # AMX bf16 tile products, their operand tiles loaded from L1 each round
# The CPU flags each of peak_run's kinds needs.
KIND_NEEDS = {
    0: frozenset({"avx512f"}),
    1: frozenset({"avx512f", "avx512_bf16"}),
    AMX_KIND: frozenset({"amx_tile", "amx_bf16"}),
    AVX2_FP32_KIND: frozenset({"avx2", "fma"}),
    AMX_LOADED_KIND: frozenset({"amx_tile", "amx_bf16"}),
}
BANDWIDTH_MB = 512  # well beyond any L3 of this class of machine


@dataclass(frozen=True)
class Peaks:
    """Measured ceilings of this machine with `threads` threads (GFLOP/s, GB/s)."""

    threads: int
    fp32_gflops: float
    bf16_gflops: float | None  # None where the CPU has no AVX512-BF16
    read_gbps: float
    copy_gbps: float  # bytes read plus bytes written, per second
    amx_bf16_gflops: float | None = None  # None where the CPU has no AMX-BF16 (or it is refused)
    # The same with a 1 KB operand tile loaded per tile product (2 x 2 blocking from L1): what a
    # kernel streaming its operands can reach; None as above.
    amx_bf16_loaded_gflops: float | None = None

    def as_dict(self) -> dict[str, object]:
        return asdict(self)

    def gflops(self, dtype: torch.dtype) -> float:
        """The arithmetic peak for convolutions in `dtype`: bf16 the faster of AVX512-BF16 and AMX
        (oneDNN uses AMX where the CPU has it), falling back to fp32 without either."""
        if dtype == torch.bfloat16:
            rates = [r for r in (self.bf16_gflops, self.amx_bf16_gflops) if r is not None]
            if rates:
                return max(rates)
        return self.fp32_gflops


@functools.lru_cache(maxsize=1)
def _library() -> ctypes.CDLL:
    lib = native.load(SOURCE, FLAGS)
    lib.peak_run.argtypes = [ctypes.c_int, ctypes.c_long, ctypes.c_int, ctypes.c_void_p]
    lib.peak_run.restype = ctypes.c_double
    return lib


def _kind(dtype: torch.dtype) -> int:
    """peak_run's kind for `dtype` on this CPU: float32 on AVX-512 where it has it, else AVX2."""
    if dtype == torch.float32 and not KIND_NEEDS[0] <= cpu_flags():
        return AVX2_FP32_KIND
    return KINDS[dtype]


def unavailable_reason(dtype: torch.dtype = torch.float32) -> str | None:
    """None if the peak of `dtype` can be measured here, else why not (one line)."""
    if dtype not in KINDS:
        return f"dtype: expected float32 or bfloat16, got {dtype}"
    if dtype == torch.bfloat16 and not has_avx512_bf16():
        return "this CPU lacks ['avx512_bf16']"
    missing = KIND_NEEDS[_kind(dtype)] - cpu_flags()
    if missing:
        return f"this CPU lacks {sorted(missing)}"
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
    return _timed_peak(_kind(dtype), threads, seconds)


def amx_unavailable_reason() -> str | None:
    """None if the AMX bf16 peak can be measured here, else why not (one line)."""
    missing = KIND_NEEDS[AMX_KIND] - cpu_flags()
    if missing:
        return f"this CPU lacks {sorted(missing)}"
    return native.problem(_library)


def amx_peak(threads: int | None = None, seconds: float = 0.2, *, loaded: bool = False) -> float:
    """GFLOP/s of `threads` threads doing only AMX bf16 tile products (TDPBF16PS); best of three.
    With `loaded`, each product also loads one operand tile from L1, as a matrix product's 2 × 2
    blocked inner loop does."""
    reason = amx_unavailable_reason()
    if reason is not None:
        raise RuntimeError(f"amx_peak: {reason}")
    return _timed_peak(AMX_LOADED_KIND if loaded else AMX_KIND, threads, seconds)


def _timed_peak(kind: int, threads: int | None, seconds: float) -> float:
    """GFLOP/s of peak_run's `kind` on `threads` threads (default: torch's), best of three."""
    if seconds <= 0:
        raise ValueError(f"seconds: expected > 0, got {seconds}")
    threads = torch.get_num_threads() if threads is None else threads
    if threads < 1:
        raise ValueError(f"threads: expected >= 1, got {threads}")
    lib, sink = _library(), ctypes.c_double()
    # a tile product is 512 vector FMAs' work
    iters = 100 if kind in (AMX_KIND, AMX_LOADED_KIND) else 10_000
    while True:  # grow the run until it is long enough to time
        start = time.perf_counter()
        if lib.peak_run(kind, iters, threads, ctypes.byref(sink)) < 0:
            raise RuntimeError("the kernel refused the AMX tile state (arch_prctl failed)")
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
    amx = loaded = None
    if amx_unavailable_reason() is None:
        try:
            amx = amx_peak(threads, seconds)
            loaded = amx_peak(threads, seconds, loaded=True)
        except RuntimeError:
            amx = loaded = None  # the kernel refused the tile state: report none
    fp32 = arithmetic_peak(torch.float32, threads, seconds)
    return Peaks(threads, fp32, bf16, read, copy, amx, loaded)
