"""Fusing each bottleneck's first 1×1 convolution into the AMX grouped 3×3 that consumes it.

On a machine bound by memory bandwidth, the 1×1's output (the bottleneck's width, twice
ResNet-50's at every stage) is written by one kernel and read back by the next. The fused kernel
(`grouped_amx.run_pointwise_kernel`) computes it per image into the zero-bordered grids the
grouped kernel reads, so it never goes to memory. The pass runs after `swap_grouped_convs` on a
BN-folded bf16 model, and times both ways per block: the unfused time is oneDNN's 1×1 with
prepacked weights and a fused ReLU (what the frozen compiled graph runs) plus our grouped kernel.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx, nn

from resnext.speed import grouped_amx
from resnext.speed.fold import child_calls, install_graph
from resnext.speed.grouped_swap import (
    FastGroupedConv3x3,
    LayerChoice,
    amx_form,
    check_mode,
    input_shapes,
    time_on_random,
)
from resnext.speed.kernel_module import KernelLeafTracer, KernelModule
from resnext.speed.prepacked import PrepackedConv
from resnext.speed.timing_cache import TimingCache, cached, layer_key


class FusedPointwiseGrouped(KernelModule):
    """``relu(conv1x1(x))`` then an AMX grouped 3×3 (`FastGroupedConv3x3`), in one kernel call.

    Holds both packed weights as plain attributes (as `FastGroupedConv3x3` does) so that a later
    ``.to(dtype)`` leaves them packed.
    """

    def __init__(self, pointwise: nn.Conv2d, grouped: FastGroupedConv3x3) -> None:
        super().__init__()
        if not fusable(pointwise, grouped):
            raise ValueError(
                f"pointwise: expected a 1×1 stride-1 convolution with a bias, a multiple of 32 "
                f"inputs and the grouped AMX convolution's {grouped.channels} outputs, got "
                f"{pointwise} before {grouped}"
            )
        self.in_channels = pointwise.in_channels
        self.pointwise = grouped_amx.pack_pointwise(pointwise.weight)
        assert pointwise.bias is not None  # fusable() checked it
        self.pointwise_bias = pointwise.bias.detach().float().contiguous()
        self.packed, self.bias = grouped.packed, grouped.bias
        self.groups, self.stride, self.relu = grouped.groups, grouped.stride, grouped.relu
        self.channels = grouped.channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.resnext.pointwise_grouped_conv3x3_amx(
            x,
            self.pointwise,
            self.pointwise_bias,
            self.packed,
            self.bias,
            self.groups,
            self.stride,
            self.relu,
        )

    def extra_repr(self) -> str:
        relu = ", relu=True" if self.relu else ""
        return (
            f"{self.in_channels} → 1×1 → relu → {self.channels}, groups={self.groups}, "
            f"stride={self.stride}{relu}"
        )


def amx_1x1(conv: nn.Module, stride: int = 1) -> bool:
    """Whether `conv` is a 1×1 convolution at `stride` that the AMX kernels compute from
    `grouped_amx.pack_pointwise` (groups 1, no padding, a bias, inputs a multiple of 32 and
    outputs of 16)."""
    return (
        isinstance(conv, nn.Conv2d)
        and conv.kernel_size == (1, 1)
        and conv.stride == (stride, stride)
        and conv.padding == (0, 0)
        and conv.dilation == (1, 1)
        and conv.groups == 1
        and conv.bias is not None
        and conv.in_channels % 32 == 0
        and conv.out_channels % 16 == 0
    )


def fusable(pointwise: nn.Module, grouped: nn.Module | None) -> bool:
    """Whether the fused kernel computes `grouped`(relu(`pointwise`(x))) for these two modules."""
    return (
        isinstance(grouped, FastGroupedConv3x3)
        and grouped.variant == "amx"
        and amx_1x1(pointwise)
        and pointwise.out_channels == grouped.channels
    )


@dataclass(frozen=True)
class _Site:
    """One 1×1 → (identities) → ReLU → grouped chain inside a traced parent module."""

    parent: str
    pointwise: str  # child names within the parent
    grouped: str


def single_input(node: fx.Node) -> fx.Node | None:
    """The node's one tensor input, if it has exactly one argument and no keyword arguments."""
    if len(node.args) != 1 or node.kwargs or not isinstance(node.args[0], fx.Node):
        return None
    return node.args[0]


def is_relu(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """Whether the node applies a ReLU (an nn.ReLU module or the relu function)."""
    if node.op == "call_module":
        return isinstance(modules.get(str(node.target)), nn.ReLU)
    return node.op == "call_function" and node.target in (F.relu, torch.relu)


def _chain_to_pointwise(node: fx.Node, modules: dict[str, nn.Module]) -> list[fx.Node] | None:
    """From the grouped conv's input back to a 1×1 conv: [relu, identities..., conv], each used
    only by the next, or None if the input is not such a chain."""
    chain = []
    src = single_input(node)
    seen_relu = False
    while src is not None and len(src.users) == 1:
        chain.append(src)
        module = modules.get(src.target) if src.op == "call_module" else None
        if is_relu(src, modules) and not seen_relu:
            seen_relu = True
        elif isinstance(module, nn.Identity):
            pass
        elif isinstance(module, nn.Conv2d) and seen_relu:
            return chain
        else:
            return None
        src = single_input(src)
    return None


def _sites(model: nn.Module) -> list[_Site]:
    sites = []
    # the grouped convolutions with an AMX form: only those can take a 1×1 in front
    grouped_calls = child_calls(model, lambda m: amx_form(m) is not None, KernelLeafTracer)
    for parent_name, node, modules, calls in grouped_calls:
        chain = _chain_to_pointwise(node, modules)
        if chain is None:
            continue
        conv = chain[-1].target
        if calls[conv] == 1 and fusable(modules[conv], amx_form(modules[str(node.target)])):
            sites.append(_Site(parent_name, conv, node.target))
    return sites


def _fuse(model: nn.Module, site: _Site, fused: FusedPointwiseGrouped) -> None:
    """Rewrite the parent's graph: the grouped node reads the 1×1's input; the chain is dropped."""
    parent = model.get_submodule(site.parent)
    graph = KernelLeafTracer().trace(parent)
    modules = dict(parent.named_modules())
    node = next(n for n in graph.nodes if n.op == "call_module" and n.target == site.grouped)
    chain = _chain_to_pointwise(node, modules)
    assert chain is not None and chain[-1].target == site.pointwise
    node.args = (chain[-1].args[0],)
    for dead in chain:  # the ReLU first: each is used only by the next node up the chain
        graph.erase_node(dead)
    install_graph(model, site.parent, graph, site.grouped, fused)


def onednn_conv(
    conv: nn.Conv2d, input_size: Sequence[int], *, relu: bool
) -> Callable[[torch.Tensor], torch.Tensor]:
    """A convolution (then its ReLU, if `relu`) as the frozen compiled graph runs it, for the
    choosers to time: a `PrepackedConv`, oneDNN's fused operator on the weight prepacked for
    inputs of `input_size`, into a new tensor (eager conv2d where that operator is missing)."""
    return PrepackedConv(conv, relu, False, tuple(input_size))


def _unfused_runner(
    conv: nn.Conv2d, grouped: FastGroupedConv3x3, input_size: Sequence[int]
) -> Callable[[torch.Tensor], object]:
    """The 1×1 and its ReLU as the frozen compiled graph runs them, then our grouped kernel."""
    pointwise = onednn_conv(conv, input_size, relu=True)
    return lambda x: grouped(pointwise(x))


def _time_chain(
    conv: nn.Module, grouped: nn.Module, fused: nn.Module, shape: tuple, repeats: int
) -> list[float]:
    """The chain's ms unfused and fused, on a random bf16 input of `shape`."""
    return time_on_random(
        [_unfused_runner(conv, grouped, shape), fused], shape, torch.bfloat16, repeats
    )


def fuse_pointwise_convs(
    model: nn.Module,
    example: torch.Tensor,
    *,
    mode: str = "auto",
    repeats: int = 5,
    timings: TimingCache | None = None,
) -> list[LayerChoice]:
    """Replace, in place, each 1×1 → ReLU → AMX grouped 3×3 chain by `FusedPointwiseGrouped`.

    `example` is the model's input (bf16, channels_last). 'auto' times the chain both ways on its
    real input shape and fuses where the fused kernel is faster; 'on' fuses every chain; 'off'
    changes nothing. Each choice is returned as a `LayerChoice` named after the grouped conv
    (native_ms: unfused, kernel_ms: fused, chosen 'fused' or 'separate'). With `timings`, times
    stored there are used instead of measured.
    """
    check_mode("fuse_pointwise", mode)
    if mode == "off" or example.dtype != torch.bfloat16:
        return []
    sites = _sites(model)
    if not sites:
        return []
    names = [f"{s.parent}.{s.pointwise}" for s in sites]
    shapes = input_shapes(model, names, example)
    choices = []
    for site, name in zip(sites, names, strict=True):
        if name not in shapes:
            continue
        conv = model.get_submodule(name)
        grouped_name = f"{site.parent}.{site.grouped}"
        grouped = model.get_submodule(grouped_name)
        amx = amx_form(grouped)
        assert amx is not None  # _sites checked it
        fused = FusedPointwiseGrouped(conv, amx)
        shape = shapes[name]
        measure = functools.partial(_time_chain, conv, grouped, fused, shape, repeats)
        key = layer_key("pointwise+grouped", shape, torch.bfloat16, conv, grouped)
        separate_ms, fused_ms = cached(timings, key, 2, measure)
        use = mode == "on" or fused_ms < separate_ms
        if use:
            _fuse(model, site, fused)
        choices.append(
            LayerChoice(
                grouped_name,
                shapes[name],
                separate_ms,
                fused_ms,
                "fused" if use else "separate",
                "amx",
            )
        )
    return choices
