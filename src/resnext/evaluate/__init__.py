"""Evaluation: centre-crop, 10-crop and multi-scale dense protocols, restricted labels, distributed."""

from __future__ import annotations

from resnext.evaluate.dense import class_score_map, dense_logits, fc_as_conv
from resnext.evaluate.distributed import DistContext, ShardSampler, init_from_env
from resnext.evaluate.metrics import AccuracyCounter
from resnext.evaluate.protocols import DENSE_SCALES, PROTOCOLS, Protocol, get_protocol
from resnext.evaluate.report import build_report, write_outputs
from resnext.evaluate.restricted import LabelSubset, read_class_subset
from resnext.evaluate.runner import EvalResult, evaluate
from resnext.evaluate.views import Normalization, ViewTransform, resize_shorter, ten_crops

__all__ = [
    "DENSE_SCALES",
    "PROTOCOLS",
    "AccuracyCounter",
    "DistContext",
    "EvalResult",
    "LabelSubset",
    "Normalization",
    "Protocol",
    "ShardSampler",
    "ViewTransform",
    "build_report",
    "class_score_map",
    "dense_logits",
    "evaluate",
    "fc_as_conv",
    "get_protocol",
    "init_from_env",
    "read_class_subset",
    "resize_shorter",
    "ten_crops",
    "write_outputs",
]
