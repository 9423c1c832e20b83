"""Per-shape choice between equivalent implementations of one op, timed on this CPU.

Which kernel is fastest depends on the CPU far more than on the shape. On an AMD EPYC with
AVX512-BF16 and no AMX, our bf16 1×1 product beat oneDNN by 1.0–1.3×; on an Intel Xeon with
AMX, oneDNN's bf16 1×1 convolutions run at ~1,900 GFLOP/s and ours, built on the same
AVX512-BF16 pair dot product, at ~220 (benchmarks/RESULTS.md, "A second machine"). Rather than
thresholds tuned on one machine, each training fast path names its candidates, reference first
(oneDNN, what the plain layer runs), and `run` times them on the real operands the first time a
shape is seen, then runs only the winner for that shape. A candidate replaces the reference only
when it is at least `MARGIN` faster, so close calls stay with torch's own kernel and repeated
processes on one machine decide alike.

Every candidate computes the same function to float32 rounding (each is tested against float64
elsewhere; int8 candidates the same codes, one code apart where float rounding differs), except the
float16 products a caller offers only where asked (`train.fp16_products`).
`decisions()` lists what was chosen and the times behind it, for a run's records. Int8
inference's grouped 3×3s (`resnext.speed.int8`) choose between torch's engine and our kernel the
same way.
Within `CHOOSER.using(timings)` the times are also kept on disk (`resnext.speed.timing_cache`):
a later process on this machine reads them instead of timing (`resnext train` does this; the
first step of ResNeXt-50 in float32 otherwise spends ~20 s timing on a 2-core AVX2 CPU) and so
runs the same implementations.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Collection, Iterator, Mapping
from dataclasses import dataclass
from typing import TypeVar

import torch

from resnext.speed.timing_cache import TimingCache

T = TypeVar("T")

MARGIN = 0.05  # a challenger must take at most 95 % of the reference's time
WARMUP = 1  # untimed calls of each candidate first (library loads, primitive creation, page faults)
REPEATS = 3  # timed rounds, candidates alternating; each candidate's best round counts


@dataclass(frozen=True)
class Decision:
    """The implementation chosen for one op at one shape, and each candidate's best time."""

    op: str
    key: tuple
    threads: int
    winner: str
    ms: dict[str, float]
    stored: bool = False  # the times were read from a timing cache, not measured in this process

    def as_dict(self) -> dict[str, object]:
        return {
            "op": self.op,
            "key": [str(k) for k in self.key],
            "threads": self.threads,
            "winner": self.winner,
            "ms": {name: round(ms, 4) for name, ms in self.ms.items()},
            "stored": self.stored,
        }


class Chooser:
    """Times the candidates of an op the first time a key is seen and remembers the fastest."""

    def __init__(
        self,
        *,
        margin: float = MARGIN,
        warmup: int = WARMUP,
        repeats: int = REPEATS,
        clock: Callable[[], float] = time.perf_counter,
        exclude: Collection[tuple[str, str]] = (),
    ) -> None:
        if not 0 <= margin < 1:
            raise ValueError(f"margin: expected a fraction in [0, 1), got {margin}")
        if warmup < 0 or repeats < 1:
            raise ValueError(f"warmup/repeats: expected >= 0 and >= 1, got {warmup}/{repeats}")
        self.margin, self.warmup, self.repeats, self._clock = margin, warmup, repeats, clock
        # (op, candidate) pairs this chooser never runs: benchmarks compare steps with and
        # without a kernel in one process this way; an op's reference cannot be excluded.
        self._exclude = frozenset(exclude)
        self._decisions: dict[tuple, Decision] = {}
        self._preferred: tuple[str, ...] = ()
        self._timings: TimingCache | None = None

    def run(self, op: str, key: tuple, candidates: Mapping[str, Callable[[], T]]) -> T:
        """The result of the fastest candidate for (op, key); the first candidate is the reference."""
        if not candidates:
            raise ValueError(f"{op}: no candidate implementation given")
        if self._exclude:
            reference = next(iter(candidates))
            candidates = {
                n: f
                for n, f in candidates.items()
                if n == reference or (op, n) not in self._exclude
            }
        if self._preferred:
            # Pinned (tests): the first preferred name this op offers, else its reference.
            chosen = next((n for n in self._preferred if n in candidates), next(iter(candidates)))
            return candidates[chosen]()
        names = list(candidates)
        if len(names) == 1:
            return candidates[names[0]]()
        full_key = (op, key, torch.get_num_threads())
        known = self._decisions.get(full_key)
        if known is not None and known.winner in candidates:
            return candidates[known.winner]()
        return self._time_and_choose(op, key, full_key, candidates)

    def _time_and_choose(
        self, op: str, key: tuple, full_key: tuple, candidates: Mapping[str, Callable[[], T]]
    ) -> T:
        # the threads again: a cache's context has those of when it was opened
        stored_key = "|".join(["autotune", op, str(key), f"{full_key[2]} threads", *candidates])
        if self._timings is not None:
            stored = self._timings.times(stored_key, len(candidates))
            if stored is not None:
                ms = dict(zip(candidates, stored, strict=True))
                winner = self._decide(full_key, op, key, ms, stored=True)
                return candidates[winner]()
        best = dict.fromkeys(candidates, math.inf)
        results: dict[str, T] = {}
        rounds = self.warmup + self.repeats
        for round_ in range(rounds):
            for name, fn in candidates.items():
                start = self._clock()
                out = fn()
                elapsed = self._clock() - start
                if round_ == rounds - 1:
                    results[name] = out
                # Released at once otherwise: the next call can reuse its memory. Held outputs
                # make every call fault in fresh pages, which cost a 56² map's oneDNN input
                # gradient 50 ms instead of 3 in a process's first step.
                del out
                if round_ >= self.warmup:
                    best[name] = min(best[name], elapsed)
        ms = {name: 1e3 * seconds for name, seconds in best.items()}
        winner = self._decide(full_key, op, key, ms)
        if self._timings is not None and all(0 < t < math.inf for t in ms.values()):
            self._timings.store(stored_key, list(ms.values()))
            self._timings.save()  # each new shape at once: a killed run keeps what it timed
        return results[winner]

    def _decide(
        self, full_key: tuple, op: str, key: tuple, ms: dict[str, float], stored: bool = False
    ) -> str:
        """The winner of candidates timed `ms` (reference first), recorded as a Decision."""
        reference = next(iter(ms))
        winner = min(ms, key=ms.__getitem__)
        if ms[winner] > (1 - self.margin) * ms[reference]:
            winner = reference
        self._decisions[full_key] = Decision(op, key, full_key[2], winner, ms, stored)
        return winner

    def decisions(self) -> list[Decision]:
        """Every choice made so far, in the order the shapes were first seen."""
        return list(self._decisions.values())

    def clear(self) -> None:
        """Forget every choice (the next call of each op times its candidates again)."""
        self._decisions.clear()

    @contextlib.contextmanager
    def using(self, timings: TimingCache | None) -> Iterator[None]:
        """Within the block, read candidates' times from `timings` where stored and store the
        ones measured (None: time in memory only, as outside)."""
        previous, self._timings = self._timings, timings
        try:
            yield
        finally:
            self._timings = previous

    @contextlib.contextmanager
    def prefer(self, *names: str) -> Iterator[None]:
        """Within the block, time nothing: each op runs the first of `names` it offers, else its
        reference (tests use it to pin a path)."""
        previous, self._preferred = self._preferred, names
        try:
            yield
        finally:
            self._preferred = previous


CHOOSER = Chooser()  # the process-wide choices of the training fast paths


def run(op: str, key: tuple, candidates: Mapping[str, Callable[[], T]]) -> T:
    """`CHOOSER.run`: the fastest candidate's result for this op and key on this CPU."""
    return CHOOSER.run(op, key, candidates)


def decisions() -> list[Decision]:
    """The process-wide choices made so far."""
    return CHOOSER.decisions()
