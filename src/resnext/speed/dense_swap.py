"""The pass that puts one of our dense-convolution kernels in place of oneDNN's, where faster.

It runs on a BN-folded channels_last model of the kernel's dtype: it times each convolution the
kernel takes both ways with what follows it (a ReLU, or a residual add and a ReLU, which the
kernels apply in their store; in the frozen compiled graph oneDNN fuses them the same way), and
swaps where ours is faster. Where the graph shows the residual dead after the add, the kernel
writes over it, as oneDNN's 1×1 adds into its residual. A convolution that is a child of the
model itself (torchvision's stem) is swapped alone, its ReLU left to the compiler: the pass
rewrites a parent's graph, never the model's own. The kernels, their modules and their passes:
`conv_x3_swap`. `prepack_convs` puts oneDNN's own prepacked convolution in place of those left.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import fx, nn

from resnext.errors import ConfigError
from resnext.speed import conv_x3
from resnext.speed.block_fusion import ADDS, dead_after, inputs_consumed
from resnext.speed.fold import (
    install_graph,
    module_call_counts,
    replace_nodes,
    set_module,
    trace_or_none,
)
from resnext.speed.grouped_swap import (
    LayerChoice,
    NativeGroupedConv3x3,
    check_mode,
    input_shapes,
    time_each_ms,
)
from resnext.speed.kernel_module import KernelLeafTracer
from resnext.speed.measure import cache_evictor
from resnext.speed.pointwise_fusion import is_relu, single_input
from resnext.speed.prepacked import PrepackedConv
from resnext.speed.prepacked import eligible as prepackable
from resnext.speed.timing_cache import TimingCache, cached, layer_key


def square_geometry(module: nn.Module) -> tuple[int, int, int] | None:
    """(kernel, stride, padding) of a Conv2d with groups 1, a square kernel, equal strides and
    zero padding on both axes and no dilation (what the AMX convolution kernels take), else
    None."""
    if not isinstance(module, nn.Conv2d):
        return None
    k, s, p = module.kernel_size, module.stride, module.padding
    if (
        isinstance(p, tuple)  # not 'same' or 'valid'
        and k[0] == k[1]
        and s[0] == s[1]
        and p[0] == p[1]
        and module.dilation == (1, 1)
        and module.groups == 1
        and module.padding_mode == "zeros"
    ):
        return k[0], s[0], p[0]
    return None


@dataclass(frozen=True)
class DenseKernel:
    """One of our dense-convolution kernels, as the pass swaps it in."""

    option: str  # the `optimize` option that controls it, for messages
    variant: str  # the `LayerChoice.variant` its choices start with
    eligible: Callable[[nn.Module], bool]
    module: Callable[[nn.Conv2d, bool, bool, tuple], nn.Module]  # (conv, relu, in_place, input)
    unavailable_reason: Callable[[], str | None]
    dtype: torch.dtype = torch.float32  # the activations it computes


@dataclass(frozen=True)
class _Epilogue:
    """What follows a convolution in its parent's graph that the kernel can apply in its store."""

    nodes: list[fx.Node]  # identities, then [add,] ReLU; empty where nothing is fused
    residual: fx.Node | None  # the add's other operand
    overwritable: bool  # the residual is dead after the add: the kernel may write over it


def _epilogue(conv: fx.Node, modules: dict[str, nn.Module], consumed: bool) -> _Epilogue:
    """The identities, add and ReLU after `conv` (each the only user of the one before) that the
    kernel applies: a ReLU, or an add of one other tensor and a ReLU; nothing otherwise.
    `consumed`: the parent's input is used by nothing outside it (see `inputs_consumed`)."""
    nodes: list[fx.Node] = []
    node = conv
    while len(node.users) == 1:
        user = next(iter(node.users))
        if user.op == "call_module" and isinstance(modules.get(str(user.target)), nn.Identity):
            nodes.append(user)
        elif is_relu(user, modules) and single_input(user) is node:
            return _Epilogue([*nodes, user], None, False)
        elif user.op == "call_function" and user.target in ADDS:
            if user.kwargs or len(user.args) != 2 or list(user.args).count(node) != 1:
                break
            residual = user.args[1] if user.args[0] is node else user.args[0]
            if not isinstance(residual, fx.Node) or len(user.users) != 1:
                break
            relu = next(iter(user.users))
            if not is_relu(relu, modules) or single_input(relu) is not user:
                break
            overwritable = dead_after(residual, user) and (residual.op != "placeholder" or consumed)
            return _Epilogue([*nodes, user, relu], residual, overwritable)
        else:
            break
        node = user
    return _Epilogue([], None, False)


@dataclass(frozen=True)
class _Site:
    """One eligible convolution, called once in its parent, and the epilogue found after it (none
    for a child of the model itself: parent '')."""

    name: str
    parent: str
    child: str
    relu: bool
    residual: bool
    overwritable: bool


def _caller(model: nn.Module, name: str, graphs: dict[str, fx.Graph | None]) -> str:
    """`name`'s parent, or where fx cannot trace that, the nearest ancestor it can; `graphs`
    keeps each module traced by name (None: untraceable), for `sites` to read. A pass that
    rewrote a block's graph leaves its shortcut's Sequential a plain container without a
    forward: the block's graph calls the 1×1 in it."""
    parent = name.rpartition(".")[0]
    while parent:
        if parent not in graphs:
            graphs[parent] = trace_or_none(KernelLeafTracer, model.get_submodule(parent))
        if graphs[parent] is not None:
            break
        parent = parent.rpartition(".")[0]
    return parent


def sites(model: nn.Module, eligible: Callable[[nn.Module], bool]) -> list[_Site]:
    """Each convolution `eligible` accepts once, with its parent: the outermost traceable module whose own
    graph calls it (a block, for the 1×1 in its shortcut's Sequential), and the epilogue found
    there. Where two end in one add (a block's last 1×1 and its projection shortcut), the later
    in the graph (the last 1×1, so that it may write over the shortcut) applies it."""
    names = [n for n, m in model.named_modules() if eligible(m)]
    graphs: dict[str, fx.Graph | None] = {}
    parents = {_caller(model, n, graphs) for n in names} - {""}
    # a parent's callers first: a block's graph is traced through its shortcut's Sequential
    parents = sorted(parents, key=lambda p: (p.count("."), p))
    consumed = inputs_consumed(model, set(parents))
    by_name: dict[str, _Site] = {}
    for parent_name in parents:
        graph = graphs[parent_name]
        assert graph is not None  # _caller returns traced modules only
        modules = dict(model.get_submodule(parent_name).named_modules())
        calls = module_call_counts(graph)
        found: list[tuple[fx.Node, _Epilogue]] = []
        for node in graph.nodes:
            module = modules.get(str(node.target)) if node.op == "call_module" else None
            full = f"{parent_name}.{node.target}"
            if (
                full in by_name
                or not eligible(module)
                or calls[str(node.target)] != 1
                or single_input(node) is None
            ):
                continue
            found.append((node, _epilogue(node, modules, parent_name in consumed)))
        claimed: set[fx.Node] = set()
        for node, epi in reversed(found):  # the later 1×1 takes a shared add
            if epi.residual is not None and epi.nodes[-2] in claimed:
                epi = _Epilogue([], None, False)
            claimed.update(epi.nodes)
            by_name[f"{parent_name}.{node.target}"] = _Site(
                f"{parent_name}.{node.target}",
                parent_name,
                str(node.target),
                bool(epi.nodes),
                epi.residual is not None,
                epi.overwritable,
            )
    for name in names:
        if "." not in name:  # the model's own child: swapped alone
            by_name[name] = _Site(name, "", name, False, False, False)
    order = {name: i for i, name in enumerate(names)}
    return sorted(by_name.values(), key=lambda site: order[site.name])


def rewrite_site(model: nn.Module, site: _Site, fast: nn.Module) -> None:
    """Put `fast` in the parent's graph in place of the convolution and the epilogue it applies
    (the model's own child: in its place alone)."""
    if not site.parent:
        set_module(model, site.name, fast)
        return
    parent = model.get_submodule(site.parent)
    graph = KernelLeafTracer().trace(parent)
    modules = dict(parent.named_modules())
    conv = next(n for n in graph.nodes if n.op == "call_module" and n.target == site.child)
    epi = _epilogue(conv, modules, consumed=False)
    if site.relu:  # else the conv alone, whatever follows it (another 1×1 applies that add)
        assert bool(epi.nodes) and (epi.residual is not None) == site.residual, site
        args = (conv.args[0],) if epi.residual is None else (conv.args[0], epi.residual)
        replace_nodes(graph, [conv, *epi.nodes], site.child, args)
    install_graph(model, site.parent, graph, site.child, fast)


def onednn_runner(
    conv: nn.Conv2d, relu: bool, input_size: Sequence[int]
) -> Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]:
    """The convolution and its epilogue as the frozen compiled graph runs them, a `PrepackedConv`:
    oneDNN with the weight prepacked for this input size (as inductor packs it), the ReLU (or the
    add and ReLU, written over the residual) fused; its eager ops (`PrepackedConv.unpacked`)
    where the prepacked op is missing or refuses a probe (unpacked, oneDNN reorders the weight on
    every call: 4× the compiled graph's time for a 7² bf16 1×1 at batch 1, stop 48)."""
    fast = PrepackedConv(conv, relu, True, tuple(input_size))
    return fast if fast.packed is not None else fast.unpacked


@dataclass(frozen=True)
class DenseOptions:
    """How the dense-convolution passes (`swap_convs_x3`, `swap_convs_fma`, `swap_convs_dot`)
    weigh their kernel against oneDNN and put it in.

    `in_place` False never writes over a residual (for torch.jit, whose optimize_for_inference
    does not honour an operator's in-place write). `repeats`: timed calls per way. With
    `timings`, times stored there are used instead of measured. oneDNN is timed as every
    backend runs it (`PrepackedConv`); `native_extra_ms` is added to its time before the two are
    compared (in a replay, what leaving the C loop for a torch operator costs); the times kept
    are those measured.
    """

    in_place: bool = True
    repeats: int = 5
    timings: TimingCache | None = None
    native_extra_ms: float = 0.0

    def __post_init__(self) -> None:
        if self.repeats < 1:
            raise ValueError(f"repeats: expected >= 1, got {self.repeats}")
        if self.native_extra_ms < 0:
            raise ValueError(f"native_extra_ms: expected >= 0, got {self.native_extra_ms}")


DEFAULT_OPTIONS = DenseOptions()


def swap_dense_convs(
    model: nn.Module,
    example: torch.Tensor,
    kernel: DenseKernel,
    *,
    mode: str = "auto",
    options: DenseOptions = DEFAULT_OPTIONS,
) -> list[LayerChoice]:
    """The pass for one kernel (`X3`, `FMA`, `FP16`, `DOT` or `MKL`): see `swap_convs_x3`.
    Convolutions alike (input shape, outputs, geometry, epilogue) are timed once and share the
    pick."""
    check_mode(kernel.option, mode)
    if mode == "off" or example.dtype != kernel.dtype:
        return []
    reason = kernel.unavailable_reason()
    if reason is not None:
        if mode == "on":
            raise ConfigError(f"{kernel.option}: 'on' but the kernel cannot run here: {reason}")
        return []
    found = sites(model, kernel.eligible)
    shapes = input_shapes(model, [s.name for s in found], example)
    with cache_evictor() as evict:
        return _choose(model, kernel, found, shapes, mode, options, evict)


def _time_site(
    conv: nn.Conv2d,
    site: _Site,
    fast: nn.Module,
    shape: tuple,
    repeats: int,
    evict: Callable[[], None],
) -> list[float]:
    """oneDNN's (as every backend runs it) and the kernel's ms for one site, on random inputs of
    its shape."""
    dtype = conv.weight.dtype
    x = torch.randn(shape, dtype=dtype).contiguous(memory_format=torch.channels_last)
    geometry = square_geometry(conv)
    assert geometry is not None  # eligible() checked it
    out = conv_x3.output_shape(x.shape, conv.out_channels, *geometry)
    res = None
    if site.residual:
        res = torch.randn(out, dtype=dtype).contiguous(memory_format=torch.channels_last)
    native = onednn_runner(conv, site.relu, shape)
    ways = [lambda x: native(x, res), lambda x: fast(x, res)]
    # caches cold: in the network each layer's weights arrive from memory, which cost oneDNN's
    # batch-1 1×1s more than ours (RESULTS.md, stop 28)
    return time_each_ms(ways, x, repeats, before=evict)


def _choose(
    model: nn.Module,
    kernel: DenseKernel,
    found: list[_Site],
    shapes: dict[str, tuple],
    mode: str,
    options: DenseOptions,
    evict: Callable[[], None],
) -> list[LayerChoice]:
    """Time each site's convolution both ways (`evict` before each timed call) and rewrite the
    ones the kernel takes; the choices made."""
    choices = []
    # Layers alike (a stage's later blocks) are timed once and get the same pick: half the
    # timing, and no coin flips between twins that a noisy machine would otherwise make.
    timed: dict[tuple, tuple[float, float]] = {}
    for site in found:
        if site.name not in shapes:  # never called on this input
            continue
        conv = model.get_submodule(site.name)
        overwrite = options.in_place and site.overwritable
        fast = kernel.module(conv, site.relu, overwrite, shapes[site.name])
        geometry = square_geometry(conv)
        assert geometry is not None  # eligible() checked it
        alike = (
            shapes[site.name],
            conv.out_channels,
            geometry,
            site.relu,
            site.residual,
            overwrite,
        )
        if alike not in timed:
            shape = shapes[site.name]
            key = layer_key(kernel.variant, shape, kernel.dtype, *alike[1:])
            measure = functools.partial(_time_site, conv, site, fast, shape, options.repeats, evict)
            native_ms, kernel_ms = cached(options.timings, key, 2, measure)
            timed[alike] = (native_ms, kernel_ms)
        native_ms, kernel_ms = timed[alike]
        use = mode == "on" or kernel_ms < native_ms + options.native_extra_ms
        if use:
            rewrite_site(model, site, fast)
        epilogue = ("+add+relu" if site.residual else "+relu") if site.relu else ""
        variant = kernel.variant + epilogue + (", in place" if overwrite else "")
        chosen = "kernel" if use else "native"
        choices.append(
            LayerChoice(site.name, shapes[site.name], native_ms, kernel_ms, chosen, variant)
        )
    return choices


def prepack_convs(model: nn.Module, example: torch.Tensor, *, in_place: bool = True) -> list[str]:
    """Replace, in place, each convolution left in `model` to oneDNN (with the ReLU, or add and
    ReLU, after it in its block; a grouped one kept for its AMX form with its own ReLU) by a
    `PrepackedConv` packed for the input it sees on `example`; the names replaced. A convolution
    the example does not reach is left as it is."""
    found = sites(model, prepackable)
    kept = [n for n, m in model.named_modules() if isinstance(m, NativeGroupedConv3x3)]
    shapes = input_shapes(model, [s.name for s in found] + kept, example)
    done = []
    for site in found:
        if site.name not in shapes:
            continue
        conv = model.get_submodule(site.name)
        overwrite = in_place and site.overwritable
        rewrite_site(model, site, PrepackedConv(conv, site.relu, overwrite, shapes[site.name]))
        done.append(site.name)
    for name in kept:
        if name in shapes:
            native = model.get_submodule(name)
            set_module(
                model, name, PrepackedConv(native.as_conv(), native.relu, False, shapes[name])
            )
            done.append(name)
    return done
