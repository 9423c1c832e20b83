"""`resnext index-jpegs SRC DST`: copy an image folder with restart markers in every JPEG (pixels unchanged)."""

from __future__ import annotations

import argparse

from resnext.data import jpeg_restart
from resnext.errors import ConfigError


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "index-jpegs",
        help="copy an image folder with every JPEG rewritten for fast crop decoding (lossless)",
    )
    p.add_argument("src", help="image folder to read (left unchanged)")
    p.add_argument("dst", help="folder to write (outside SRC); same relative paths")
    p.add_argument(
        "--interval",
        type=int,
        default=jpeg_restart.DEFAULT_INTERVAL,
        help="MCUs per restart segment, at most (default %(default)s)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    reason = jpeg_restart.unavailable_reason()
    if reason is not None:
        raise ConfigError(f"index-jpegs cannot run here: {reason}")
    report = jpeg_restart.index_tree(args.src, args.dst, args.interval)
    growth = report.bytes_out / report.bytes_in if report.bytes_in else 1.0
    print(
        f"{report.rewritten} JPEGs rewritten, {report.copied} other files copied, "
        f"{len(report.refused)} JPEGs copied unchanged (libjpeg refused them); "
        f"{report.bytes_out / 1e6:.1f} MB written ({growth:.3f}x the input)"
    )
    for name, why in sorted(report.refused.items()):
        print(f"  unchanged: {name}: {why}")
    return 0
