"""The machine-ceiling kernels do the work they count: accumulator sums against a hand simulation."""

from __future__ import annotations

import ctypes
import time

import numpy as np
import pytest
import torch

from resnext.speed import peak
from resnext.speed.peak import Peaks

ACC, LANES = 24, 16  # accumulator chains per thread, float32 lanes per register (peak.c)

needs_kernel = pytest.mark.skipif(
    peak.unavailable_reason() is not None, reason=f"peak kernel: {peak.unavailable_reason()}"
)
needs_bf16 = pytest.mark.skipif(
    peak.unavailable_reason(torch.bfloat16) is not None,
    reason=f"bf16 peak kernel: {peak.unavailable_reason(torch.bfloat16)}",
)


def _run(kind: int, iters: int, threads: int) -> tuple[float, float]:
    sink = ctypes.c_double()
    flop = peak._library().peak_run(kind, iters, threads, ctypes.byref(sink))
    return flop, sink.value


# (kind, accumulator chains, float32 lanes): the AVX-512 and the AVX2 float32 kernels of peak.c
FP32_KINDS = [(0, ACC, LANES), (peak.AVX2_FP32_KIND, 12, 8)]


@needs_kernel
@pytest.mark.parametrize(("kind", "chains", "lanes"), FP32_KINDS, ids=["avx512", "avx2"])
def test_fp32_kernel_does_iters_fmas_on_every_chain(kind: int, chains: int, lanes: int) -> None:
    missing = peak.KIND_NEEDS[kind] - peak.cpu_flags()
    if missing:
        pytest.skip(f"this CPU lacks {sorted(missing)}")
    iters = 1000
    flop, sink = _run(kind, iters, 1)
    assert flop == iters * chains * lanes * 2
    # Chain i starts at i and takes acc*a + b each round, one rounding per FMA (float32).
    acc = np.arange(chains, dtype=np.float64)
    a, b = np.float64(np.float32(0.999999)), np.float64(np.float32(1e-7))
    for _ in range(iters):
        acc = (acc * a + b).astype(np.float32).astype(np.float64)
    assert sink == pytest.approx(lanes * acc.sum(), rel=1e-6)


@needs_bf16
def test_bf16_kernel_adds_two_products_per_lane_per_round() -> None:
    iters = 777
    flop, sink = _run(1, iters, 1)
    assert flop == iters * ACC * LANES * 4
    # 1.0·1.0 + 1.0·1.0 per lane per round: chain i ends at i + 2·iters, exactly.
    assert sink == LANES * sum(i + 2 * iters for i in range(ACC))


needs_amx = pytest.mark.skipif(
    peak.amx_unavailable_reason() is not None,
    reason=f"AMX peak kernel: {peak.amx_unavailable_reason()}",
)


@needs_amx
@pytest.mark.parametrize(
    ("kind", "iters"),
    [(peak.AMX_KIND, 300), (peak.AMX_LOADED_KIND, 250)],
    ids=["register", "loaded"],
)
def test_amx_kernel_adds_32_products_per_output_per_tile_product(kind: int, iters: int) -> None:
    # the register-only loop, and the 2 × 2 blocked one that loads its operand tiles each round
    flop, sink = _run(kind, iters, 1)
    assert flop == iters * 4 * 16 * 16 * 32 * 2  # 4 accumulator tiles of 16 × 16 outputs
    assert sink == 32 * iters  # one output of the last accumulator: 32 ones·ones per product


@needs_amx
def test_loading_operands_does_not_raise_the_tile_rate() -> None:
    # The loaded loop does the register-only loop's products plus loads: at most as fast, best
    # of turns so that one slow moment cannot decide. The margin covers machine B's phases (the
    # register-only rate drops to ~0.75x in a slow one, which can begin between two turns); a
    # FLOP count off by a factor of 2 would still fail.
    register = loaded = 0.0
    for _ in range(3):
        register = max(register, peak.amx_peak(1, seconds=0.03))
        loaded = max(loaded, peak.amx_peak(1, seconds=0.03, loaded=True))
    assert 0 < loaded <= 1.5 * register


@needs_amx
def test_amx_peak_is_not_beaten_by_a_bf16_matrix_product() -> None:
    rate = peak.amx_peak(seconds=0.05)
    a = torch.randn(1024, 1024).to(torch.bfloat16)
    best = float("inf")
    for _ in range(10):
        start = time.perf_counter()
        a @ a
        best = min(best, time.perf_counter() - start)
    mm_rate = 2 * 1024**3 / best / 1e9
    # oneDNN's GEMM uses the same tile instruction: it cannot beat it (margin for clocks), and
    # the instruction is the faster bf16 route, so Peaks.gflops must report it.
    assert mm_rate <= 1.25 * rate
    peaks = Peaks(1, 100.0, 200.0, 1.0, 1.0, rate)
    assert peaks.gflops(torch.bfloat16) == max(200.0, rate)


@needs_kernel
def test_flop_count_follows_the_threads_that_ran() -> None:
    kind = peak._kind(torch.float32)  # this CPU's float32 kernel
    flop1, sink1 = _run(kind, 100, 1)
    flop2, sink2 = _run(kind, 100, 2)
    ran = round(flop2 / flop1)
    assert ran in (1, 2)  # OpenMP may grant fewer threads than asked
    assert sink2 == pytest.approx(ran * sink1)


@needs_kernel
def test_peak_is_positive_and_not_beaten_by_a_dense_convolution() -> None:
    x = torch.randn(8, 256, 28, 28).contiguous(memory_format=torch.channels_last)
    w = torch.randn(256, 256, 1, 1).contiguous(memory_format=torch.channels_last)
    best, peak_fp32 = float("inf"), 0.0
    # Both the best of several tries, taken in turns: a slow moment of a shared machine during
    # one peak measurement must not pass for the instruction's rate.
    for _ in range(4):
        peak_fp32 = max(peak_fp32, peak.arithmetic_peak(torch.float32, seconds=0.05))
        for _ in range(3):
            start = time.perf_counter()
            torch.nn.functional.conv2d(x, w)
            best = min(best, time.perf_counter() - start)
    assert peak_fp32 > 0
    conv_rate = 2 * 8 * 28 * 28 * 256 * 256 / best / 1e9
    # No real kernel runs faster than the instruction peak (margin for clock changes).
    assert conv_rate <= 1.25 * peak_fp32


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"seconds": 0.0}, "seconds"), ({"threads": 0}, "threads")],
)
@needs_kernel
def test_arithmetic_peak_rejects_bad_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        peak.arithmetic_peak(torch.float32, **kwargs)


def test_unsupported_dtype_is_named() -> None:
    assert "float16" in (peak.unavailable_reason(torch.float16) or "")
    with pytest.raises(RuntimeError, match="float16"):
        peak.arithmetic_peak(torch.float16)


def test_memory_bandwidth_rejects_bad_sizes_and_measures_both() -> None:
    with pytest.raises(ValueError, match="megabytes"):
        peak.memory_bandwidth(0)
    read, copy = peak.memory_bandwidth(8, repeats=2)
    assert read > 0 and copy > 0


def test_bf16_ceiling_falls_back_to_fp32_without_bf16() -> None:
    with_bf16 = Peaks(2, 500.0, 1000.0, 40.0, 40.0)
    without = Peaks(2, 500.0, None, 40.0, 40.0)
    assert with_bf16.gflops(torch.bfloat16) == 1000.0
    assert without.gflops(torch.bfloat16) == 500.0
    assert with_bf16.gflops(torch.float32) == 500.0
