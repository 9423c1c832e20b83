"""Fusing a bottleneck's projection shortcut into the kernel of its last 1×1 (bf16 and float32).

A block that changes width or resolution adds a 1×1 projection of its input (torchvision's
`downsample`) instead of the input itself. After `fuse_blocks`, oneDNN computes that projection
into a new tensor, which the block kernel then reads back as its residual and writes over. Both
the projection and the block's last 1×1 are 1×1 convolutions summed into one output, so the block
kernel can accumulate the projection's products onto the last 1×1's (`grouped_amx`'s
`block_amx_shortcut`): the shortcut's output never goes to memory, and one call replaces two. The
pass times each such block both ways on its real input shape and fuses where that is faster.
In float32 the same holds for our bf16×3 1×1s (`conv_x3`): the last 1×1 and the projection
become one product whose depth is both inputs' channels (`fuse_x3_shortcuts`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import fx, nn

from resnext.errors import ConfigError
from resnext.speed import grouped_amx
from resnext.speed.block_fusion import BlockTracer, FusedBlock
from resnext.speed.conv_x3_swap import ConvX3, X3Tracer
from resnext.speed.fold import install_graph, module_call_counts
from resnext.speed.grouped_swap import MODES, LayerChoice, input_shapes, time_each_ms
from resnext.speed.pointwise_fusion import onednn_weights, single_input


class ShortcutBlock(nn.Module):
    """``relu(tail(head(x)) + shortcut(b))`` in one kernel call: a `FusedBlock` and the 1×1
    projection `shortcut` of the block's input b (x itself where the block's first 1×1 is fused
    in, else what that 1×1 read), whose products the kernel accumulates onto the last 1×1's."""

    def __init__(self, block: FusedBlock, shortcut: nn.Conv2d) -> None:
        super().__init__()
        if not shortcut_fusable(block, shortcut):
            raise ValueError(
                f"shortcut: expected a 1×1 convolution with a bias, stride {block.stride}, "
                f"{block.out_channels} outputs and inputs a multiple of 32, beside a fused "
                f"block, got {shortcut} beside {block}"
            )
        assert shortcut.bias is not None  # shortcut_fusable() checked it
        self.pointwise, self.pointwise_bias = block.pointwise, block.pointwise_bias
        self.packed, self.bias = block.packed, block.bias
        self.groups, self.stride, self.channels = block.groups, block.stride, block.channels
        self.tail, self.out_channels = block.tail, block.out_channels
        self.shortcut = grouped_amx.pack_pointwise(shortcut.weight)
        # one bias for the two 1×1s, both summed into the same output
        self.tail_bias = (block.tail_bias + shortcut.bias.detach().float()).contiguous()
        self.in_channels = shortcut.in_channels

    def forward(self, x: torch.Tensor, shortcut_input: torch.Tensor) -> torch.Tensor:
        return torch.ops.resnext.block_amx_shortcut(
            x,
            self.packed,
            self.bias,
            self.groups,
            self.stride,
            self.tail,
            self.tail_bias,
            self.shortcut,
            shortcut_input,
            self.pointwise,
            self.pointwise_bias,
        )

    def extra_repr(self) -> str:
        head = "1×1 → relu → " if self.pointwise is not None else ""
        return (
            f"{head}grouped 3×3 ({self.channels}, groups={self.groups}, "
            f"stride={self.stride}) → relu → 1×1 → {self.out_channels} → + 1×1 shortcut of the "
            f"input ({self.in_channels} → {self.out_channels}) → relu"
        )


def shortcut_fusable(block: nn.Module, conv: nn.Module) -> bool:
    """Whether the shortcut kernel computes `block` with `conv` as its projection shortcut."""
    return (
        isinstance(block, FusedBlock)
        and isinstance(conv, nn.Conv2d)
        and conv.kernel_size == (1, 1)
        and conv.stride == (block.stride, block.stride)
        and conv.padding == (0, 0)
        and conv.dilation == (1, 1)
        and conv.groups == 1
        and conv.bias is not None
        and conv.in_channels % 32 == 0
        and conv.out_channels == block.out_channels
    )


@dataclass(frozen=True)
class _Site:
    """A fused block whose residual is a 1×1 projection (of the block's input)."""

    parent: str
    block: str  # child names within the parent
    shortcut: str


def _shortcut_chain(block: fx.Node, modules: dict[str, nn.Module]) -> list[fx.Node] | None:
    """The nodes that compute the block's residual from one input (a Conv2d, then identities),
    each used only by the next, in graph order; None if the residual is anything else. Where the
    block's first 1×1 is fused in, that input must be the block's own."""
    if len(block.args) != 2 or block.kwargs or not all(isinstance(a, fx.Node) for a in block.args):
        return None
    x, residual = block.args
    chain = _projection_chain(residual, modules, nn.Conv2d)
    whole = modules[str(block.target)].pointwise is not None
    return chain if chain is not None and (single_input(chain[0]) is x or not whole) else None


def _sites(model: nn.Module) -> list[_Site]:
    sites = []
    parents = {n.rpartition(".")[0] for n, m in model.named_modules() if isinstance(m, FusedBlock)}
    for parent_name in sorted(parents - {""}):
        parent = model.get_submodule(parent_name)
        try:
            graph = BlockTracer().trace(parent)
        except Exception:  # fx raises many kinds of errors on untraceable code
            continue
        modules = dict(parent.named_modules())
        calls = module_call_counts(graph)
        for node in graph.nodes:
            block = modules.get(str(node.target)) if node.op == "call_module" else None
            if not isinstance(block, FusedBlock):
                continue
            chain = _shortcut_chain(node, modules)
            if chain is None:
                continue
            conv = str(chain[0].target)
            once = calls[str(node.target)] == 1 and calls[conv] == 1
            if once and shortcut_fusable(block, modules[conv]):
                sites.append(_Site(parent_name, str(node.target), conv))
    return sites


def _fuse(model: nn.Module, site: _Site, fused: ShortcutBlock) -> None:
    """Rewrite the parent's graph: one call of `fused` on the block's input in place of the
    projection and the block."""
    parent = model.get_submodule(site.parent)
    graph = BlockTracer().trace(parent)
    modules = dict(parent.named_modules())
    node = next(n for n in graph.nodes if n.op == "call_module" and n.target == site.block)
    chain = _shortcut_chain(node, modules)
    assert chain is not None and chain[0].target == site.shortcut
    with graph.inserting_before(node):
        call = graph.call_module(site.block, (node.args[0], chain[0].args[0]))
    node.replace_all_uses_with(call)
    graph.erase_node(node)
    for dead in reversed(chain):  # each is used only by the next one
        graph.erase_node(dead)
    install_graph(model, site.parent, graph, site.block, fused)


def _separate_runner(
    block: FusedBlock, conv: nn.Conv2d, input_size: Sequence[int]
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Called with (x, shortcut input): the projection as the frozen compiled graph runs it
    (oneDNN, prepacked weight, into a new tensor), then the fused block on it; eager conv2d
    where the prepacked op is missing."""
    weight, bias, packed = onednn_weights(conv, input_size=input_size)
    stride = list(conv.stride)

    def eager(x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.conv2d(x, weight, bias, stride).contiguous(
            memory_format=torch.channels_last
        )

    def onednn(x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._convolution_pointwise(
            x, packed, bias, [0, 0], stride, [1, 1], 1, "none", [None], ""
        )

    project = eager
    if packed is not None:
        try:
            probe = torch.zeros(1, conv.in_channels, 4, 4, dtype=torch.bfloat16)
            onednn(probe.contiguous(memory_format=torch.channels_last))
            project = onednn
        except (AttributeError, RuntimeError, NotImplementedError):
            pass
    return lambda x, b: block(x, project(b))


def fuse_shortcuts(
    model: nn.Module, example: torch.Tensor, *, mode: str = "auto", repeats: int = 5
) -> list[LayerChoice]:
    """Replace, in place, each projection → `FusedBlock` pair by a `ShortcutBlock`.

    Run after `fuse_blocks`. `example` is the model's input (bf16, channels_last). 'auto' times
    each pair on its real input shape both ways (in turns) and fuses where that is faster; 'on'
    fuses every pair; 'off' changes nothing. Each choice is returned as a `LayerChoice` named
    after the block (native_ms: projection then block, kernel_ms: one call, chosen 'fused' or
    'separate', variant 'block+shortcut').
    """
    if mode not in MODES:
        raise ConfigError(f"fuse_block: expected one of {MODES}, got {mode!r}")
    if mode == "off" or example.dtype != torch.bfloat16:
        return []
    sites = _sites(model)
    if not sites:
        return []
    names = [f"{s.parent}.{s.block}" for s in sites]
    projections = [f"{s.parent}.{s.shortcut}" for s in sites]
    shapes = input_shapes(model, names + projections, example)
    choices = []
    for site, name, projection in zip(sites, names, projections, strict=True):
        if name not in shapes or projection not in shapes:
            continue
        (n, _, h, w), (nb, _, hb, wb) = shapes[name], shapes[projection]
        if (n, h, w) != (nb, hb, wb):  # the kernel reads both at the same pixels
            continue
        block = model.get_submodule(name)
        conv = model.get_submodule(projection)
        fused = ShortcutBlock(block, conv)
        x = _bf16(shapes[name])
        b = x if block.pointwise is not None else _bf16(shapes[projection])
        separate = _separate_runner(block, conv, b.shape)
        separate_ms, fused_ms = time_each_ms(
            [
                lambda x, b=b, separate=separate: separate(x, b),
                lambda x, b=b, fused=fused: fused(x, b),
            ],
            x,
            repeats,
        )
        use = mode == "on" or fused_ms < separate_ms
        if use:
            _fuse(model, site, fused)
        chosen = "fused" if use else "separate"
        choices.append(
            LayerChoice(name, tuple(x.shape), separate_ms, fused_ms, chosen, "block+shortcut")
        )
    return choices


def _bf16(shape: Sequence[int]) -> torch.Tensor:
    return torch.randn(tuple(shape), dtype=torch.bfloat16).contiguous(
        memory_format=torch.channels_last
    )


class ShortcutConvX3(nn.Module):
    """``relu?(last(g) + shortcut(x))`` in float32 as one bf16×3 product: a block's last 1×1
    (`ConvX3`, the add's other operand its residual) and its 1×1 projection shortcut (`ConvX3`),
    their packed weights side by side along the product's depth."""

    def __init__(self, last: ConvX3, shortcut: ConvX3) -> None:
        super().__init__()
        if not x3_shortcut_fusable(last, shortcut):
            raise ValueError(
                "shortcut: expected a 1×1 ConvX3 without ReLU or residual, with "
                f"{last.out_channels} outputs and inputs a multiple of 32, beside a stride-1 "
                f"1×1 ConvX3, got {shortcut} beside {last}"
            )
        self.packed = torch.cat([last.packed, shortcut.packed], dim=1).contiguous()
        self.bias = (last.bias + shortcut.bias).contiguous()
        self.stride, self.relu = shortcut.stride, last.relu
        self.channels = (last.in_channels, shortcut.in_channels, last.out_channels)

    def forward(self, g: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.resnext.conv_x3_shortcut(
            g, self.packed, self.bias, x, self.stride, self.relu
        )

    def extra_repr(self) -> str:
        c, cin, cout = self.channels
        return f"1×1 {c} → {cout} + 1×1 shortcut {cin} → {cout} (stride {self.stride}), bf16x3" + (
            ", relu" if self.relu else ""
        )


def x3_shortcut_fusable(last: nn.Module, shortcut: nn.Module) -> bool:
    """Whether `conv_x3_shortcut` computes the 1×1 `last` plus the 1×1 projection `shortcut`."""
    return (
        isinstance(last, ConvX3)
        and isinstance(shortcut, ConvX3)
        and last.kernel == 1
        and last.stride == 1
        and shortcut.kernel == 1
        and shortcut.padding == 0
        and not shortcut.relu
        and shortcut.in_channels % 32 == 0
        and shortcut.out_channels == last.out_channels
    )


@dataclass(frozen=True)
class _X3Site:
    """A float32 last 1×1 whose residual is a 1×1 projection, both on our kernel."""

    parent: str
    last: str  # child names within the parent
    shortcut: str


def _x3_sites(model: nn.Module) -> list[_X3Site]:
    sites = []
    parents = {n.rpartition(".")[0] for n, m in model.named_modules() if isinstance(m, ConvX3)}
    for parent_name in sorted(parents - {""}):
        parent = model.get_submodule(parent_name)
        try:
            graph = X3Tracer().trace(parent)
        except Exception:  # fx raises many kinds of errors on untraceable code
            continue
        modules = dict(parent.named_modules())
        calls = module_call_counts(graph)
        for node in graph.nodes:
            last = modules.get(str(node.target)) if node.op == "call_module" else None
            if not isinstance(last, ConvX3) or len(node.args) != 2:
                continue
            chain = _projection_chain(node.args[1], modules, ConvX3)
            if chain is None:
                continue
            conv = str(chain[0].target)
            once = calls[str(node.target)] == 1 and calls[conv] == 1
            if once and x3_shortcut_fusable(last, modules[conv]):
                sites.append(_X3Site(parent_name, str(node.target), conv))
    return sites


def _projection_chain(
    node: object, modules: dict[str, nn.Module], conv_type: type[nn.Module]
) -> list[fx.Node] | None:
    """The nodes that compute `node` from one input: a `conv_type` module, then identities, each
    used only by the next, in graph order; None if it is anything else."""
    chain: list[fx.Node] = []
    while isinstance(node, fx.Node):
        module = modules.get(str(node.target)) if node.op == "call_module" else None
        if not isinstance(module, (nn.Identity, conv_type)) or len(node.users) != 1:
            return None
        chain.insert(0, node)
        if isinstance(module, conv_type):
            return chain if single_input(node) is not None else None
        node = single_input(node)
    return None


def _x3_fuse(model: nn.Module, site: _X3Site, fused: ShortcutConvX3) -> None:
    parent = model.get_submodule(site.parent)
    graph = X3Tracer().trace(parent)
    modules = dict(parent.named_modules())
    node = next(n for n in graph.nodes if n.op == "call_module" and n.target == site.last)
    chain = _projection_chain(node.args[1], modules, ConvX3)
    assert chain is not None and chain[0].target == site.shortcut
    with graph.inserting_before(node):
        call = graph.call_module(site.last, (node.args[0], chain[0].args[0]))
    node.replace_all_uses_with(call)
    graph.erase_node(node)
    for dead in reversed(chain):  # each is used only by the next one
        graph.erase_node(dead)
    install_graph(model, site.parent, graph, site.last, fused)


def fuse_x3_shortcuts(
    model: nn.Module, example: torch.Tensor, *, mode: str = "auto", repeats: int = 5
) -> list[LayerChoice]:
    """Replace, in place, each float32 projection `ConvX3` → last 1×1 `ConvX3` pair (the
    projection the last 1×1's residual) by a `ShortcutConvX3`.

    Run after `swap_convs_x3`. `example` is the model's input (float32, channels_last). 'auto'
    times each pair both ways (in turns) and fuses where that is faster; 'on' fuses every pair;
    'off' changes nothing. Each choice is a `LayerChoice` named after the last 1×1 (native_ms:
    the two calls, kernel_ms: one, chosen 'fused' or 'separate', variant 'bf16x3+shortcut').
    """
    if mode not in MODES:
        raise ConfigError(f"conv_x3: expected one of {MODES}, got {mode!r}")
    if mode == "off" or example.dtype != torch.float32:
        return []
    sites = _x3_sites(model)
    if not sites:
        return []
    names = [f"{s.parent}.{s.last}" for s in sites]
    projections = [f"{s.parent}.{s.shortcut}" for s in sites]
    shapes = input_shapes(model, names + projections, example)
    choices = []
    for site, name, projection in zip(sites, names, projections, strict=True):
        if name not in shapes or projection not in shapes:
            continue
        last, shortcut = model.get_submodule(name), model.get_submodule(projection)
        fused = ShortcutConvX3(last, shortcut)
        g = torch.randn(shapes[name]).contiguous(memory_format=torch.channels_last)
        x = torch.randn(shapes[projection]).contiguous(memory_format=torch.channels_last)
        separate_ms, fused_ms = time_each_ms(
            [
                lambda g, x=x, last=last, shortcut=shortcut: last(g, shortcut(x)),
                lambda g, x=x, fused=fused: fused(g, x),
            ],
            g,
            repeats,
        )
        use = mode == "on" or fused_ms < separate_ms
        if use:
            _x3_fuse(model, site, fused)
        chosen = "fused" if use else "separate"
        choices.append(
            LayerChoice(name, tuple(g.shape), separate_ms, fused_ms, chosen, "bf16x3+shortcut")
        )
    return choices
