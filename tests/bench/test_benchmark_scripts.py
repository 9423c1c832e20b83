"""Every benchmark script starts and describes its options; the shared options are defined once."""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
SCRIPTS = sorted(p.name for p in BENCHMARKS.glob("bench_*.py") if p.name != "bench_args.py")


@pytest.fixture
def bench_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(BENCHMARKS))  # as `python benchmarks/<script>` has it


@pytest.mark.parametrize("script", SCRIPTS)
def test_each_script_answers_help(
    script: str, bench_path: None, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    monkeypatch.setattr(sys, "argv", [str(BENCHMARKS / script), "--help"])
    with pytest.raises(SystemExit) as stop:
        runpy.run_path(str(BENCHMARKS / script), run_name="__main__")
    assert stop.value.code == 0
    assert "usage:" in capsys.readouterr().out


def test_the_shared_parser_has_each_option_asked_for_and_writes_beside_the_scripts(
    bench_path: None,
) -> None:
    import bench_args

    parser = bench_args.parser("First line.\nMore.", batch=8, dtypes="fp32")
    assert parser.description == "First line."
    args = parser.parse_args([])
    assert (args.batch, args.dtypes) == (8, "fp32")
    assert args.out == BENCHMARKS / "results"
    assert not hasattr(args, "rounds") and not hasattr(args, "models")
    args = parser.parse_args(["--batch", "3", "--out", "elsewhere"])
    assert args.batch == 3 and args.out == Path("elsewhere")
    with pytest.raises(SystemExit):
        parser.parse_args(["--rounds", "2"])  # not asked for: refused
