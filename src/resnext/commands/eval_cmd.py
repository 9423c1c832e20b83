"""`resnext eval`: accuracy of a model and weights on a dataset under a named test protocol."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from resnext.commands.options import add_fast_backend, add_no_timing_cache, add_optimize
from resnext.data.registry import dataset_class_names
from resnext.errors import ConfigError
from resnext.evaluate import (
    PROTOCOLS,
    DistContext,
    LabelSubset,
    Normalization,
    build_report,
    evaluate,
    get_protocol,
    init_from_env,
    read_class_subset,
    write_outputs,
)
from resnext.evaluate.data_source import open_dataset
from resnext.evaluate.distributed import local_device
from resnext.evaluate.protocols import DENSE_SCALES, Protocol
from resnext.evaluate.scoring import check_fast_path
from resnext.inference.fast_backend import fast_backend
from resnext.inference.loading import LoadedModel, load_model
from resnext.io.folders import output_folder
from resnext.speed.capability import fastest_precision
from resnext.train.distributed import broadcast_object
from resnext.weights.preprocess import Preprocessing


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "eval",
        help="evaluate top-1/top-5 accuracy (centre, 320, 10-crop or dense protocol)",
        description="Evaluate a model on an ImageFolder or CIFAR dataset. Run under torchrun "
        "to shard the images over processes; the numbers equal a single-process run.",
    )
    parser.add_argument("--weights", help="weights file, weights tag or `resnext train` checkpoint")
    parser.add_argument(
        "--data", required=True, help="ImageFolder folder, CIFAR folder/archive, or 'digits'"
    )
    parser.add_argument("--model", help="model name (default: the one the weights name)")
    parser.add_argument("--protocol", default="center", choices=sorted(PROTOCOLS))
    parser.add_argument("--resize", type=int, help="shorter side before cropping")
    parser.add_argument("--crop", type=int, help="crop size")
    parser.add_argument("--scales", help="dense protocol shorter sides, comma separated")
    parser.add_argument("--flip", action="store_true", help="dense protocol: also score mirrors")
    parser.add_argument("--interpolation", choices=("bilinear", "bicubic", "nearest"))
    parser.add_argument(
        "--average",
        choices=("softmax", "logits"),
        help="combine views by mean softmax (default) or mean logits (fb.resnet.torch -tenCrop)",
    )
    parser.add_argument("--classes-subset", help="file of class indices to restrict scoring to")
    parser.add_argument(
        "--subset-labels",
        default="model",
        choices=("model", "position"),
        help="dataset labels are model class indices (default) or positions in the subset",
    )
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    add_optimize(parser, "score", limit="crop protocols only")
    add_fast_backend(parser)
    add_no_timing_cache(parser)
    parser.add_argument("--output", help="folder for report.json, per_class.csv, confusion.png")
    parser.add_argument("--json", action="store_true", help="print the JSON report on stdout")
    parser.add_argument("--no-progress", action="store_true")
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    """Evaluate as the arguments say; prints a summary (or the JSON report) on rank 0."""
    joined = not (dist.is_available() and dist.is_initialized())
    args.device = local_device(args.device)
    ctx = init_from_env(device=args.device)
    try:
        return _run(args, ctx)
    finally:
        # Leave a group we joined ourselves (torchrun); one the caller set up stays theirs.
        if joined and ctx.enabled:
            dist.destroy_process_group()


def _fast_path(
    precision: str,
    model: torch.nn.Module,
    protocol: Protocol,
    batch: int,
    device: str,
    timing_cache: bool,
    compile: bool = False,
    replay: bool = False,
) -> torch.nn.Module | None:
    """`resnext.optimize`'s module for a crop protocol's batches (None when off): our kernels
    chosen by timing at the batch's shape (or by the timings kept from an earlier run,
    `timing_cache`); with `compile` also inductor's graph for that shape, with `replay` its
    kernel calls replayed from C, a last short batch running without either."""
    backend = fast_backend(precision, compile=compile, replay=replay, cli=True)
    if precision == "off":
        return None
    check_fast_path(protocol, "--optimize")  # before optimize's timing, not after it
    from resnext.speed.fastpath import optimize  # torch.compile's import is slow

    chans = getattr(getattr(model, "spec", None), "in_chans", 3)
    example = torch.zeros(batch * protocol.views_per_image, chans, protocol.crop, protocol.crop)
    return optimize(
        model,
        precision,
        backend=backend,
        example_input=example,
        device=device,
        timing_cache=timing_cache,
        new_shapes="eager",
    )


def _parse_scales(text: str | None) -> tuple[int, ...] | None:
    if text is None:
        return None
    try:
        scales = tuple(int(s) for s in text.split(","))
    except ValueError:
        scales = ()
    if not scales or any(s < 1 for s in scales):
        raise ConfigError(
            f"--scales: expected positive shorter sides separated by commas (e.g. 224,256), "
            f"got {text!r}"
        )
    return scales


def _run(args: argparse.Namespace, ctx: DistContext) -> int:
    # Only dense testing uses these; on the crop protocols they would be reported but not applied.
    if PROTOCOLS[args.protocol].kind != "dense":
        for option, value in (("--flip", args.flip), ("--scales", args.scales)):
            if value:
                raise ConfigError(
                    f"{option}: only --protocol dense uses it (got --protocol {args.protocol})"
                )
    scales = _parse_scales(args.scales)
    if args.output:
        # Before the run, not after it: a bad folder must not cost a whole evaluation.
        output_folder(args.output)
    loaded = load_model(args.model, args.weights, device=args.device)
    prep = loaded.preprocessing
    if scales is None and args.protocol == "dense":
        scales = _dense_scales(prep.crop)
    crop = args.crop if args.crop is not None else _default_crop(args.protocol, prep.crop)
    resize = args.resize if args.resize is not None else _default_resize(args.protocol, prep, crop)
    protocol = get_protocol(
        args.protocol,
        resize=resize,
        crop=crop,
        interpolation=args.interpolation or prep.interpolation,
        scales=scales,
        flip=True if args.flip else None,
        average=args.average,
    )
    dataset, description = open_dataset(args.data, image_size=prep.crop)
    head = int(getattr(loaded.model, "num_classes", len(loaded.class_names)))
    if not args.classes_subset and description["classes"] != head:
        # Labels would index the wrong classes (or none): accuracies would be meaningless.
        raise ConfigError(
            f"--data {args.data}: the dataset has {description['classes']} classes but the "
            f"model's head has {head}; pick matching weights, or --classes-subset to score "
            f"some of the model's classes"
        )
    indices = read_class_subset(args.classes_subset) if args.classes_subset else None
    subset = LabelSubset(indices, head, args.subset_labels) if indices is not None else None
    precision = args.optimize
    if precision == "auto":
        # each process measures its own CPU; rank 0's choice scores every shard alike
        precision = broadcast_object(fastest_precision(torch.device(args.device)))
    fast = _fast_path(
        precision,
        loaded.model,
        protocol,
        args.batch_size,
        args.device,
        timing_cache=not args.no_timing_cache,
        compile=args.compile,
        replay=args.replay,
    )
    result = evaluate(
        loaded.model,
        dataset,
        protocol,
        Normalization.from_preprocessing(prep),
        num_classes=head,
        subset=subset,
        batch_size=args.batch_size,
        num_workers=args.workers,
        device=args.device,
        progress=not args.no_progress and not args.json,
        context=ctx,
        fast=fast,
    )
    if not ctx.is_main:
        return 0
    report = build_report(
        result,
        model=loaded.name,
        weights=loaded.weights,
        preprocessing={**prep.to_dict(), "weights_format": loaded.source_format},
        dataset=description,
        subset=indices,
        fast_path=precision,
        fast_path_compiled=args.compile,
        fast_path_replayed=args.replay,
    )
    if args.output:
        names = _class_names(loaded, dataset, head)
        scored = [names[i] for i in indices] if indices is not None else names
        write_outputs(report, result, Path(args.output), scored)
    if args.json:
        json.dump(report, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        print(
            f"{loaded.name} [{protocol.name}] on {description['images']} images: "
            f"top-1 {100 * report['top1']:.2f}%  top-5 {100 * report['top5']:.2f}%  "
            f"(errors {100 * report['top1_err']:.2f}% / {100 * report['top5_err']:.2f}%)"
        )
    return 0


def _class_names(loaded: LoadedModel, dataset: object, head: int) -> tuple[str, ...]:
    """The names per_class.csv gives: the weights' own, else the dataset's (its folder or meta
    names, when it has one per class), else the defaults (ImageNet's for a 1000-class head)."""
    if getattr(loaded.model, "class_names", None) is None and head != 1000:
        own = dataset_class_names(dataset, head)
        if own is not None:
            return own
    return loaded.class_names


def _default_crop(protocol: str, from_weights: int) -> int | None:
    # The centre and ten-crop protocols follow the weights' own crop; center320 is a size by
    # definition (None: the protocol's own). A 32-pixel CIFAR network given 224-pixel crops
    # would score at chance.
    return from_weights if protocol in ("center", "tencrop") else None


def _default_resize(protocol: str, prep: Preprocessing, crop: int | None) -> int | None:
    if protocol == "center":
        return prep.resize
    if protocol == "tencrop" and crop is not None:
        # the paper's 256:224 margin around the crop (256/224 for 224-pixel weights, whatever
        # their own centre resize: 232, 235 ...): corners that differ from the centre
        return round(crop * 256 / 224)
    return None


def _dense_scales(crop: int) -> tuple[int, ...] | None:
    """He et al.'s shorter sides, which are for a network evaluated on 224 crops, scaled to one
    whose weights are evaluated on `crop` (None, the protocol's own, for 224)."""
    if crop == 224:
        return None
    return tuple(max(1, round(s * crop / 224)) for s in DENSE_SCALES)
