"""Putting our dense-convolution kernels in place of oneDNN's, where faster.

Two kernels take float32 convolutions with groups 1, a third bf16 1×1s. On the Intel Xeon with
AMX, float32 inference is bound by float32 FMAs; 95 % of ResNeXt-50's FLOPs are 1×1s, and its
7×7 stem and ResNet-50's dense 3×3s are the rest of the dense ones. `conv_x3` computes them on
the tile unit as three bf16 products per float32 product (~1e-5 of each product,
`kernels/conv_x3_amx.c`). On CPUs with AVX2 FMAs and no AMX, `pointwise_fma` computes the 1×1s
with register tiles oneDNN's float32 convolution did not match on the AMD Zen 3 it was written
on (`kernels/pointwise_fma.c`). On CPUs with AVX512-BF16, `pointwise_gemm`'s product (pair dot
products, `kernels/pointwise_gemm.c`) computes bf16 1×1s with the same epilogues. This pass
runs on a BN-folded channels_last model of the kernel's dtype: it times each convolution a
kernel takes both ways with what follows it (a ReLU, or a residual add and a ReLU, which the
kernels apply in their store; in the frozen compiled graph oneDNN fuses them the same way), and
swaps where ours is faster. Where the graph shows the residual dead
after the add, the kernel writes over it, as oneDNN's 1×1 adds into its residual. A convolution
that is a child of the model itself (torchvision's stem) is swapped alone, its ReLU left to the
compiler: the pass rewrites a parent's graph, never the model's own.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import fx, nn

from resnext.errors import ConfigError
from resnext.speed import (
    conv_x3,
    operators,
    pointwise_fma,
    pointwise_fp16,
    pointwise_gemm,
    pointwise_mkl,
)
from resnext.speed.block_fusion import ADDS, dead_after, inputs_consumed
from resnext.speed.capability import cpu_flags
from resnext.speed.conv1x1_kernel import Conv1x1Kernel, float_bias
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
from resnext.speed.kernel_module import KernelLeafTracer, KernelModule
from resnext.speed.measure import cache_evictor
from resnext.speed.pointwise_fusion import is_relu, single_input
from resnext.speed.prepacked import PrepackedConv
from resnext.speed.prepacked import eligible as prepackable
from resnext.speed.timing_cache import TimingCache, cached, layer_key


class ConvX3(KernelModule):
    """A float32 convolution (groups 1) with its bias, then optionally a residual add and a ReLU,
    computed by `conv_x3` (AMX, three bf16 products per float32 product).

    With `in_place` the result is written over the residual, which must then be dead after this
    call (the pass sets it only where the graph shows that). The packed weight and bias are plain
    attributes, as in `FastGroupedConv3x3`, so that a later ``.to(dtype)`` leaves them packed.
    """

    def __init__(self, conv: nn.Conv2d, relu: bool = False, in_place: bool = False) -> None:
        super().__init__()
        if not eligible(conv):
            raise ValueError(
                "conv: expected a float32 convolution the kernel takes (groups 1, square kernel, "
                "stride and zero padding, outputs a multiple of 16, inputs of 32 for a 1×1), got "
                f"{conv}"
            )
        self.packed = conv_x3.pack(conv.weight)
        self.bias = float_bias(conv)
        geometry = square_geometry(conv)
        assert geometry is not None  # eligible() checked it
        self.kernel, self.stride, self.padding = geometry
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.relu, self.in_place = relu, in_place

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        args = (x, self.packed, self.bias, self.kernel, self.stride, self.padding, self.relu)
        ops = torch.ops.resnext
        return operators.call_over_residual(
            ops.conv_x3, ops.conv_x3_, args, residual, self.in_place
        )

    def extra_repr(self) -> str:
        k = self.kernel
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size=({k}, {k}), "
            f"stride={self.stride}, padding={self.padding}, bf16x3"
            + (", relu" if self.relu else "")
            + (", in place" if self.in_place else "")
        )


class FmaConv1x1(Conv1x1Kernel):
    """A float32 1×1 convolution (any stride) and its epilogue, computed by `pointwise_fma`
    (256-bit FMAs)."""

    OP = torch.ops.resnext.pointwise_fma
    OP_IN_PLACE = torch.ops.resnext.pointwise_fma_
    KIND = "fma"

    def __init__(self, conv: nn.Conv2d, relu: bool = False, in_place: bool = False) -> None:
        if not fma_eligible(conv):
            raise ValueError(
                "conv: expected a float32 1×1 convolution the kernel takes (groups 1, no "
                f"padding, outputs a multiple of 16), got {conv}"
            )
        super().__init__(conv, pointwise_fma.pack(conv.weight), relu, in_place)

    def _args(self, x: torch.Tensor) -> tuple:
        return (x, self.packed, self.bias, self.stride, self.relu)


class DotConv1x1(Conv1x1Kernel):
    """A bf16 1×1 convolution and its epilogue, computed by `pointwise_gemm.conv1x1` (AVX512-BF16
    pair dot products, float32 sums, one rounding); a strided one (a projection shortcut) reads
    the input's every s-th pixel of every s-th row where it lies."""

    OP = torch.ops.resnext.pointwise_conv_bf16
    OP_IN_PLACE = torch.ops.resnext.pointwise_conv_bf16_
    KIND = "bf16 dot"

    def __init__(self, conv: nn.Conv2d, relu: bool = False, in_place: bool = False) -> None:
        if not dot_eligible(conv):
            raise ValueError(
                "conv: expected a bf16 1×1 convolution the kernel takes (groups 1, no padding, "
                f"inputs and outputs multiples of {pointwise_gemm.COLUMN_BLOCK}), got {conv}"
            )
        super().__init__(conv, pointwise_gemm.pack_conv(conv.weight), relu, in_place)

    def _args(self, x: torch.Tensor) -> tuple:
        return (x, self.packed, self.bias, self.stride, self.relu)


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


def eligible(module: nn.Module) -> bool:
    """Whether `module` is a float32 Conv2d `conv_x3` computes (groups 1, square, zero padding)."""
    geometry = square_geometry(module)
    return (
        geometry is not None
        and module.weight.dtype == torch.float32
        and conv_x3.supports(module.in_channels, module.out_channels, *geometry)
    )


def fma_eligible(module: nn.Module) -> bool:
    """Whether `module` is a float32 Conv2d `pointwise_fma` computes (1×1, groups 1, no padding)."""
    geometry = square_geometry(module)
    return (
        geometry is not None
        and module.weight.dtype == torch.float32
        and pointwise_fma.supports(module.in_channels, module.out_channels, *geometry)
    )


def dot_eligible(module: nn.Module) -> bool:
    """Whether `module` is a bf16 Conv2d `DotConv1x1` computes (1×1, groups 1, no padding,
    channels multiples of 64, any stride)."""
    geometry = square_geometry(module)
    return (
        geometry is not None
        and geometry[0] == 1
        and geometry[2] == 0
        and module.weight.dtype == torch.bfloat16
        and pointwise_gemm.takes(module.in_channels, module.out_channels)
    )


@dataclass(frozen=True)
class DenseKernel:
    """One of our dense-convolution kernels, as the pass swaps it in."""

    option: str  # the `optimize` option that controls it, for messages
    variant: str  # the `LayerChoice.variant` its choices start with
    eligible: Callable[[nn.Module], bool]
    module: Callable[[nn.Conv2d, bool, bool, tuple], nn.Module]  # (conv, relu, in_place, input)
    unavailable_reason: Callable[[], str | None]
    dtype: torch.dtype = torch.float32  # the activations it computes


X3 = DenseKernel(
    "conv_x3",
    "bf16x3",
    eligible,
    lambda conv, relu, in_place, _: ConvX3(conv, relu, in_place),
    lambda: conv_x3.unavailable_reason(),
)
FMA = DenseKernel(
    "pointwise_fma",
    "fma",
    fma_eligible,
    lambda conv, relu, in_place, _: FmaConv1x1(conv, relu, in_place),
    lambda: pointwise_fma.unavailable_reason(),
)
DOT = DenseKernel(
    "pointwise_bf16",
    "dot",
    dot_eligible,
    lambda conv, relu, in_place, _: DotConv1x1(conv, relu, in_place),
    lambda: pointwise_gemm.unavailable_reason(),
    torch.bfloat16,
)
# packed for the output pixel count of the input it is timed on
MKL = DenseKernel(
    "pointwise_mkl",
    "mkl",
    pointwise_mkl.eligible,
    pointwise_mkl.MklConv1x1,
    lambda: pointwise_mkl.unavailable_reason(),
)

# float16 products: chosen only where `optimize` is asked for them (not float32-exact)
FP16 = DenseKernel(
    "pointwise_fp16",
    "fp16",
    pointwise_fp16.eligible,
    lambda conv, relu, in_place, _: pointwise_fp16.Fp16Conv1x1(conv, relu, in_place),
    lambda: pointwise_fp16.unavailable_reason(),
)


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


def _onednn_runner(
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


def swap_convs_x3(
    model: nn.Module,
    example: torch.Tensor,
    *,
    mode: str = "auto",
    options: DenseOptions = DEFAULT_OPTIONS,
) -> list[LayerChoice]:
    """Replace, in place, the float32 convolutions of `model` `conv_x3` takes by `ConvX3`.

    `example` is the model's input (float32, channels_last). 'auto' times each convolution with
    its epilogue both ways on its real input shape and keeps the faster (as `options` says);
    'on' swaps every one (a ConfigError if the kernel cannot run here); 'off' changes nothing.
    Each choice is returned as a `LayerChoice` (native_ms: oneDNN, kernel_ms: ours, chosen
    'kernel' or 'native', variant 'bf16x3' plus '+relu', '+add+relu' and ', in place' for what
    the kernel applies). The timed residuals are overwritten by the in-place runs, so their
    values drift from call to call; only the time is kept.
    """
    return swap_dense_convs(model, example, X3, mode=mode, options=options)


def swap_convs_fma(
    model: nn.Module,
    example: torch.Tensor,
    *,
    mode: str = "auto",
    options: DenseOptions = DEFAULT_OPTIONS,
) -> list[LayerChoice]:
    """Replace, in place, the float32 1×1 convolutions of `model` that `pointwise_fma` takes by
    `FmaConv1x1`; as `swap_convs_x3` otherwise (variant 'fma…'). Run after `swap_convs_x3`, so
    that on a CPU with AMX the 1×1s it took stay with it.

    'auto' times nothing, and changes nothing, on a CPU with AVX-512: there oneDNN's float32
    1×1s use 16-lane FMAs against our 8, and on the AVX2-only CPU the kernel was written on it
    was level with oneDNN overall, so timing it would only lengthen `optimize`."""
    if mode == "auto" and "avx512f" in cpu_flags():
        return []
    return swap_dense_convs(model, example, FMA, mode=mode, options=options)


def swap_convs_dot(
    model: nn.Module,
    example: torch.Tensor,
    *,
    mode: str = "auto",
    options: DenseOptions = DEFAULT_OPTIONS,
) -> list[LayerChoice]:
    """Replace, in place, the bf16 1×1 convolutions of `model` that `pointwise_gemm.conv1x1`
    takes by `DotConv1x1`; as `swap_convs_x3` otherwise (`example`
    bf16, variant 'dot…'). Run after the AMX block fusions, which take their 1×1s first."""
    return swap_dense_convs(model, example, DOT, mode=mode, options=options)


def swap_convs_mkl(
    model: nn.Module,
    example: torch.Tensor,
    *,
    mode: str = "auto",
    options: DenseOptions = DEFAULT_OPTIONS,
) -> list[LayerChoice]:
    """Replace, in place, the float32 1×1 convolutions of `model` that the passes before left to
    oneDNN by `pointwise_mkl.MklConv1x1` (MKL's product on a weight packed for the layer's output
    pixel count; a stride's pixels gathered first) where that is faster; as `swap_convs_x3` otherwise (variant 'mkl…').
    On the Xeon without AMX it took most of ResNeXt-50's 1×1s at batch 16 and, in a replay, all
    of them at batch 1 (RESULTS.md, stop 55)."""
    return swap_dense_convs(model, example, MKL, mode=mode, options=options)


def swap_convs_fp16(
    model: nn.Module,
    example: torch.Tensor,
    *,
    mode: str = "auto",
    options: DenseOptions = DEFAULT_OPTIONS,
) -> list[LayerChoice]:
    """Replace, in place, the float32 1×1 convolutions of `model` that the passes before left to
    oneDNN by `pointwise_fp16.Fp16Conv1x1` (float16 products, float32 sums every 64, AVX512-FP16)
    where that is faster; as `swap_convs_x3` otherwise (variant 'fp16…'). Its results are
    float16-precise, so `optimize` runs it only where asked. On the Xeon without AMX it ran
    ResNeXt-50's 1×1s in 0.67× oneDNN's time at batch 16 (RESULTS.md, stop 56)."""
    return swap_dense_convs(model, example, FP16, mode=mode, options=options)


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
    native = _onednn_runner(conv, site.relu, shape)
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
