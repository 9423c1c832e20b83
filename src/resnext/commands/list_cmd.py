"""`resnext list [PATTERN] [--weights]`: registered models with parameters and FLOPs, or the
public checkpoints of the weights table."""

from __future__ import annotations

import argparse
import fnmatch
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


def weights_rows(pattern: str = "*") -> list[dict[str, object]]:
    """One row per weights tag matching `pattern` (as a tag, or through its model's name):
    tag, model, published top-1 and its evaluation size, licence, hash, whether it is the
    model's default (`weights="DEFAULT"`)."""
    from resnext.weights.table import DEFAULT_TAGS, WEIGHTS

    models = set(MODELS.names(pattern))
    rows = []
    for tag in sorted(WEIGHTS):
        entry = WEIGHTS[tag]
        if not (fnmatch.fnmatchcase(tag, pattern) or entry.model in models):
            continue
        first = entry.results[0] if entry.results else None
        rows.append(
            {
                "tag": tag,
                "model": entry.model,
                "top1": entry.top1,
                "eval_size": first.eval_size if first is not None else None,
                "license": entry.license,
                "verified": entry.verified,
                "default": DEFAULT_TAGS.get(entry.model) == tag,
                "source_format": entry.source_format,
            }
        )
    return rows


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("list", help="list models with params and FLOPs (multiply-adds)")
    p.add_argument(
        "pattern", nargs="?", default="*", help="shell-style name pattern, e.g. 'resnext50*'"
    )
    p.add_argument("--json", action="store_true", help="print JSON lines instead of a table")
    p.add_argument(
        "--weights",
        action="store_true",
        help="list the public checkpoints (weights tags) of the matching models instead",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.weights:
        return _print_weights(args.pattern, args.json)
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


def _print_weights(pattern: str, as_json: bool) -> int:
    rows = weights_rows(pattern)
    if not rows:
        print(f"no weights match {pattern!r}", file=sys.stderr if as_json else sys.stdout)
        return 1
    if as_json:
        for row in rows:
            print(json.dumps(row))
        return 0
    print(f"{'tag':<44} {'top-1':>7} {'at':>4} {'licence':<13} {'hash':<5} default")
    for r in rows:
        top1 = f"{r['top1']:.2f}" if r["top1"] is not None else "-"
        print(
            f"{r['tag']:<44} {top1:>7} {r['eval_size'] or '-':>4} {r['license']:<13} "
            f"{'yes' if r['verified'] else 'no':<5} {'*' if r['default'] else ''}"
        )
    print(
        "top-1: published ImageNet-1k accuracy (%) at that evaluation size; default: weights='DEFAULT'."
    )
    return 0
