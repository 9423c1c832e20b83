"""`optimize`'s CPU passes, in their order: each puts one of our kernels (or a fusion of them) in
place of oneDNN's layers where it times faster, on a BN-folded channels-last model."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields

import torch
from torch import nn

from resnext.speed import stem_fusion
from resnext.speed.block_fusion import fuse_blocks
from resnext.speed.conv_x3_swap import (
    swap_convs_dot,
    swap_convs_fma,
    swap_convs_fp16,
    swap_convs_mkl,
    swap_convs_x3,
)
from resnext.speed.dense_swap import DenseOptions, prepack_convs
from resnext.speed.dot_block import fuse_dot_blocks
from resnext.speed.dot_grouped import fuse_dot_pointwise
from resnext.speed.group_order import split_group_channels
from resnext.speed.grouped_swap import LayerChoice, swap_grouped_convs
from resnext.speed.head import swap_head
from resnext.speed.maxpool import use_inference_maxpool
from resnext.speed.pointwise_fusion import fuse_pointwise_convs
from resnext.speed.shortcut_fusion import fuse_dot_shortcuts, fuse_shortcuts, fuse_x3_shortcuts
from resnext.speed.timing_cache import TimingCache

# the attributes an optimized module carries the choices in, in `Choices`' field order
ATTRIBUTES = (
    "grouped_choices",
    "fusion_choices",
    "block_choices",
    "conv_x3_choices",
    "stem_choices",
    "pointwise_choices",
)


@dataclass
class Choices:
    """What the passes chose, by kind: the lists `optimize`'s module carries as `grouped_choices`,
    `fusion_choices`, `block_choices`, `conv_x3_choices`, `stem_choices` and
    `pointwise_choices`."""

    grouped: list[LayerChoice] = field(default_factory=list)
    fusions: list[LayerChoice] = field(default_factory=list)
    blocks: list[LayerChoice] = field(default_factory=list)
    x3: list[LayerChoice] = field(default_factory=list)
    stems: list[LayerChoice] = field(default_factory=list)
    pointwise: list[LayerChoice] = field(default_factory=list)

    @classmethod
    def of(cls, module: nn.Module) -> Choices:
        """The choices an optimized `module` carries (`carried`)."""
        return cls(*(getattr(module, attr) for attr in ATTRIBUTES))

    def carried(self) -> dict[str, list[LayerChoice]]:
        """Each kind's list by the name of the attribute an optimized module carries it as."""
        return {
            attr: getattr(self, f.name) for attr, f in zip(ATTRIBUTES, fields(self), strict=True)
        }

    def decisions(self) -> list[tuple[str, str, str, str]]:
        """(kind, layer, variant, chosen) of every choice: two runs of the passes built the same
        model where these are equal."""
        return [
            (f.name, c.name, c.variant, c.chosen)
            for f in fields(self)
            for c in getattr(self, f.name)
        ]


def run_passes(
    work: nn.Module,
    probe: torch.Tensor,
    modes: Mapping[str, str],
    timings: TimingCache,
    *,
    backend: str,
    exit_ms: float = 0.0,
) -> Choices:
    """Swap our kernels into `work` in place, timed on `probe` (an input of the largest shape it
    is built for, in its dtype and layout); `modes` holds each of `optimize`'s kernel switches by
    name. `exit_ms` is added to oneDNN's time in every choice (in a replay, what leaving its C
    loop for a torch operator is taken to cost). For the eager backends ('none', 'replay') the
    layers oneDNN keeps are then prepacked, as inductor's freezing does for the graph."""
    out = Choices()
    # first: in float32 it weighs the fused stem against conv_x3's convolution too
    out.stems = stem_fusion.fuse_stem(
        work, probe, mode=modes["fuse_stem"], conv_x3_mode=modes["conv_x3"], timings=timings
    )
    out.grouped = split_group_channels(
        work, probe, mode=modes["split_groups"], timings=timings, native_extra_ms=exit_ms
    )
    out.grouped += swap_grouped_convs(
        work, probe, mode=modes["grouped_kernel"], timings=timings, native_extra_ms=exit_ms
    )
    out.fusions = fuse_pointwise_convs(work, probe, mode=modes["fuse_pointwise"], timings=timings)
    # torch.jit.optimize_for_inference does not honour an operator's in-place write
    in_place = backend != "jit"
    fuse_block = modes["fuse_block"]
    out.blocks = fuse_blocks(work, probe, mode=fuse_block, in_place=in_place, timings=timings)
    out.blocks += fuse_shortcuts(work, probe, mode=fuse_block, timings=timings)
    # every backend runs oneDNN's convolutions prepacked with their epilogues fused (the eager
    # paths through `prepack_convs`, below), as the choosers time them
    dense = DenseOptions(in_place=in_place, timings=timings, native_extra_ms=exit_ms)
    out.x3 = swap_convs_x3(work, probe, mode=modes["conv_x3"], options=dense)
    out.x3 += fuse_x3_shortcuts(work, probe, mode=modes["conv_x3"], timings=timings)
    out.pointwise = swap_convs_fp16(work, probe, mode=modes["pointwise_fp16"], options=dense)
    # MKL before ours: its picks on the Xeon without AMX (RESULTS.md, stop 55) predate our
    # kernel's AVX-512 build, which has not run there; on the AMD EPYC, where MKL took none of
    # ResNeXt-50's 1×1s, ours still weighs them all (stop 68)
    out.pointwise += swap_convs_mkl(work, probe, mode=modes["pointwise_mkl"], options=dense)
    out.pointwise += swap_convs_fma(work, probe, mode=modes["pointwise_fma"], options=dense)
    bf16 = modes["pointwise_bf16"]
    out.pointwise += swap_convs_dot(work, probe, mode=bf16, options=dense)
    out.pointwise += fuse_dot_shortcuts(work, probe, mode=bf16, timings=timings)
    out.fusions += fuse_dot_pointwise(work, probe, mode=modes["fuse_pointwise"], timings=timings)
    out.blocks += fuse_dot_blocks(work, probe, mode=fuse_block, timings=timings)
    if backend == "replay":  # there each torch operator after the kernels costs the most
        swap_head(work)
    if backend in ("none", "replay"):  # what inductor's freezing does for the graph
        prepack_convs(work, probe, in_place=in_place)
        # and what its generated code does: the stem's ReLU in its convolution, the pooling
        # without indices
        stem_fusion.fuse_stem_relu(work)
        use_inference_maxpool(work)
    return out
