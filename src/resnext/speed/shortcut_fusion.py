"""Fusing a bottleneck's projection shortcut into the kernel of its last 1×1 (bf16 and float32).

A block that changes width or resolution adds a 1×1 projection of its input (torchvision's
`downsample`) instead of the input itself. After `fuse_blocks`, oneDNN computes that projection
into a new tensor, which the block kernel then reads back as its residual and writes over. Both
the projection and the block's last 1×1 are 1×1 convolutions summed into one output, so the block
kernel can accumulate the projection's products onto the last 1×1's (`grouped_amx`'s
`block_amx_shortcut`): the shortcut's output never goes to memory, and one call replaces two. The
pass times each such block both ways on its real input shape and fuses where that is faster.
In float32 the same holds for our bf16×3 1×1s (`conv_x3`): the last 1×1 and the projection
become one product whose depth is both inputs' channels (`fuse_x3_shortcuts`), and in bf16 for
our pair-dot-product 1×1s on CPUs without AMX (`pointwise_gemm.conv1x1_shortcut`,
`fuse_dot_shortcuts`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import fx, nn

from resnext.speed import grouped_amx
from resnext.speed.block_fusion import FusedBlock
from resnext.speed.conv_x3_swap import ConvX3, DotConv1x1
from resnext.speed.fold import child_calls, install_graph, replace_nodes
from resnext.speed.grouped_swap import LayerChoice, check_mode, input_shapes, time_each_ms
from resnext.speed.kernel_module import KernelLeafTracer, KernelModule
from resnext.speed.pointwise_fusion import amx_1x1, onednn_conv, single_input
from resnext.speed.timing_cache import TimingCache, cached, layer_key


class ShortcutBlock(KernelModule):
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
        self.quads = block.quads
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
            self.quads,
        )

    def extra_repr(self) -> str:
        head = "1×1 → relu → " if self.pointwise is not None else ""
        return (
            f"{head}grouped 3×3 ({self.channels}, groups={self.groups}, "
            f"stride={self.stride}) → relu → 1×1 → {self.out_channels} → + 1×1 shortcut of the "
            f"input ({self.in_channels} → {self.out_channels}) → relu"
            + (", quads" if self.quads else "")
        )


def shortcut_fusable(block: nn.Module, conv: nn.Module) -> bool:
    """Whether the shortcut kernel computes `block` with `conv` as its projection shortcut."""
    return (
        isinstance(block, FusedBlock)
        and amx_1x1(conv, block.stride)
        and conv.out_channels == block.out_channels
    )


@dataclass(frozen=True)
class _Site:
    """A module (`main`) whose residual is a 1×1 projection (`shortcut`), children of `parent`."""

    parent: str
    main: str
    shortcut: str


Shape = tuple[int, ...]


@dataclass(frozen=True)
class _Kind:
    """What one of the two passes looks for: the module that adds the residual, the projection's
    module type, whether the two are fusable, and whether the kernel takes their input shapes
    (main's, the projection's)."""

    main: type[nn.Module]
    projection: type[nn.Module]
    fusable: Callable[[nn.Module, nn.Module], bool]
    fits: Callable[[Shape, Shape, nn.Module], bool]


def _projection_chain(
    node: object, modules: dict[str, nn.Module], kind: _Kind
) -> list[fx.Node] | None:
    """The nodes that compute `node` from one input: a projection module, then identities, each
    used only by the next, in graph order; None if it is anything else."""
    chain: list[fx.Node] = []
    while isinstance(node, fx.Node):
        module = modules.get(str(node.target)) if node.op == "call_module" else None
        if not isinstance(module, (nn.Identity, kind.projection)) or len(node.users) != 1:
            return None
        chain.insert(0, node)
        if isinstance(module, kind.projection):
            return chain if single_input(node) is not None else None
        node = single_input(node)
    return None


def _shortcut_chain(
    node: fx.Node, modules: dict[str, nn.Module], kind: _Kind
) -> list[fx.Node] | None:
    """The projection chain of a (main input, residual) call. Where a block's first 1×1 is
    fused in (`pointwise`), the projection must read the block's own input."""
    if len(node.args) != 2 or node.kwargs or not all(isinstance(a, fx.Node) for a in node.args):
        return None
    chain = _projection_chain(node.args[1], modules, kind)
    whole = getattr(modules[str(node.target)], "pointwise", None) is not None
    if chain is None or (whole and single_input(chain[0]) is not node.args[0]):
        return None
    return chain


def _sites(model: nn.Module, kind: _Kind) -> list[_Site]:
    sites = []
    mains = child_calls(model, lambda m: isinstance(m, kind.main), KernelLeafTracer)
    for parent_name, node, modules, calls in mains:
        chain = _shortcut_chain(node, modules, kind)
        if chain is None:
            continue
        main, conv = str(node.target), str(chain[0].target)
        once = calls[main] == 1 and calls[conv] == 1
        if once and kind.fusable(modules[main], modules[conv]):
            sites.append(_Site(parent_name, main, conv))
    return sites


def _fuse(model: nn.Module, site: _Site, fused: nn.Module, kind: _Kind) -> None:
    """Rewrite the parent's graph: one call of `fused` on the main module's input and the
    projection's input in place of the projection (and what follows it) and the main module."""
    parent = model.get_submodule(site.parent)
    graph = KernelLeafTracer().trace(parent)
    modules = dict(parent.named_modules())
    node = next(n for n in graph.nodes if n.op == "call_module" and n.target == site.main)
    chain = _shortcut_chain(node, modules, kind)
    assert chain is not None and chain[0].target == site.shortcut
    replace_nodes(graph, [*chain, node], site.main, (node.args[0], chain[0].args[0]))
    install_graph(model, site.parent, graph, site.main, fused)


Runner = Callable[[torch.Tensor, torch.Tensor], object]


def _run_pass(
    model: nn.Module,
    example: torch.Tensor,
    mode: str,
    repeats: int,
    kind: _Kind,
    ways: Callable[[nn.Module, nn.Module, Shape], tuple[Runner, nn.Module]],
    variant: str,
    timings: TimingCache | None,
) -> list[LayerChoice]:
    """Each site timed both ways on random inputs of its real shapes (in turns) and fused where
    that is faster (or always, 'on'). `ways(main, projection, projection input shape)` gives the
    separate way and the fused module, each called with (main input, projection input). With
    `timings`, times stored there are used instead of measured."""
    sites = _sites(model, kind)
    if not sites:
        return []
    names = [f"{s.parent}.{s.main}" for s in sites]
    projections = [f"{s.parent}.{s.shortcut}" for s in sites]
    shapes = input_shapes(model, names + projections, example)
    choices = []
    for site, name, projection in zip(sites, names, projections, strict=True):
        if name not in shapes or projection not in shapes:
            continue
        main, conv = model.get_submodule(name), model.get_submodule(projection)
        if not kind.fits(shapes[name], shapes[projection], conv):
            continue
        separate, fused = ways(main, conv, shapes[projection])
        same = getattr(main, "pointwise", None) is not None  # one input, read twice
        b_shape = None if same else shapes[projection]
        measure = functools.partial(
            _time_pair, separate, fused, shapes[name], b_shape, example.dtype, repeats
        )
        key = layer_key(variant, shapes[name], example.dtype, shapes[projection], same, main, conv)
        separate_ms, fused_ms = cached(timings, key, 2, measure)
        use = mode == "on" or fused_ms < separate_ms
        if use:
            _fuse(model, site, fused, kind)
        chosen = "fused" if use else "separate"
        choices.append(
            LayerChoice(name, tuple(shapes[name]), separate_ms, fused_ms, chosen, variant)
        )
    return choices


def _time_pair(
    separate: Runner,
    fused: nn.Module,
    shape: Shape,
    b_shape: Shape | None,
    dtype: torch.dtype,
    repeats: int,
) -> list[float]:
    """Both ways' ms on random inputs: (x, b) of the two shapes, or (x, x) if `b_shape` is None."""
    x = _random(shape, dtype)
    b = x if b_shape is None else _random(b_shape, dtype)
    return time_each_ms([lambda x: separate(x, b), lambda x: fused(x, b)], x, repeats)


def _random(shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
    return torch.randn(tuple(shape), dtype=dtype).contiguous(memory_format=torch.channels_last)


def _separate_runner(block: FusedBlock, conv: nn.Conv2d, input_size: Shape) -> Runner:
    """Called with (x, shortcut input): the projection as the frozen compiled graph runs it
    (`onednn_conv`: oneDNN, prepacked weight, into a new tensor), then the fused block on it."""
    project = onednn_conv(conv, input_size, relu=False)
    return lambda x, b: block(x, project(b))


def _same_pixels(main: Shape, projection: Shape, conv: nn.Module) -> bool:
    """The block kernel reads the projection's input at its own input's pixels."""
    return (main[0], *main[2:]) == (projection[0], *projection[2:])


_BLOCKS = _Kind(FusedBlock, nn.Conv2d, shortcut_fusable, _same_pixels)


def fuse_shortcuts(
    model: nn.Module,
    example: torch.Tensor,
    *,
    mode: str = "auto",
    repeats: int = 5,
    timings: TimingCache | None = None,
) -> list[LayerChoice]:
    """Replace, in place, each projection → `FusedBlock` pair by a `ShortcutBlock`.

    Run after `fuse_blocks`. `example` is the model's input (bf16, channels_last). 'auto' times
    each pair on its real input shape both ways (in turns) and fuses where that is faster; 'on'
    fuses every pair; 'off' changes nothing. Each choice is returned as a `LayerChoice` named
    after the block (native_ms: projection then block, kernel_ms: one call, chosen 'fused' or
    'separate', variant 'block+shortcut').
    """
    check_mode("fuse_block", mode)
    if mode == "off" or example.dtype != torch.bfloat16:
        return []

    def ways(block: nn.Module, conv: nn.Module, size: Shape) -> tuple[Runner, nn.Module]:
        assert isinstance(block, FusedBlock) and isinstance(conv, nn.Conv2d)
        return _separate_runner(block, conv, size), ShortcutBlock(block, conv)

    return _run_pass(model, example, mode, repeats, _BLOCKS, ways, "block+shortcut", timings)


class ShortcutConvX3(KernelModule):
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


def _strided_pixels(main: Shape, projection: Shape, conv: nn.Module) -> bool:
    """The last 1×1's input pixels are the projection's outputs."""
    s = conv.stride
    return (main[0], *main[2:]) == (projection[0], *((d - 1) // s + 1 for d in projection[2:]))


_X3 = _Kind(ConvX3, ConvX3, x3_shortcut_fusable, _strided_pixels)


def fuse_x3_shortcuts(
    model: nn.Module,
    example: torch.Tensor,
    *,
    mode: str = "auto",
    repeats: int = 5,
    timings: TimingCache | None = None,
) -> list[LayerChoice]:
    """Replace, in place, each float32 projection `ConvX3` → last 1×1 `ConvX3` pair (the
    projection the last 1×1's residual) by a `ShortcutConvX3`.

    Run after `swap_convs_x3`. `example` is the model's input (float32, channels_last). 'auto'
    times each pair both ways (in turns) and fuses where that is faster; 'on' fuses every pair;
    'off' changes nothing. Each choice is a `LayerChoice` named after the last 1×1 (native_ms:
    the two calls, kernel_ms: one, chosen 'fused' or 'separate', variant 'bf16x3+shortcut').
    """
    check_mode("conv_x3", mode)
    if mode == "off" or example.dtype != torch.float32:
        return []
    ways = _last_and_shortcut(ShortcutConvX3)
    return _run_pass(model, example, mode, repeats, _X3, ways, "bf16x3+shortcut", timings)


def _last_and_shortcut(
    fused: Callable[[nn.Module, nn.Module], nn.Module],
) -> Callable[[nn.Module, nn.Module, Shape], tuple[Runner, nn.Module]]:
    """`_run_pass`'s ways for a last 1×1 whose residual is its projection: the two modules one
    after the other, or `fused(last, shortcut)`."""

    def ways(last: nn.Module, shortcut: nn.Module, size: Shape) -> tuple[Runner, nn.Module]:
        return (lambda g, x: last(g, shortcut(x))), fused(last, shortcut)

    return ways


class ShortcutDotConv1x1(KernelModule):
    """``relu?(last(g) + shortcut(x))`` in bf16 as one pair-dot product (`pointwise_gemm`): a
    block's last 1×1 (`DotConv1x1`, the add's other operand its residual) and its 1×1 projection
    shortcut (`DotConv1x1`, read at its stride), their packed weights side by side along each
    strip's pairs."""

    def __init__(self, last: DotConv1x1, shortcut: DotConv1x1) -> None:
        super().__init__()
        if not dot_shortcut_fusable(last, shortcut):
            raise ValueError(
                "shortcut: expected a 1×1 DotConv1x1 without ReLU with "
                f"{last.out_channels} outputs, beside a stride-1 DotConv1x1, got {shortcut} "
                f"beside {last}"
            )
        self.packed = torch.cat([last.packed, shortcut.packed], dim=1).contiguous()
        self.bias = (last.bias + shortcut.bias).contiguous()
        self.stride, self.relu = shortcut.stride, last.relu
        self.channels = (last.in_channels, shortcut.in_channels, last.out_channels)

    def forward(self, g: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.resnext.pointwise_conv_bf16_shortcut(
            g, x, self.packed, self.bias, self.stride, self.relu
        )

    def extra_repr(self) -> str:
        c, cin, cout = self.channels
        relu = ", relu" if self.relu else ""
        return (
            f"1×1 {c} → {cout} + 1×1 shortcut {cin} → {cout} (stride {self.stride}), bf16 dot{relu}"
        )


def dot_shortcut_fusable(last: nn.Module, shortcut: nn.Module) -> bool:
    """Whether `pointwise_conv_bf16_shortcut` computes the 1×1 `last` plus the projection
    `shortcut` (both our bf16 pair-dot 1×1s, whose packings then line up)."""
    return (
        isinstance(last, DotConv1x1)
        and isinstance(shortcut, DotConv1x1)
        and last.stride == 1
        and not shortcut.relu
        and shortcut.out_channels == last.out_channels
    )


_DOT = _Kind(DotConv1x1, DotConv1x1, dot_shortcut_fusable, _strided_pixels)


def fuse_dot_shortcuts(
    model: nn.Module,
    example: torch.Tensor,
    *,
    mode: str = "auto",
    repeats: int = 5,
    timings: TimingCache | None = None,
) -> list[LayerChoice]:
    """Replace, in place, each bf16 projection `DotConv1x1` → last 1×1 `DotConv1x1` pair (the
    projection the last 1×1's residual) by a `ShortcutDotConv1x1`.

    Run after `swap_convs_dot`. `example` is the model's input (bf16, channels_last). 'auto'
    times each pair both ways (in turns) and fuses where that is faster; 'on' fuses every pair;
    'off' changes nothing. Each choice is a `LayerChoice` named after the last 1×1 (native_ms:
    the projection, then the last 1×1 over it in place; kernel_ms: one call; chosen 'fused' or
    'separate', variant 'dot+shortcut').
    """
    check_mode("pointwise_bf16", mode)
    # no DotConv1x1 (so no site) where swap_convs_dot could not run the kernel
    if mode == "off" or example.dtype != torch.bfloat16:
        return []
    ways = _last_and_shortcut(ShortcutDotConv1x1)
    return _run_pass(model, example, mode, repeats, _DOT, ways, "dot+shortcut", timings)
