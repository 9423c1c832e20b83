"""`resnext bench peaks`: the ceilings per round, their medians and spreads, and the record."""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import pytest

from resnext.commands import bench_cmd
from resnext.errors import ConfigError
from resnext.speed import peak, peaks_bench
from resnext.speed.peak import Peaks


@pytest.mark.parametrize(
    ("kwargs", "field"), [({"rounds": 0}, "rounds"), ({"seconds": 0.0}, "seconds")]
)
def test_config_names_the_bad_field(kwargs: dict, field: str) -> None:
    with pytest.raises(ConfigError, match=field):
        peaks_bench.PeaksConfig(**kwargs).validate()


def test_rates_are_summarised_over_rounds_and_missing_ones_left_out(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Three rounds of made-up ceilings: fp32 3, 1, 2 → median 2; no bf16 dot product on this
    # "CPU" (None), so that rate is left out rather than summarised.
    rounds = iter(
        [
            Peaks(2, 3.0, None, 10.0, 8.0, 100.0, 40.0),
            Peaks(2, 1.0, None, 30.0, 6.0, 300.0, 20.0),
            Peaks(2, 2.0, None, 20.0, 7.0, 200.0, 60.0),
        ]
    )
    monkeypatch.setattr(peaks_bench, "measure_peaks", lambda seconds: next(rounds))
    result = peaks_bench.run_peaks_bench(peaks_bench.PeaksConfig(rounds=3, seconds=0.01))
    rates = result["rates"]
    assert result["threads"] == 2
    assert set(rates) == {
        "fp32_gflops", "read_gbps", "copy_gbps", "amx_bf16_gflops", "amx_bf16_loaded_gflops"
    }  # fmt: skip
    assert rates["fp32_gflops"] == {
        "rounds": [3.0, 1.0, 2.0],
        "median": 2.0,
        "min": 1.0,
        "max": 3.0,
    }
    assert rates["amx_bf16_loaded_gflops"]["median"] == 40.0
    lines = peaks_bench.summary_lines(result)
    assert any(
        "float32 FMA" in line and "2.0 GFLOP/s" in line and "(1.0–3.0)" in line for line in lines
    )
    assert not any("pair dot product" in line for line in lines)


def test_bench_peaks_measures_this_machine_and_writes_its_record(tmp_path: Path) -> None:
    parser = argparse.ArgumentParser()
    bench_cmd.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(
        ["bench", "peaks", "--rounds", "2", "--seconds", "0.02", "--allocator", "none",
         "--out", str(tmp_path)]
    )  # fmt: skip
    assert bench_cmd.run(args) == 0
    (path,) = tmp_path.glob("bench-peaks-*.json")
    record = json.loads(path.read_text())
    rates = record["results"]["rates"]
    assert record["config"]["rounds"] == 2 and "git_commit" in record and "machine" in record
    for row in rates.values():
        assert len(row["rounds"]) == 2 and 0 < row["min"] <= row["median"] <= row["max"]
    assert ("amx_bf16_loaded_gflops" in rates) == (peak.amx_unavailable_reason() is None)


def test_the_summary_has_a_line_for_every_rate_peaks_measures() -> None:
    # a rate added to Peaks but not to the summary's table would be measured and never printed
    measured = {f.name for f in dataclasses.fields(Peaks)} - {"threads"}
    assert {name for name, _, _ in peaks_bench._RATES} == measured
