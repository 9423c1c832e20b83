"""`resnext list [PATTERN]`: registered models with parameters and FLOPs."""

from __future__ import annotations

import argparse
import json
import sys

from resnext.models import MODELS, count


def model_rows(pattern: str = "*") -> list[dict[str, object]]:
    """One row per matching model: name, template, params, GFLOPs (multiply-adds), input size, source."""
    rows = []
    for name in MODELS.names(pattern):
        entry = MODELS.get(name)
        c = count(entry.spec)
        rows.append(
            {
                "name": name,
                "template": entry.spec.template,
                "params": c.params,
                "gflops": round(c.macs / 1e9, 3),
                "input_size": c.input_size,
                "source": entry.source,
                "aliases": list(entry.aliases),
            }
        )
    return rows


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("list", help="list models with params and FLOPs (multiply-adds)")
    p.add_argument(
        "pattern", nargs="?", default="*", help="shell-style name pattern, e.g. 'resnext50*'"
    )
    p.add_argument("--json", action="store_true", help="print JSON lines instead of a table")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    rows = model_rows(args.pattern)
    if not rows:
        # The same exit status with or without --json; stdout stays valid (empty) JSON lines.
        print(f"no model matches {args.pattern!r}", file=sys.stderr if args.json else sys.stdout)
        return 1
    if args.json:
        for row in rows:
            print(json.dumps(row))
        return 0
    print(f"{'name':<28} {'C x d':>7} {'params':>13} {'GFLOPs':>8} {'input':>6}")
    for r in rows:
        print(
            f"{r['name']:<28} {r['template']:>7} {r['params']:>13,} {r['gflops']:>8.2f} "
            f"{r['input_size']:>6}"
        )
    print("FLOPs are multiply-adds per image (the paper's convention) at the given input size.")
    return 0
