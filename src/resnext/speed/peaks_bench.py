"""Ceilings benchmark: this machine's arithmetic peaks and memory bandwidth, measured round by round."""

from __future__ import annotations

import statistics
from dataclasses import dataclass, fields

from resnext.errors import ConfigError
from resnext.speed.peak import Peaks, measure_peaks

# Peaks' rates in the order the summary prints them, with their units and labels
_RATES = (
    ("fp32_gflops", "GFLOP/s", "float32 FMA"),
    ("bf16_gflops", "GFLOP/s", "bf16 pair dot product"),
    ("amx_bf16_gflops", "GFLOP/s", "AMX bf16 tile product"),
    ("amx_bf16_loaded_gflops", "GFLOP/s", "AMX bf16, operand tiles loaded"),
    ("read_gbps", "GB/s", "memory read"),
    ("copy_gbps", "GB/s", "memory copy (read + written)"),
)


@dataclass(frozen=True)
class PeaksConfig:
    """What one ceilings run measures: `rounds` full sets of `measure_peaks`, each rate timed
    for about `seconds` (best of three) per round."""

    rounds: int = 5
    seconds: float = 0.2

    def validate(self) -> None:
        if self.rounds < 1:
            raise ConfigError(f"rounds: expected an integer >= 1, got {self.rounds}")
        if not self.seconds > 0:
            raise ConfigError(f"seconds: expected > 0, got {self.seconds}")


def run_peaks_bench(config: PeaksConfig) -> dict[str, object]:
    """Every ceiling `config.rounds` times; per rate its rounds, median, lowest and highest (a
    machine whose speed changes by phase shows it in the spread). Rates the CPU lacks are left
    out."""
    config.validate()
    rounds = [measure_peaks(seconds=config.seconds) for _ in range(config.rounds)]
    per_rate: dict[str, dict[str, object]] = {}
    for field in fields(Peaks):
        values = [getattr(p, field.name) for p in rounds]
        if field.name == "threads" or any(v is None for v in values):
            continue
        per_rate[field.name] = {
            "rounds": values,
            "median": statistics.median(values),
            "min": min(values),
            "max": max(values),
        }
    return {"threads": rounds[0].threads, "rates": per_rate}


def summary_lines(result: dict[str, object]) -> list[str]:
    """Human-readable lines: each ceiling's median and spread over the rounds."""
    lines = [f"ceilings with {result['threads']} threads (median, lowest–highest of the rounds):"]
    for name, unit, label in _RATES:
        row = result["rates"].get(name)
        if row is not None:
            lines.append(
                f"  {label:32s} {row['median']:9.1f} {unit}  ({row['min']:.1f}–{row['max']:.1f})"
            )
    return lines
