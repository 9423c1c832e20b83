"""The `resnext` command line: a thin dispatcher to the library's command modules."""

from __future__ import annotations

import argparse
import importlib
import sys
import traceback
from collections.abc import Sequence

from resnext.errors import ResNeXtError

# Each module in resnext.commands defines `add_parser(subparsers)` and `run(args) -> int`.
COMMANDS: tuple[str, ...] = (
    "list",
    "info",
    "train",
    "demo",
    "eval",
    "predict",
    "convert",
    "export",
    "quantize",
    "bench",
    "index_jpegs",
)

# Commands that run networks over many batches and have no allocator setting of their own
# (train and demo follow `train.keep_memory`, bench its `--allocator`).
HEAVY_COMMANDS = frozenset({"eval", "predict", "quantize"})


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser with one sub-command per command module."""
    parser = argparse.ArgumentParser(
        prog="resnext", description="ResNeXt models: build, train, evaluate, convert, run."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        module = importlib.import_module(f"resnext.commands.{name}_cmd")
        module.add_parser(sub)
    return parser


def wants_huge_pages(args: argparse.Namespace) -> bool:
    """Whether a console run of `args` puts its large tensors on huge pages: a replayed
    prediction or evaluation, where they cut ResNeXt-50's batch-1 float32 latency to 0.92× on the
    Xeon without AMX. Elsewhere they measured level and cost training up to 29 % more peak memory
    (stop 54); THP_MEM_ALLOC_ENABLE=1 asks for them anywhere, =0 never."""
    return args.command in ("predict", "eval") and bool(getattr(args, "replay", False))


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script; returns the process exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if argv is None and wants_huge_pages(args):
        # before the process's first tensor, when torch reads the switch (parsing makes none)
        from resnext.speed.allocator import request_huge_pages

        request_huge_pages()
    if argv is None and args.command in HEAVY_COMMANDS:
        # A console run owns its process: keep freed activation buffers instead of letting glibc
        # unmap and page-fault them on every batch (the in-process form of preloading tcmalloc).
        from resnext.speed.allocator import keep_freed_memory

        keep_freed_memory()
    if argv is None:
        from resnext.train.distributed import exit_worker, launched_by_torchrun

        if launched_by_torchrun():
            # gloo's threads could abort interpreter shutdown after DDP, even after a crash
            exit_worker(_run_reporting_crashes(args))
    return _run_command(args)


def _run_reporting_crashes(args: argparse.Namespace) -> int:
    """`_run_command`, an unexpected exception printed with its traceback and exit status 1."""
    try:
        return _run_command(args)
    except Exception:
        traceback.print_exc()
        return 1


def _run_command(args: argparse.Namespace) -> int:
    """The command's exit code, with a library error or Ctrl-C turned into a one-line message."""
    try:
        return int(args.func(args) or 0)
    except ResNeXtError as exc:
        print(f"resnext {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"resnext {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
