"""`resnext.speed.op_kinds`: profiler events put under kinds of work by their operator and shapes."""

from __future__ import annotations

import pytest
import torch

import resnext
from resnext.speed import gpu_bench
from resnext.speed.op_kinds import kind_ms_per_step, op_kind

# ResNeXt-50's first grouped 3×3 at batch 8: 128 channels in 32 groups of 4 (weight 128×4×3×3)
X = [8, 128, 56, 56]


@pytest.mark.parametrize(
    ("name", "shapes", "kind"),
    [
        ("aten::cudnn_convolution", [X, [128, 4, 3, 3]], "conv 3x3 grouped"),
        ("aten::mkldnn_convolution", [X, [128, 128, 3, 3]], "conv 3x3 dense"),
        ("aten::cudnn_convolution", [X, [256, 128, 1, 1]], "conv 1x1"),
        ("aten::convolution_backward", [X, X, [128, 4, 3, 3]], "conv 3x3 grouped backward"),
        ("aten::convolution_backward", [[8, 64, 112, 112], [8, 3, 224, 224], [64, 3, 7, 7]],
         "conv 7x7 dense backward"),
        ("aten::cudnn_batch_norm", [X], "batch norm"),
        ("aten::native_batch_norm_backward", [X], "batch norm backward"),
        ("aten::_fused_sgd_", [], "optimizer"),
        ("aten::threshold_backward", [X, X], "relu / add"),
        ("aten::addmm", [[1000], [8, 2048], [2048, 1000]], "classifier"),
        ("aten::max_pool2d_with_indices", [X], "max pooling"),
        ("aten::_to_copy", [X], "copies and casts"),
        ("aten::empty", [], "other"),
    ],
)  # fmt: skip
def test_each_operator_gets_its_kind(name, shapes, kind) -> None:
    assert op_kind(name, shapes) == kind


def test_a_training_step_splits_into_its_kinds() -> None:
    model = resnext.create_model("resnext_tiny", num_classes=4, cardinality=4)
    x, y = torch.randn(4, 3, 16, 16), torch.randint(0, 4, (4,))
    step = gpu_bench.training_step("eager", model, x, y, ours=True)
    kinds = kind_ms_per_step(step, torch.device("cpu"), steps=1, warmup=1)
    for kind in ("conv 3x3 grouped", "conv 3x3 grouped backward", "conv 1x1", "conv 1x1 backward",
                 "batch norm", "optimizer"):  # fmt: skip
        assert kinds.get(kind, 0.0) > 0.0, kind
    assert all(value >= 0.0 for value in kinds.values())
