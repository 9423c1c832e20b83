"""Putting a bottleneck's grouped channels in the split order where its grouped 3×3 then runs faster.

`grouped_split`'s kernel reads and writes the channels of a grouped 3×3 in another order. In a
ResNeXt bottleneck, 1×1 → grouped 3×3 → 1×1 with only per-channel steps (folded BNs, ReLUs) in
between, that order is free: the first 1×1's output channels (its weight's rows and its bias)
are permuted into the split input order and the last 1×1's input channels (its weight's
columns) into the split output order, and the block computes the same function. Every sum is
the same but the last 1×1's, which adds its terms in another order (float32 rounding).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx, nn

from resnext.errors import ConfigError
from resnext.speed import grouped_split
from resnext.speed.fold import set_module
from resnext.speed.grouped_swap import (
    FastGroupedConv3x3,
    LayerChoice,
    check_mode,
    eligible,
    fuse_following_relu,
    input_shapes,
    runnable_variants,
    time_ways_cold,
    traced_call,
)
from resnext.speed.measure import cache_evictor
from resnext.speed.prepacked import PrepackedConv
from resnext.speed.timing_cache import TimingCache, layer_key


@dataclass(frozen=True)
class Sandwich:
    """The convolutions around a grouped 3×3 that only it and per-channel steps separate: their
    names in the model."""

    before: str  # the convolution whose outputs the grouped 3×3 reads
    after: str  # the convolution that reads the grouped 3×3's outputs


def _per_channel(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """Whether `node` maps each channel on its own (a folded BN's identity or a ReLU)."""
    if node.op == "call_module":
        return isinstance(modules.get(str(node.target)), nn.Identity | nn.ReLU)
    if node.op == "call_function":
        return node.target in (F.relu, torch.relu) and len(node.args) == 1
    return False


def _plain_conv(node: fx.Node, modules: dict[str, nn.Module]) -> nn.Conv2d | None:
    module = modules.get(str(node.target)) if node.op == "call_module" else None
    if type(module) is nn.Conv2d and module.groups == 1:
        return module
    return None


def find_sandwich(model: nn.Module, name: str) -> Sandwich | None:
    """The 1×1-sided sandwich around the grouped 3×3 at `name`, or None if its block is not one
    (or cannot be traced): its input comes only from a plain convolution whose outputs go
    nowhere else, its output goes only to a plain convolution, through per-channel steps."""
    traced = traced_call(model, name)
    if traced is None:
        return None
    parent_name, graph, modules, node = traced
    if len(node.args) != 1 or not isinstance(node.args[0], fx.Node):
        return None
    channels = modules[str(node.target)].out_channels
    before = node.args[0]
    while _per_channel(before, modules) and len(before.users) == 1:
        before = before.args[0]
        if not isinstance(before, fx.Node):
            return None
    first = _plain_conv(before, modules)
    if first is None or len(before.users) != 1 or first.out_channels != channels:
        return None
    after = node
    while len(after.users) == 1:
        after = next(iter(after.users))
        if not _per_channel(after, modules):
            break
    last = _plain_conv(after, modules)
    if after is node or last is None or last.in_channels != channels:
        return None
    # their weights are permuted: neither may be called anywhere else
    calls = [n.target for n in graph.nodes if n.op == "call_module"]
    shared = [m for _, m in model.named_modules(remove_duplicate=False) if m is first or m is last]
    if calls.count(before.target) != 1 or calls.count(after.target) != 1 or len(shared) != 2:
        return None
    return Sandwich(f"{parent_name}.{before.target}", f"{parent_name}.{after.target}")


def permute_neighbours(model: nn.Module, sandwich: Sandwich, groups: int) -> None:
    """The first 1×1's outputs into the split input order, the last's inputs into the output
    order (in place)."""
    first = model.get_submodule(sandwich.before)
    last = model.get_submodule(sandwich.after)
    channels = first.out_channels
    inputs = grouped_split.input_order(channels, groups)
    outputs = grouped_split.output_order(channels, groups)
    first.weight = nn.Parameter(first.weight.detach()[inputs].clone(), requires_grad=False)
    if first.bias is not None:
        first.bias = nn.Parameter(first.bias.detach()[inputs].clone(), requires_grad=False)
    last.weight = nn.Parameter(last.weight.detach()[:, outputs].clone(), requires_grad=False)


def split_group_channels(
    model: nn.Module,
    example: torch.Tensor,
    *,
    mode: str = "auto",
    repeats: int = 5,
    timings: TimingCache | None = None,
    native_extra_ms: float = 0.0,
) -> list[LayerChoice]:
    """Replace, in place, each grouped 3×3 that sits in a 1×1 sandwich by the split-order kernel
    (`grouped_split.SplitGroupedConv3x3`), its neighbours permuted, where that pays.

    Runs before `grouped_swap.swap_grouped_convs`, on the model's plain convolutions. 'auto'
    times the split kernel against oneDNN's convolution (prepacked, `PrepackedConv`, with
    `native_extra_ms` added: a replay leaves its C loop for it) and each of our other variants on the
    layer's real input shape and takes it where it is the fastest (the others are then left to
    `swap_grouped_convs`), except where the AMX grouped kernel runs, which the AMX fusion passes
    need; 'on' takes it wherever it runs; 'off' changes nothing. bf16 only.
    """
    check_mode("split_groups", mode)
    if mode == "off":
        return []
    reason = grouped_split.unavailable_reason()
    if example.dtype != torch.bfloat16:
        reason = f"the split kernels take bf16 activations, not {example.dtype}"
    names = [
        name
        for name, module in model.named_modules()
        if eligible(module)
        and grouped_split.supports(module.out_channels, module.groups, module.stride[0])
    ]
    if reason is not None:
        if mode == "on" and names:
            raise ConfigError(f"split_groups: 'on' but the split kernels cannot run here: {reason}")
        return []
    names = [name for name in names if find_sandwich(model, name) is not None]
    shapes = input_shapes(model, names, example)
    # one eviction buffer for the pass: each layer's ways timed with the caches emptied
    with cache_evictor() as evict:
        choices = []
        for name in names:
            if name not in shapes:  # never called on this input
                continue
            conv = model.get_submodule(name)
            variants = runnable_variants(conv, example.dtype)
            if "amx" in variants and mode != "on":
                # left to the AMX kernel: the fusion passes build whole bottlenecks on it, which
                # beat any grouped kernel alone (and the pair dot product is slow on those CPUs)
                continue
            split = grouped_split.SplitGroupedConv3x3(conv)
            others = [FastGroupedConv3x3(conv, dtype=example.dtype, variant=v) for v in variants]
            onednn = PrepackedConv(conv, False, False, shapes[name])
            ways = [onednn, split, *others]
            key = layer_key("grouped-split", shapes[name], example.dtype, conv, ",".join(variants))
            native_ms, split_ms, *times = time_ways_cold(
                ways, shapes[name], example.dtype, repeats, evict, timings, key
            )
            # again: an earlier swap may have traced its block
            sandwich = find_sandwich(model, name)
            fastest_other = min([native_ms + native_extra_ms, *times])
            if sandwich is None or (mode != "on" and split_ms >= fastest_other):
                continue
            permute_neighbours(model, sandwich, conv.groups)
            set_module(model, name, split)
            fused = fuse_following_relu(model, name)
            choices.append(
                LayerChoice(
                    name,
                    shapes[name],
                    native_ms,
                    split_ms,
                    "kernel+relu" if fused else "kernel",
                    "split",
                )
            )
    return choices
