"""Command-line options that several commands share, each defined once."""

from __future__ import annotations

import argparse

OPTIMIZE_PRECISIONS = ("off", "fp32", "bf16", "fp16", "auto")


def positive_int(text: str) -> int:
    """An argparse type: a whole number >= 1, so that a bad count or size is a usage error
    (exit 2, argparse's message naming the option) rather than a failure inside the command."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {value}")
    return value


def add_optimize(parser: argparse.ArgumentParser, purpose: str, limit: str = "") -> None:
    """`--optimize PRECISION`, the fast path (`resnext.optimize`) for the commands that run a
    model (predict, eval): `purpose` says what it does it for, `limit` where it does not apply."""
    parser.add_argument(
        "--optimize",
        choices=OPTIMIZE_PRECISIONS,
        default="off",
        help=f"{purpose} with the fast path (resnext.optimize) in this precision, on --device "
        "(fp16: fp32 with the 1x1s' products in float16, on CPUs with AVX512-FP16; auto: bf16 "
        "where the device runs it faster than fp32, else fp16 where it runs, else fp32)"
        + (f"; {limit}" if limit else ""),
    )


def add_fast_backend(parser: argparse.ArgumentParser) -> None:
    """`--compile` or `--replay`, for the commands with an `--optimize` fast path (predict, eval)."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument(
        "--compile",
        action="store_true",
        help="with --optimize: also compile it (inductor) for --batch-size: seconds up front, "
        "worth it over many images; a shorter last batch runs without the graph",
    )
    group.add_argument(
        "--replay",
        action="store_true",
        help="with --optimize: replay its recorded kernel calls from one C loop (x86-64 Linux "
        "CPUs): no compiling, the lowest latency at small batches; a shorter last batch runs "
        "without it",
    )


def add_no_timing_cache(parser: argparse.ArgumentParser) -> None:
    """`--no-timing-cache`, for the commands whose `--optimize` times kernels (predict, eval)."""
    parser.add_argument(
        "--no-timing-cache",
        action="store_true",
        help="with --optimize: time every layer afresh instead of reading and keeping the "
        "timings in $RESNEXT_TIMING_CACHE (default ~/.cache/resnext/timings)",
    )
