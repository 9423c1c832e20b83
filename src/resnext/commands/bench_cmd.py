"""`resnext bench infer|train|data|gpu|peaks`: speed benchmarks that write JSON results with provenance."""

from __future__ import annotations

import argparse
import dataclasses
import re
import sys
from pathlib import Path
from types import ModuleType

from resnext.errors import ConfigError, ResNeXtError
from resnext.io.folders import output_folder
from resnext.speed.allocator import (
    LIBRARY_NAMES,
    find_allocator,
    keep_freed_memory,
    loaded_allocator,
    reexec_with_allocator,
)
from resnext.speed.capability import bf16_faster
from resnext.speed.provenance import write_results

DEFAULT_OUT = Path("benchmarks/results")


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="results folder")
    parser.add_argument(
        "--allocator",
        choices=("auto", "tcmalloc", "jemalloc", "none"),
        default="auto",
        help="re-exec once with this allocator preloaded (auto: tcmalloc, else jemalloc)",
    )
    parser.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds")


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register `bench` and its five benchmarks."""
    parser = subparsers.add_parser(
        "bench",
        help="speed benchmarks (CPU inference, training, data; GPU against timm; ceilings)",
    )
    sub = parser.add_subparsers(dest="bench", required=True, metavar="BENCH")

    infer = sub.add_parser("infer", help="inference img/s: eager vs fast paths vs peers")
    infer.add_argument("--models", default="resnext50_32x4d", help="comma-separated names")
    infer.add_argument(
        "--variants",
        default=None,
        help="comma-separated (default: main ones; float32 ones without native bf16)",
    )
    infer.add_argument("--batch", type=int, default=16)
    infer.add_argument("--image-size", type=int, default=224)
    infer.add_argument("--iters", type=int, default=2, help="calls per round")
    infer.add_argument("--latency-rounds", type=int, default=0, help="batch-1 latency rounds")
    infer.add_argument(
        "--share-timings",
        action="store_true",
        help="one set of layer timings per model for all variants: the fast paths make the same "
        "kernel choices where they time the same ways, rather than each its own",
    )
    _common(infer)

    train = sub.add_parser("train", help="training step img/s (channels_last, bf16, compile)")
    train.add_argument("--models", default="resnext50_32x4d", help="comma-separated names")
    train.add_argument(
        "--variants",
        default=None,
        help="comma-separated (default: main ones; float32 ones without native bf16)",
    )
    train.add_argument("--batch", type=int, default=16)
    train.add_argument("--image-size", type=int, default=224)
    train.add_argument("--iters", type=int, default=1, help="steps per round")
    train.add_argument(
        "--warmup-rounds", type=int, default=3, help="interleaved rounds run first, not timed"
    )
    _common(train)

    data = sub.add_parser("data", help="training-transform img/s per core vs plain Pillow")
    data.add_argument("--root", type=Path, required=True, help="folder of JPEG images")
    data.add_argument("--limit", type=int, default=200, help="images per round")
    data.add_argument(
        "--workers",
        type=int,
        nargs="*",
        default=[],
        help="also time a DataLoader of the planned pipeline with these worker counts",
    )
    _common(data)

    gpu = sub.add_parser("gpu", help="GPU inference and training img/s, ours vs timm/torchvision")
    gpu.add_argument("--models", default="resnext50_32x4d,resnet50", help="comma-separated")
    gpu.add_argument("--variants", default=None, help="comma-separated (default: main ones)")
    gpu.add_argument("--batch", type=int, default=256)
    gpu.add_argument("--image-size", type=int, default=224)
    gpu.add_argument("--iters", type=int, default=10, help="calls per round")
    gpu.add_argument("--device", default="cuda", help="cuda, cuda:N (cpu: a smoke run)")
    _common(gpu)

    peaks = sub.add_parser(
        "peaks", help="this machine's ceilings: arithmetic peaks and memory bandwidth"
    )
    peaks.add_argument(
        "--seconds", type=float, default=0.2, help="per rate and round (best of three)"
    )
    _common(peaks)
    parser.set_defaults(func=run)


def default_variants(bench: ModuleType, bf16_is_faster: bool) -> tuple[str, ...]:
    """The variants `bench` (infer_bench or train_bench) runs when none are named: its float32
    ones on a CPU where bf16 is not the faster precision (`capability.bf16_faster`), where the
    bf16 ones would measure emulation or a slower path than float32's."""
    return bench.DEFAULT_VARIANTS if bf16_is_faster else bench.FP32_DEFAULT_VARIANTS


def _models_and_variants(
    args: argparse.Namespace, allowed: tuple[str, ...], default: tuple[str, ...]
) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The --models list and the --variants list checked against `allowed` (default when absent)."""
    from resnext.speed.infer_bench import parse_list

    variants = parse_list(args.variants, allowed, "--variants") if args.variants else default
    return parse_list(args.models), variants


def _timed_config(
    config_class: type,
    args: argparse.Namespace,
    allowed: tuple[str, ...],
    default: tuple[str, ...],
    **own: object,
) -> object:
    """A model benchmark's config: the options infer, train and gpu share, then its `own`."""
    models, variants = _models_and_variants(args, allowed, default)
    return config_class(
        models=models,
        variants=variants,
        batch=args.batch,
        image_size=args.image_size,
        rounds=args.rounds,
        iters=args.iters,
        **own,
    )


def results_folder(out: Path) -> Path:
    """`out`, created where missing; a ConfigError naming --out where it cannot hold the results,
    so that a run fails before its timing, not after it."""
    try:
        return output_folder(out)
    except ConfigError as exc:
        raise ConfigError(f"--out {out}: not a folder results can be written to ({exc})") from None


def check_allocator(choice: str) -> None:
    """A ConfigError for an allocator named by --allocator that is neither loaded nor installed:
    asked for by name it must not quietly become glibc's ('auto' falls back to glibc)."""
    if choice in LIBRARY_NAMES and loaded_allocator() is None and find_allocator(choice) is None:
        raise ConfigError(
            f"--allocator {choice}: not installed (none of {list(LIBRARY_NAMES[choice])} found); "
            "install it, or pass auto (glibc where neither is installed) or none"
        )


def _validated(config: object, args: argparse.Namespace) -> None:
    """`config.validate()`, its errors naming the options typed (--latency-rounds) rather than
    the config's fields (latency_rounds)."""
    try:
        config.validate()  # type: ignore[attr-defined]
    except ConfigError as exc:
        fields, sep, why = str(exc).partition(": ")
        if not sep:
            raise
        options = re.sub(
            r"[a-z_]+",
            lambda m: f"--{m[0].replace('_', '-')}" if m[0] in vars(args) else m[0],
            fields,
        )
        raise ConfigError(f"{options}: {why}") from None


def run(args: argparse.Namespace) -> int:
    """Run the chosen benchmark, print a summary, write the JSON record."""
    results_folder(args.out)
    check_allocator(args.allocator)
    allocator = reexec_with_allocator(args.allocator)
    if allocator is None and args.allocator != "none" and keep_freed_memory():
        allocator = "glibc, freed memory kept (mallopt)"
    print(f"allocator: {allocator or 'glibc'}")
    if args.bench == "infer":
        from resnext.speed import infer_bench as bench

        default = default_variants(bench, bf16_faster())
        config = _timed_config(
            bench.InferConfig,
            args,
            bench.VARIANTS,
            default,
            latency_rounds=args.latency_rounds,
            share_timings=args.share_timings,
        )
        _validated(config, args)
        result = bench.run_infer_bench(config)
    elif args.bench == "train":
        from resnext.speed import train_bench as bench

        default = default_variants(bench, bf16_faster())
        config = _timed_config(
            bench.TrainConfig, args, bench.VARIANTS, default, warmup_rounds=args.warmup_rounds
        )
        _validated(config, args)
        result = bench.run_train_bench(config)
    elif args.bench == "gpu":
        from resnext.speed import gpu_bench as bench

        config = _timed_config(
            bench.GpuBenchConfig, args, bench.VARIANTS, bench.DEFAULT_VARIANTS, device=args.device
        )
        _validated(config, args)
        result = bench.run_gpu_bench(config)
    elif args.bench == "peaks":
        from resnext.speed import peaks_bench as bench

        config = bench.PeaksConfig(rounds=args.rounds, seconds=args.seconds)
        _validated(config, args)
        result = bench.run_peaks_bench(config)
    else:
        from resnext.speed import data_bench as bench

        config = bench.DataConfig(
            root=args.root, limit=args.limit, rounds=args.rounds, workers=tuple(args.workers)
        )
        _validated(config, args)
        result = bench.run_data_bench(config)
    print("\n".join(bench.summary_lines(result)))
    record = {**dataclasses.asdict(config), "allocator": allocator or "glibc"}
    path = write_results(args.out, f"bench-{args.bench}", record, result)
    print(f"results: {path}")
    return 0


def main(argv: list[str]) -> int:
    """`resnext bench ARGV...` without the full CLI (for the scripts in benchmarks/)."""
    parser = argparse.ArgumentParser(prog="resnext")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["bench", *argv])
    try:
        return args.func(args)
    except ResNeXtError as exc:
        print(f"resnext bench {args.bench}: error: {exc}", file=sys.stderr)
        return 2
