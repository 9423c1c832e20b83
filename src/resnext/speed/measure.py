"""Timing on a noisy shared machine: interleaved rounds over variants, medians and ratios."""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from resnext.errors import ConfigError


@dataclass
class Timing:
    """Per-round seconds per call of one variant, with the batch size it processed."""

    batch: int
    seconds: list[float] = field(default_factory=list)

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
    """
    if rounds < 1 or iters < 1:
        raise ValueError(f"rounds and iters must be >= 1, got {rounds} and {iters}")
    for fn, _ in variants.values():
        for _ in range(warmup):
            fn()
    timings = {name: Timing(batch) for name, (_, batch) in variants.items()}
    for r in range(rounds):
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


def validate_bench_config(config: object, known_variants: tuple[str, ...]) -> None:
    """Refuse unknown variants and sizes or counts below 1, naming the field."""
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
