"""Timing on a noisy shared machine: interleaved rounds over variants, medians and ratios."""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from resnext.errors import ConfigError
from resnext.speed.capability import bf16_supported


@dataclass
class Timing:
    """Per-round seconds per call of one variant, with the batch size it processed."""

    batch: int
    seconds: list[float] = field(default_factory=list)
    # the machine's rate (GFLOP/s) measured at the start of each round, where `interleaved` had a
    # probe: on a shared machine whose speed moves by 2× within minutes, it tells which rounds
    # ran in a slow phase
    probe_gflops: list[float] = field(default_factory=list)

    @property
    def median_s(self) -> float:
        return statistics.median(self.seconds)

    @property
    def throughput(self) -> float:
        """Items per second at the median round."""
        return self.batch / self.median_s

    def as_dict(self) -> dict[str, object]:
        return {
            "batch": self.batch,
            "median_ms": 1e3 * self.median_s,
            "min_ms": 1e3 * min(self.seconds),
            "max_ms": 1e3 * max(self.seconds),
            "throughput": self.throughput,
            "rounds_ms": [1e3 * s for s in self.seconds],
            **({"probe_gflops": list(self.probe_gflops)} if self.probe_gflops else {}),
        }


def time_call(fn: Callable[[], object], iters: int) -> float:
    """Mean seconds per call of `fn` over `iters` back-to-back calls."""
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - start) / iters


def interleaved(
    variants: Mapping[str, tuple[Callable[[], object], int]],
    *,
    rounds: int,
    iters: int,
    warmup: int = 1,
    before: Callable[[], object] | None = None,
    probe: Callable[[], float] | None = None,
) -> dict[str, Timing]:
    """Time each variant (a call and the batch it processes) in alternating rounds.

    Rounds alternate between variants so that a burst of load from other processes hits all of
    them alike; the median over rounds is then robust to the bursts. Each round starts one
    variant further on, and every other n rounds (n variants) go through them in reverse, so that
    with up to three variants each follows each other equally often: in a fixed order the last of
    three identical fused batch norms ran 7 % faster than the second (A/A run of
    `benchmarks/bench_fused_bn.py`, after torch's batch norm had run first), and rotations alone
    keep the cyclic order (with three, the third always right after the second), which favoured
    the third by 2–4 % in stop 41's batch-norm runs.

    `before` (e.g. a `cache_evictor`'s function) runs before each call, outside its time.
    `probe` (e.g. `matmul_probe()`) runs untimed at the start of each round; what it returns is
    kept in every variant's `probe_gflops`, one per round.
    """
    if rounds < 1 or iters < 1:
        raise ValueError(f"rounds and iters must be >= 1, got {rounds} and {iters}")
    for fn, _ in variants.values():
        for _ in range(warmup):
            fn()
    timings = {name: Timing(batch) for name, (_, batch) in variants.items()}
    for r in range(rounds):
        if probe is not None:
            rate = probe()
            for timing in timings.values():
                timing.probe_gflops.append(rate)
        names = list(variants) if r // len(variants) % 2 == 0 else list(variants)[::-1]
        start = r % len(names)
        for name in names[start:] + names[:start]:
            timings[name].seconds.append(_time_after(variants[name][0], iters, before))
    return timings


def _time_after(fn: Callable[[], object], iters: int, before: Callable[[], object] | None) -> float:
    """`time_call`, with `before` run untimed before each call where given."""
    if before is None:
        return time_call(fn, iters)
    total = 0.0
    for _ in range(iters):
        before()
        total += time_call(fn, 1)
    return total / iters


def ratios(timings: Mapping[str, Timing], reference: str) -> dict[str, float]:
    """Throughput of each variant divided by that of `reference`."""
    base = timings[reference].throughput
    return {name: t.throughput / base for name, t in timings.items()}


def median_ratio(top: Sequence[float], bottom: Sequence[float]) -> float:
    """The median over rounds of top[i] / bottom[i]: two ways timed in the same rounds, so that
    each ratio compares times taken in the same phase of a shared machine."""
    if len(top) != len(bottom) or not top:
        raise ValueError(
            f"top, bottom: expected the same rounds, at least one, got {len(top)} and {len(bottom)}"
        )
    return statistics.median(t / b for t, b in zip(top, bottom, strict=True))


def matmul_probe(dtype: torch.dtype | None = None, size: int = 2048) -> Callable[[], float]:
    """A function that times one `size`² matrix product in `dtype` (default: bf16 where the CPU
    runs it natively, else float32) and returns GFLOP/s: a few milliseconds that show how fast
    the machine runs at that moment. On machine B a 2048² product's rate followed a bf16
    convolution's time more closely than two 1024² products' (correlation −0.91 against −0.77
    over 2,637 turns, stop 47)."""
    if dtype is None:
        dtype = torch.bfloat16 if bf16_supported() else torch.float32
    a = torch.randn(size, size).to(dtype)

    def probe() -> float:
        start = time.perf_counter()
        torch.mm(a, a)
        return 2 * size**3 / (time.perf_counter() - start) / 1e9

    probe()  # the first product allocates and may pick its kernel: not a rate
    return probe


def ratios_by_phase(
    timings: Mapping[str, Timing],
    reference: str,
    pairs: Sequence[tuple[str, str]] = (),
) -> dict[str, object]:
    """Each variant's time ÷ `reference`'s, the median over rounds: in all rounds, and apart in
    the rounds whose probe rate was below the rounds' median ('slower') and at or above it
    ('faster'). Where the halves differ, the machine's phase moved the comparison. Each (top,
    bottom) of `pairs` (e.g. one variant on two models) adds the row 'top ÷ bottom'."""
    cut, halves = _phase_halves(timings, reference)

    def row(top: list[float], bottom: list[float]) -> dict[str, float]:
        out = {"all": median_ratio(top, bottom)}
        for half, rounds in halves.items():
            if rounds:
                out[half] = median_ratio([top[i] for i in rounds], [bottom[i] for i in rounds])
        return out

    table = {name: row(t.seconds, timings[reference].seconds) for name, t in timings.items()}
    for top, bottom in pairs:
        table[f"{top} ÷ {bottom}"] = row(timings[top].seconds, timings[bottom].seconds)
    return {
        "reference": reference,
        "cut_gflops": cut,
        "rounds": {half: len(rounds) for half, rounds in halves.items()},
        "time_ratios": table,
    }


def medians_by_phase(timings: Mapping[str, Timing]) -> dict[str, dict[str, float]]:
    """Each variant's median ms per call over all rounds, and apart over the rounds below and at
    or above the probe's median rate ('slower', 'faster'): an absolute time (a latency target)
    as the machine gives it in each phase."""
    if not timings:
        return {}
    _, halves = _phase_halves(timings, next(iter(timings)))
    out = {}
    for name, timing in timings.items():
        row = {"all": 1e3 * timing.median_s}
        for half, rounds in halves.items():
            if rounds:
                row[half] = 1e3 * statistics.median(timing.seconds[i] for i in rounds)
        out[name] = row
    return out


def _phase_halves(
    timings: Mapping[str, Timing], reference: str
) -> tuple[float, dict[str, list[int]]]:
    """The probe's median rate over `reference`'s rounds, and the rounds below it and at or
    above it."""
    rates = timings[reference].probe_gflops
    if not rates:
        raise ValueError(f"{reference}: no probe rates; time it with interleaved(probe=...)")
    cut = statistics.median(rates)
    return cut, {
        "slower": [i for i, g in enumerate(rates) if g < cut],
        "faster": [i for i, g in enumerate(rates) if g >= cut],
    }


def model_pairs(
    models: Sequence[str], variants: Sequence[str], timed: Collection[str]
) -> list[tuple[str, str]]:
    """(first model, other model) keys of each variant timed on both: with ResNeXt-50 first and
    ResNet-50 second, the per-round time ratio of target 2."""
    return [
        (f"{models[0]}/{v}", f"{other}/{v}")
        for other in models[1:]
        for v in variants
        if f"{models[0]}/{v}" in timed and f"{other}/{v}" in timed
    ]


def phase_lines(by_phase: Mapping[str, object]) -> list[str]:
    """Human-readable lines of `ratios_by_phase`: each variant's per-round time ratio."""
    rounds = by_phase["rounds"]
    lines = [
        f"time ÷ {by_phase['reference']}, median per round: all, then the {rounds['slower']} "
        f"rounds below and the {rounds['faster']} at or above the probe's median "
        f"{by_phase['cut_gflops']:.0f} GFLOP/s"
    ]
    for name, row in by_phase["time_ratios"].items():
        halves = "  ".join(
            f"{half} {row[half]:.3f}" for half in ("slower", "faster") if half in row
        )
        lines.append(f"{name:42s} all {row['all']:.3f}  {halves}")
    return lines


def validate_bench_config(config: object, known_variants: tuple[str, ...]) -> None:
    """Refuse no models or variants, unknown variants, and sizes or counts below 1, naming the
    field."""
    for name in ("models", "variants"):
        if not getattr(config, name):
            raise ConfigError(f"{name}: expected at least one name")
    unknown = sorted(set(config.variants) - set(known_variants))  # type: ignore[attr-defined]
    if unknown:
        raise ConfigError(f"variants: unknown {unknown}; expected some of {list(known_variants)}")
    for name in ("batch", "image_size", "rounds", "iters"):
        if getattr(config, name) < 1:
            raise ConfigError(f"{name}: expected an integer >= 1")


EVICT_BYTES = 64 * 2**20  # more than the last-level cache of the CPUs this was measured on


@contextlib.contextmanager
def cache_evictor() -> Iterator[Callable[[], None]]:
    """A function that writes a buffer larger than the caches, pushing out what earlier calls
    left there; the buffer lives for the block only and is freed however the block ends."""
    buffer = [torch.empty(EVICT_BYTES // 4)]

    def evict() -> None:
        buffer[0].fill_(1.0)

    try:
        yield evict
    finally:
        buffer.clear()  # `evict` holds the list: calling it after the block is an error
