"""Two `resnext bench infer` variants compared over several fresh processes, not just one.

Usage: .venv/bin/python benchmarks/bench_infer_repeat.py --pair replay-fp32,replay-nofma-fp32
           [--runs 5] [--models resnext50_32x4d] [--batch 16] [--rounds 5] [--latency-rounds 15]

Within one process `resnext bench infer` interleaves its variants round by round, so a slow
phase of a shared machine falls on both. Between processes it does not: on machine A
single-process A/Bs of one kernel change, each a ratio of two median times, ranged from 0.90 to
1.03 (benchmarks/RESULTS.md, stop 68), wider than the few per cent such a change is worth. So
this runs `benchmarks/bench_infer.py` `--runs` times, each in a fresh interpreter with the two
variants only (`--share-timings`), their order swapped every other
run, and takes from each run's JSON, per model, the first variant's time ÷ the second's: the
median over rounds at `--batch` (the per-round time ratios) and at batch 1 (the latency
rounds, where `--latency-rounds` > 0). It prints each run's ratios and, over the runs, their
median, range and how many runs the first variant was faster, and writes that with the runs'
JSON file names (each run's own JSON lands in `--out` too).
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
from pathlib import Path

import bench_args
from resnext.speed.infer_bench import VARIANTS
from resnext.speed.measure import median_ratio
from resnext.speed.provenance import write_results

HERE = Path(__file__).resolve().parent


def parse_pair(text: str) -> tuple[str, str]:
    """`--pair` as two different `resnext bench infer` variants, else argparse's error."""
    names = text.split(",")
    if len(names) != 2 or names[0] == names[1] or not set(names) <= set(VARIANTS):
        raise argparse.ArgumentTypeError(
            f"expected two different variants of `resnext bench infer` (comma-separated), got "
            f"{text!r}"
        )
    return names[0], names[1]


def run_once(order: tuple[str, str], args: argparse.Namespace) -> Path:
    """One fresh `bench_infer.py` process with the variants in `order`; its results JSON."""
    command = [
        sys.executable,
        str(HERE / "bench_infer.py"),
        *("--models", args.models, "--variants", ",".join(order)),
        *("--batch", str(args.batch), "--image-size", str(args.image_size)),
        *("--rounds", str(args.rounds), "--latency-rounds", str(args.latency_rounds)),
        *("--share-timings", "--out", str(args.out)),
    ]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    found = re.search(r"^results: (.+)$", done.stdout, re.MULTILINE)
    if done.returncode != 0 or found is None:
        tail = (done.stdout + done.stderr).strip()[-2000:]
        raise RuntimeError(f"bench_infer.py {' '.join(command[2:])} failed:\n{tail}")
    return Path(found.group(1))


def run_ratios(results: dict, models: list[str], first: str, second: str) -> dict[str, dict]:
    """Per model, `first`'s time ÷ `second`'s in one run: at the run's batch and at batch 1."""
    ratios: dict[str, dict] = {}
    for model in models:
        a, b = f"{model}/{first}", f"{model}/{second}"
        by_round = results["by_phase"]["time_ratios"]  # each ÷ the run's first variant
        ratios[model] = {"batch": by_round[a]["all"] / by_round[b]["all"]}
        latency = results.get("latency_batch1", {})
        if a in latency and b in latency:
            ratios[model]["batch1"] = median_ratio(latency[a]["rounds_ms"], latency[b]["rounds_ms"])
    return ratios


def summary(runs: list[dict[str, dict]], models: list[str]) -> dict[str, dict]:
    """Per model and measure, the ratios over the runs: median, range, runs the first won."""
    out: dict[str, dict] = {}
    for model in models:
        out[model] = {}
        for measure in ("batch", "batch1"):
            values = [run[model][measure] for run in runs if measure in run[model]]
            if values:
                out[model][measure] = {
                    "ratios": values,
                    "median": statistics.median(values),
                    "min": min(values),
                    "max": max(values),
                    "first_faster_in": sum(v < 1 for v in values),
                }
    return out


def main() -> int:
    parser = bench_args.parser(
        __doc__, models="resnext50_32x4d", batch=16, image_size=224, rounds=5
    )
    parser.add_argument("--pair", type=parse_pair, required=True, help="two variants: A,B")
    parser.add_argument("--runs", type=int, default=5, help="fresh processes (at least 2)")
    parser.add_argument("--latency-rounds", type=int, default=15, help="batch-1 rounds (0: none)")
    args = parser.parse_args()
    if args.runs < 2 or args.rounds < 1 or args.latency_rounds < 0:
        print(
            f"--runs {args.runs}, --rounds {args.rounds}, --latency-rounds "
            f"{args.latency_rounds}: expected at least 2 runs, 1 round and 0 latency rounds"
        )
        return 1
    first, second = args.pair
    models = args.models.split(",")
    runs, files = [], []
    for index in range(args.runs):
        order = (first, second) if index % 2 == 0 else (second, first)
        try:
            path = run_once(order, args)
        except RuntimeError as exc:  # the runs before keep their JSON; no summary is written
            print(f"run {index + 1} of {args.runs}: {exc}")
            return 1
        results = json.loads(path.read_text())["results"]
        runs.append(run_ratios(results, models, first, second))
        files.append(path.name)
        shown = "  ".join(
            f"{m}: " + ", ".join(f"{k} {v:.3f}" for k, v in runs[-1][m].items()) for m in models
        )
        print(f"run {index + 1} ({','.join(order)}): {first} ÷ {second} time {shown}", flush=True)
    totals = summary(runs, models)
    for model, measures in totals.items():
        for measure, row in measures.items():
            print(
                f"{model} {measure}: {first} ÷ {second} median {row['median']:.3f} "
                f"({row['min']:.3f}–{row['max']:.3f}), {first} faster in "
                f"{row['first_faster_in']} of {len(row['ratios'])} runs"
            )
    config = {k: v for k, v in vars(args).items() if k != "out"}
    config["pair"] = list(args.pair)
    result = {"runs": runs, "run_files": files, "summary": totals}
    path = write_results(args.out, "bench-infer-repeat", config, result)
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
