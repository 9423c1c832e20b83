"""Fusing the rest of each bottleneck (grouped 3×3, last 1×1, residual add, ReLU) into one kernel.

After `fuse_pointwise_convs`, a bottleneck still writes its grouped convolution's output (the
bottleneck width, twice ResNet-50's) to memory for the last 1×1 to read back, and oneDNN's 1×1
then reads the residual and writes the block's output. The block kernel
(`grouped_amx.run_block_kernel`) computes the last 1×1 on the grouped output while it is in
cache, adds the residual and applies the ReLU in the same pass. The pass runs after the 1×1
fusion, so a block's head is either the fused 1×1 + grouped module or the grouped module alone;
it times each block both ways, the unfused way being the head followed by oneDNN's 1×1 with a
prepacked weight and the add and ReLU fused into it (what the frozen compiled graph runs).
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch
from torch import fx, nn

from resnext.speed import grouped_amx, grouped_quads
from resnext.speed.fold import child_calls, install_graph, parents_of, replace_nodes
from resnext.speed.grouped_kernel import output_for
from resnext.speed.grouped_swap import (
    FastGroupedConv3x3,
    LayerChoice,
    amx_form,
    check_mode,
    input_shapes,
    time_each_ms,
)
from resnext.speed.kernel_module import KernelLeafTracer, KernelModule
from resnext.speed.pointwise_fusion import (
    FusedPointwiseGrouped,
    amx_1x1,
    is_relu,
    single_input,
)
from resnext.speed.prepacked import PrepackedConv
from resnext.speed.timing_cache import TimingCache, cached, layer_key

ADDS = (operator.add, operator.iadd, torch.add)


class FusedBlock(KernelModule):
    """``relu(tail(head(x)) + residual)`` in one kernel call, for an AMX grouped head (with or
    without its 1×1 fused in front) that applies its ReLU, and a 1×1 `tail` convolution.

    With `in_place` the result is written over `residual` (as oneDNN's 1×1 adds into its
    residual), which must then be dead after this call: the fusion pass sets it only where the
    graph shows that. With `quads` the grouped convolution runs in the quads form
    (`grouped_quads`: 4 or 8 channels per group, stride 1), repacked from the head's weight.
    Holds the packed weights as plain attributes (as `FastGroupedConv3x3` does) so that a later
    ``.to(dtype)`` leaves them packed.
    """

    def __init__(
        self,
        head: FusedPointwiseGrouped | FastGroupedConv3x3,
        tail: nn.Conv2d,
        in_place: bool = False,
        quads: bool = False,
    ) -> None:
        super().__init__()
        if not block_fusable(head, tail):
            raise ValueError(
                f"tail: expected a 1×1 stride-1 convolution with a bias and {head.channels} "
                f"inputs (a multiple of 32), after an AMX grouped convolution with its ReLU, got "
                f"{tail} after {head}"
            )
        fused_pointwise = isinstance(head, FusedPointwiseGrouped)
        self.pointwise = head.pointwise if fused_pointwise else None
        self.pointwise_bias = head.pointwise_bias if fused_pointwise else None
        self.packed, self.bias = head.packed, head.bias
        self.groups, self.stride, self.channels = head.groups, head.stride, head.channels
        if quads:
            if not grouped_quads.supports(self.channels, self.groups, self.stride):
                raise ValueError(
                    f"quads: the quads form takes 4 or 8 channels per group at stride 1, not "
                    f"{self.channels} channels in {self.groups} groups at stride {self.stride}"
                )
            weight = grouped_amx.unpack_weights(head.packed, self.channels, self.groups)
            self.packed = grouped_quads.pack_weights(weight, self.groups)
        self.quads = quads
        self.tail = grouped_amx.pack_pointwise(tail.weight)
        assert tail.bias is not None  # block_fusable() checked it
        self.tail_bias = tail.bias.detach().float().contiguous()
        self.out_channels = tail.out_channels
        self.in_place = in_place

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        args = (
            self.packed,
            self.bias,
            self.groups,
            self.stride,
            self.tail,
            self.tail_bias,
            residual,
            self.pointwise,
            self.pointwise_bias,
            self.quads,
        )
        if self.in_place:
            torch.ops.resnext.block_amx_(None if x is residual else x, *args)
            return residual
        return torch.ops.resnext.block_amx(x, *args)

    def extra_repr(self) -> str:
        head = "1×1 → relu → " if self.pointwise is not None else ""
        return (
            f"{head}grouped 3×3 ({self.channels}, groups={self.groups}, stride={self.stride}) → "
            f"relu → 1×1 → {self.out_channels} → + residual → relu"
            + (", in place" if self.in_place else "")
            + (", quads" if self.quads else "")
        )


def block_fusable(head: nn.Module, tail: nn.Module) -> bool:
    """Whether the block kernel computes ``tail(head(x))`` for these two modules."""
    amx_head = isinstance(head, FusedPointwiseGrouped) or (
        isinstance(head, FastGroupedConv3x3) and head.variant == "amx"
    )
    return (
        amx_head
        and bool(head.relu)
        and head.bias is not None
        and amx_1x1(tail)
        and tail.in_channels == head.channels
    )


@dataclass(frozen=True)
class _Site:
    """One head → (identities) → 1×1 → (identities) → add → ReLU chain in a traced parent."""

    parent: str
    head: str  # child names within the parent
    tail: str
    residual_is_input: bool  # the add's other operand is the head's own input
    overwritable: bool  # the residual is dead after the add, so the block may write over it


@dataclass(frozen=True)
class _Chain:
    """The nodes after a head that the block kernel replaces, and the add's other operand."""

    nodes: list[fx.Node]  # in graph order, the final ReLU last
    tail: fx.Node
    residual: fx.Node


def _chain_after(head: fx.Node, modules: dict[str, nn.Module]) -> _Chain | None:
    """From the head forward: identities, a Conv2d, identities, an add of one other tensor and a
    ReLU, each the only user of the one before, or None if the head is not followed by that."""
    nodes: list[fx.Node] = []
    tail = None
    node = head
    while len(node.users) == 1:
        user = next(iter(node.users))
        module = modules.get(str(user.target)) if user.op == "call_module" else None
        if isinstance(module, (nn.Identity, nn.Conv2d)) and single_input(user) is node:
            if isinstance(module, nn.Conv2d):
                if tail is not None:
                    return None
                tail = user
            nodes.append(user)
        elif tail is not None and user.op == "call_function" and user.target in ADDS:
            if user.kwargs or len(user.args) != 2 or list(user.args).count(node) != 1:
                return None
            residual = user.args[1] if user.args[0] is node else user.args[0]
            if not isinstance(residual, fx.Node) or len(user.users) != 1:
                return None
            relu = next(iter(user.users))
            if not is_relu(relu, modules) or single_input(relu) is not user:
                return None
            return _Chain([*nodes, user, relu], tail, residual)
        else:
            return None
        node = user
    return None


def _amx_head(module: nn.Module | None) -> FusedPointwiseGrouped | FastGroupedConv3x3 | None:
    """The head the block kernel would run for `module` (its AMX form), or None."""
    return module if isinstance(module, FusedPointwiseGrouped) else amx_form(module)


def dead_after(residual: fx.Node, add: fx.Node) -> bool:
    """Whether nothing in the graph reads `residual` after `add` (every other user comes first)."""
    order = {node: i for i, node in enumerate(add.graph.nodes)}
    return all(order[user] < order[add] for user in residual.users if user is not add)


class _ParentTracer(KernelLeafTracer):
    """Traces the whole model with the given submodules as single calls."""

    def __init__(self, leaves: set[str]) -> None:
        super().__init__()
        self.leaves = leaves

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return module_qualified_name in self.leaves or super().is_leaf_module(
            m, module_qualified_name
        )


def inputs_consumed(model: nn.Module, parents: set[str]) -> set[str]:
    """The parents whose input the model uses only as that parent's input, and which is not the
    model's own input (the caller's tensor): a parent may overwrite such an input. Empty where the
    model does not trace."""
    try:
        graph = _ParentTracer(parents).trace(model)
    except Exception:  # fx raises many kinds of errors on untraceable code
        return set()
    consumed: dict[str, bool] = {}  # a parent called more than once must qualify at every call
    for node in graph.nodes:
        if node.op == "call_module" and node.target in parents:
            arg = node.args[0] if node.args else None
            ok = isinstance(arg, fx.Node) and arg.op != "placeholder" and len(arg.users) == 1
            consumed[str(node.target)] = consumed.get(str(node.target), True) and ok
    return {name for name, ok in consumed.items() if ok}


def _sites(model: nn.Module) -> list[_Site]:
    sites = []
    consumed = inputs_consumed(model, parents_of(model, _amx_head))
    for parent_name, node, modules, calls in child_calls(model, _amx_head, KernelLeafTracer):
        head = _amx_head(modules[str(node.target)])
        chain = _chain_after(node, modules) if single_input(node) is not None else None
        if head is None or chain is None:
            continue
        tail_name = str(chain.tail.target)
        once = calls[str(node.target)] == 1 and calls[tail_name] == 1
        if once and block_fusable(head, modules[tail_name]):
            same = chain.residual is node.args[0]
            overwritable = dead_after(chain.residual, chain.nodes[-2]) and (
                chain.residual.op != "placeholder" or parent_name in consumed
            )
            sites.append(_Site(parent_name, str(node.target), tail_name, same, overwritable))
    return sites


def _fuse(model: nn.Module, site: _Site, fused: FusedBlock) -> None:
    """Rewrite the parent's graph: one call of `fused` on the head's input and the residual in
    place of the head, the 1×1, the add and the ReLU."""
    parent = model.get_submodule(site.parent)
    graph = KernelLeafTracer().trace(parent)
    modules = dict(parent.named_modules())
    head = next(n for n in graph.nodes if n.op == "call_module" and n.target == site.head)
    chain = _chain_after(head, modules)
    assert chain is not None and chain.tail.target == site.tail
    replace_nodes(graph, [head, *chain.nodes], site.head, (head.args[0], chain.residual))
    install_graph(model, site.parent, graph, site.head, fused)


def _separate_runner(
    head: nn.Module, tail: nn.Conv2d, tail_input: Sequence[int]
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The head, then the 1×1 as the frozen compiled graph runs it: a `PrepackedConv`, oneDNN
    with the weight prepacked and the add and ReLU fused, written over the residual (eager
    conv2d, add and relu where the prepacked operator is missing)."""
    last = PrepackedConv(tail, True, True, tuple(tail_input))
    return lambda x, residual: last(head(x), residual)


def _channels_last(shape: tuple[int, ...]) -> torch.Tensor:
    return torch.randn(shape, dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last)


def fuse_blocks(
    model: nn.Module,
    example: torch.Tensor,
    *,
    mode: str = "auto",
    in_place: bool = True,
    repeats: int = 5,
    timings: TimingCache | None = None,
) -> list[LayerChoice]:
    """Replace, in place, each AMX grouped head → 1×1 → add → ReLU chain by `FusedBlock`.

    Run after `fuse_pointwise_convs`. `example` is the model's input (bf16, channels_last).
    'auto' times each chain on its real input shape unfused, fused, and fused writing over the
    residual (where the graph shows the residual dead after the block), each fused way also with
    the grouped convolution in the quads form where that runs here (4 or 8 channels per group,
    stride 1), and keeps the fastest; 'on' fuses every chain (in place where allowed, the
    block-diagonal form); 'off' changes nothing. Each choice is returned as a `LayerChoice` named
    after the head (native_ms: unfused, kernel_ms: the fused way kept, chosen 'fused' or
    'separate', variant 'block' or 'block-in-place', with '-quads' for the quads form).
    Whether to fuse is decided on the block-diagonal form's times; the quads form only runs a
    block that is fused anyway, where it is faster (alone, fused stage-1 blocks look faster than
    they are in the network, and the quads form's gain would tip them).

    `in_place` False never writes over the residual: for graphs that a later pass may rewrite
    without honouring the mutation (torch.jit.optimize_for_inference computes wrong results).
    The timed inputs are overwritten in place by the in-place runs, so their values drift from
    call to call; only the time is kept. With `timings`, times stored there are used instead of
    measured.
    """
    check_mode("fuse_block", mode)
    if mode == "off" or example.dtype != torch.bfloat16:
        return []
    sites = _sites(model)
    if not sites:
        return []
    names = [f"{s.parent}.{s.head}" for s in sites]
    shapes = input_shapes(model, names, example)
    choices = []
    for site, name in zip(sites, names, strict=True):
        if name not in shapes:
            continue
        head = model.get_submodule(name)
        tail = model.get_submodule(f"{site.parent}.{site.tail}")
        if not in_place:
            site = replace(site, overwritable=False)
        choice, fused = _choose(site, name, head, tail, shapes[name], mode, repeats, timings)
        if choice.chosen == "fused":
            _fuse(model, site, fused)
        choices.append(choice)
    return choices


def _choose(
    site: _Site,
    name: str,
    head: nn.Module,
    tail: nn.Conv2d,
    shape: tuple[int, ...],
    mode: str,
    repeats: int,
    timings: TimingCache | None,
) -> tuple[LayerChoice, FusedBlock]:
    """The timings of one chain's ways and the fused module of the faster fused way. A fused way
    is (in place, quads form): in place where the residual may be overwritten, the quads form
    where it runs here and takes the convolution."""
    amx = _amx_head(head)
    assert amx is not None  # _sites checked it
    forms = {False: FusedBlock(amx, tail)}
    # 'on' runs the block-diagonal form untimed: no quads repack for it
    if (
        mode == "auto"
        and grouped_quads.unavailable_reason() is None
        and grouped_quads.supports(amx.channels, amx.groups, amx.stride)
    ):
        forms[True] = FusedBlock(amx, tail, quads=True)
    places = (False, True) if site.overwritable else (False,)
    ways = [(in_place, quads) for quads in forms for in_place in places]

    def measure() -> list[float]:
        x = _channels_last(shape)
        out = output_for(x, head.stride, tail.out_channels).shape
        residual = x if site.residual_is_input and x.shape == out else _channels_last(tuple(out))
        separate = _separate_runner(head, tail, (out[0], tail.in_channels, out[2], out[3]))

        def fused_run(in_place: bool, quads: bool) -> Callable[[torch.Tensor], object]:
            fused = forms[quads]

            def run(x: torch.Tensor) -> object:
                fused.in_place = in_place
                return fused(x, residual)

            return run

        ways_run = [lambda x: separate(x, residual), *(fused_run(*w) for w in ways)]
        return time_each_ms(ways_run, x, repeats)

    key = layer_key("block", shape, torch.bfloat16, head, tail, site.residual_is_input, ways)
    separate_ms, *times = cached(timings, key, 1 + len(ways), measure)
    timed = dict(zip(ways, times, strict=True))
    # Whether to fuse is decided on the block-diagonal form's times alone, as before the quads
    # form: its faster layer times would tip more blocks to fusion, and alone the fused stage-1
    # blocks look faster than they are in the network (there, fusing them made the batch 1.04×
    # slower). Where a block is fused, the faster form runs it.
    plain = min((w for w in ways if not w[1]), key=timed.__getitem__)
    chosen = "fused" if mode == "on" or timed[plain] < separate_ms else "separate"
    # 'on': in place where allowed, in the block-diagonal form
    way = min(timed, key=timed.__getitem__) if mode == "auto" else (max(places), False)
    if chosen == "separate":
        way = plain  # reported: the times that decided
    (in_place, quads), fused_ms = way, timed[way]
    fused = forms[quads]
    fused.in_place = in_place
    variant = ("block-in-place" if in_place else "block") + ("-quads" if quads else "")
    return LayerChoice(name, shape, separate_ms, fused_ms, chosen, variant), fused
