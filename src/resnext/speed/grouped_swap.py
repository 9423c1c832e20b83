"""Swapping a model's grouped 3×3 convolutions for our kernels where they are faster (timed per layer)."""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx, nn

from resnext.errors import ConfigError
from resnext.speed import grouped_amx, grouped_kernel, grouped_quads
from resnext.speed.capability import has_avx512_bf16
from resnext.speed.fold import graph_module, set_module, trace_or_none
from resnext.speed.kernel_module import KernelLeafTracer, KernelModule
from resnext.speed.measure import cache_evictor
from resnext.speed.prepacked import PrepackedConv
from resnext.speed.timing_cache import TimingCache, cached, layer_key

MODES = ("auto", "on", "off")  # every `optimize` pass's switch


def check_mode(option: str, mode: str) -> None:
    """A ConfigError naming `option` unless `mode` is one of MODES."""
    if mode not in MODES:
        raise ConfigError(f"{option}: expected one of {MODES}, got {mode!r}")


VARIANTS = ("widening", "pairs", "amx", "quads")
# the variants with an operator of their own (the others run `grouped_conv3x3`)
OPERATORS = {
    "amx": torch.ops.resnext.grouped_conv3x3_amx,
    "quads": torch.ops.resnext.grouped_conv3x3_quads,
}


class FastGroupedConv3x3(KernelModule):
    """A grouped 3×3 convolution (padding 1) computed by one of our kernels.

    Variants: 'widening' (`kernels/grouped3x3.c`, float32 FMAs; fp32 weights for fp32 or bf16
    activations), 'pairs' (the same file's AVX512-BF16 pair kernels: bf16, 4-64 channels per
    group), 'amx' (`kernels/grouped3x3_amx.c`: bf16 on AMX tiles) and 'quads'
    (`kernels/grouped3x3_quads_amx.c`: bf16 on AMX tiles, 4 or 8 channels per group at stride 1, half
    the tile products). The packed weights and bias are plain attributes, not parameters or
    buffers, so that a later ``.to(dtype)`` leaves them as packed.
    """

    def __init__(
        self,
        conv: nn.Conv2d,
        relu: bool = False,
        dtype: torch.dtype = torch.float32,
        variant: str | None = None,
    ) -> None:
        super().__init__()
        self.relu = relu
        if not eligible(conv):
            raise ValueError(
                f"conv: expected a grouped 3×3 convolution the kernel takes, got {conv}"
            )
        self.groups = conv.groups
        self.stride = conv.stride[0]
        self.channels = conv.out_channels
        can_pair = grouped_kernel.takes_pairs(conv.out_channels, conv.groups, dtype)
        if variant is None:  # the AVX-512 kernels' own default
            variant = "pairs" if can_pair else "widening"
        if variant not in variant_names(conv, dtype):
            raise ValueError(
                f"variant: expected one of {variant_names(conv, dtype)} for {conv} with {dtype} "
                f"activations, got {variant!r}"
            )
        self.variant = variant
        if variant == "amx":
            self.packed = grouped_amx.pack_weights(conv.weight, conv.groups)
        elif variant == "quads":
            self.packed = grouped_quads.pack_weights(conv.weight, conv.groups)
        else:
            self.packed = grouped_kernel.pack_weights(conv.weight, conv.groups, variant == "pairs")
        self.bias = None if conv.bias is None else conv.bias.detach().float().contiguous()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        op = OPERATORS.get(self.variant, torch.ops.resnext.grouped_conv3x3)
        return op(x, self.packed, self.bias, self.groups, self.stride, self.relu)

    def extra_repr(self) -> str:
        relu = ", relu=True" if self.relu else ""
        return (
            f"{self.channels}, {self.channels}, groups={self.groups}, stride={self.stride}, "
            f"variant={self.variant}{relu}"
        )


class NativeGroupedConv3x3(FastGroupedConv3x3):
    """torch's (oneDNN's) grouped 3×3, kept where it beats our kernels alone but one of them may
    win fused (`kernel_alternative`, the fastest alone; `amx_alternative`, an AMX form): in this
    form the fusion passes still time that kernel fused with the 1×1s around it against it.
    Computes exactly the convolution it replaces (its ReLU too, once `fuse_following_relu` has
    moved that in); the weight is a plain attribute as the packed ones are."""

    def __init__(self, conv: nn.Conv2d, relu: bool = False) -> None:
        nn.Module.__init__(self)
        self.relu = relu
        self.groups, self.stride, self.channels = conv.groups, conv.stride[0], conv.out_channels
        self.variant = "native"
        self.weight = conv.weight.detach()
        self.bias = None if conv.bias is None else conv.bias.detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.conv2d(x, self.weight, self.bias, self.stride, 1, 1, self.groups)
        return F.relu(y) if self.relu else y

    def as_conv(self) -> nn.Conv2d:
        """The convolution it computes (without its ReLU), sharing its weight and bias."""
        conv = nn.Conv2d(
            self.channels,
            self.channels,
            3,
            self.stride,
            1,
            groups=self.groups,
            bias=self.bias is not None,
            device="meta",
        )
        conv.weight = nn.Parameter(self.weight, requires_grad=False)
        if self.bias is not None:
            conv.bias = nn.Parameter(self.bias, requires_grad=False)
        return conv


def variant_names(conv: nn.Conv2d, dtype: torch.dtype) -> tuple[str, ...]:
    """The kernel variants that take `conv` with `dtype` activations (shape and dtype only; whether
    this CPU runs them is `unavailable_reason`'s question)."""
    c, groups, stride = conv.out_channels, conv.groups, conv.stride[0]
    names = []
    if dtype in (torch.float32, torch.bfloat16) and grouped_kernel.supports(c, groups, stride):
        names.append("widening")
        if grouped_kernel.takes_pairs(c, groups, dtype):
            names.append("pairs")
    if dtype == torch.bfloat16 and grouped_amx.supports(c, groups, stride):
        names.append("amx")
    if dtype == torch.bfloat16 and grouped_quads.supports(c, groups, stride):
        names.append("quads")
    return tuple(names)


def runnable_variants(conv: nn.Conv2d, dtype: torch.dtype) -> tuple[str, ...]:
    """The variants of `variant_names` that this CPU and its compiler can run."""
    names = []
    for name in variant_names(conv, dtype):
        if name == "amx":
            ok = grouped_amx.unavailable_reason(dtype) is None
        elif name == "quads":
            ok = grouped_quads.unavailable_reason(dtype) is None
        elif name == "pairs":
            ok = has_avx512_bf16() and grouped_kernel.unavailable_reason(dtype) is None
        else:
            ok = grouped_kernel.unavailable_reason(dtype) is None
        if ok:
            names.append(name)
    return tuple(names)


def eligible(module: nn.Module) -> bool:
    """Whether `module` is a Conv2d our kernel computes exactly (3×3, padding 1, square stride)."""
    return (
        isinstance(module, nn.Conv2d)
        and module.kernel_size == (3, 3)
        and module.padding == (1, 1)
        and module.dilation == (1, 1)
        and module.padding_mode == "zeros"
        and module.stride[0] == module.stride[1]
        and module.in_channels == module.out_channels
        and module.groups > 1
        and (
            grouped_kernel.supports(module.out_channels, module.groups, module.stride[0])
            or grouped_amx.supports(module.out_channels, module.groups, module.stride[0])
        )
    )


@dataclass(frozen=True)
class LayerChoice:
    """Which implementation one grouped convolution got, and the timings that decided it."""

    name: str
    input_shape: tuple[int, ...]
    native_ms: float
    kernel_ms: float  # the fastest of the kernel's variants
    chosen: str
    variant: str = ""  # that variant: widening, pairs (AVX512-BF16), amx or quads (AMX)


def time_each_ms(
    fns: Sequence[Callable[[torch.Tensor], object]],
    x: torch.Tensor,
    repeats: int,
    before: Callable[[], object] | None = None,
) -> list[float]:
    """The best of `repeats` timed calls of each fn(x), in ms, after two untimed ones each; the
    ways take turns, so that a slow moment of the machine (which moves by tens of per cent
    within seconds) falls on all of them instead of deciding which one wins, each turn starting
    one way further on (`measure.interleaved`: no way always follows the same one). `before`,
    if given, runs untimed before each timed call (`cache_evictor`: time a layer as a whole
    network runs it, its weights not left in cache by the call before)."""
    best = [float("inf")] * len(fns)
    with torch.no_grad():
        for fn in fns:
            fn(x)
            fn(x)
        for turn in range(repeats):
            for k in range(len(fns)):
                i = (turn + k) % len(fns)
                if before is not None:
                    before()
                start = time.perf_counter()
                fns[i](x)
                best[i] = min(best[i], time.perf_counter() - start)
    return [b * 1e3 for b in best]


def time_on_random(
    fns: Sequence[Callable[[torch.Tensor], object]],
    shape: Sequence[int],
    dtype: torch.dtype,
    repeats: int,
    before: Callable[[], object] | None = None,
) -> list[float]:
    """`time_each_ms` on a random channels-last input of `shape` and `dtype` (`before` as
    there: a `cache_evictor`'s function times each call with the caches emptied)."""
    x = torch.randn(tuple(shape), dtype=dtype).contiguous(memory_format=torch.channels_last)
    return time_each_ms(fns, x, repeats, before)


def time_ways_cold(
    ways: Sequence[Callable[[torch.Tensor], object]],
    shape: Sequence[int],
    dtype: torch.dtype,
    repeats: int,
    evict: Callable[[], object],
    timings: TimingCache | None,
    key: str,
) -> list[float]:
    """Each of a layer's `ways` timed in ms on a random input (`time_on_random`) with the caches
    emptied by `evict` before each call, or the times `timings` holds under `key`.

    Cold, as the grouped choosers time them: in the network a grouped layer's input, just written
    by the 1×1 before it, is as cold as evicted (stage 3: 1.44 ms after its 1×1, 1.48 evicted,
    1.19–1.24 in cache), and in cache oneDNN and the wide pair kernel tied on stage 3, the pick
    flipping by run.
    """
    measure = functools.partial(time_on_random, ways, shape, dtype, repeats, before=evict)
    return cached(timings, key, len(ways), measure)


def input_shapes(model: nn.Module, names: list[str], example: torch.Tensor) -> dict[str, tuple]:
    """The input shape each named submodule sees when `model` runs on `example`.

    Found from forwards of the example's first image and first two where they show every such
    input with the batch first and the rest unchanged (a 16-image forward of ResNeXt-50 took
    ~1.2 s on the 2-core AVX2 machine, once per kernel pass); otherwise (a model that mixes
    images, or fails on fewer) from a forward of `example` itself.
    """
    if example.shape[0] > 2:
        shapes = _probed_shapes(model, names, example)
        if shapes is not None:
            return shapes
    return _seen_shapes(model, names, example)


def _probed_shapes(
    model: nn.Module, names: list[str], example: torch.Tensor
) -> dict[str, tuple] | None:
    """`input_shapes` from one- and two-image forwards, or None where they do not tell it."""
    try:
        one = _seen_shapes(model, names, example[:1])
        two = _seen_shapes(model, names, example[:2])
    except Exception:  # a model built for its batch may refuse fewer images
        return None
    if one.keys() != two.keys() or any(
        one[k][:1] != (1,) or two[k][:1] != (2,) or one[k][1:] != two[k][1:] for k in one
    ):
        return None
    return {k: (example.shape[0], *shape[1:]) for k, shape in one.items()}


def _seen_shapes(model: nn.Module, names: list[str], example: torch.Tensor) -> dict[str, tuple]:
    shapes: dict[str, tuple] = {}
    hooks = []
    for name in names:

        def hook(_module: nn.Module, args: tuple, name: str = name) -> None:
            shapes[name] = tuple(args[0].shape)

        hooks.append(model.get_submodule(name).register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            model(example)
    finally:
        for handle in hooks:
            handle.remove()
    return shapes


def swap_grouped_convs(
    model: nn.Module,
    example: torch.Tensor,
    *,
    mode: str = "auto",
    repeats: int = 5,
    timings: TimingCache | None = None,
    native_extra_ms: float = 0.0,
) -> list[LayerChoice]:
    """Replace, in place, each grouped 3×3 conv of `model` by `FastGroupedConv3x3` where it pays.

    `example` is an input as the model takes it (its dtype and memory format); the kernels are
    built for its dtype. 'auto' times oneDNN's convolution (prepacked, as every backend runs it:
    `PrepackedConv`) and each kernel variant this CPU runs
    (`runnable_variants`) on each layer's real input shape and keeps the fastest; 'on' takes the
    fastest variant on every layer one runs (a ConfigError if our kernels cannot run here at all);
    'off' changes nothing. With `timings`, times stored there are used instead of measured.
    `native_extra_ms` is added to oneDNN's time in the choice (in a replay, what leaving the C
    loop for a torch operator costs); the choices report the time measured.
    """
    check_mode("grouped_kernel", mode)
    if mode == "off":
        return []
    names = [name for name, module in model.named_modules() if eligible(module)]
    if not names:
        return []
    reason = grouped_kernel.unavailable_reason(example.dtype)
    if reason is not None:
        if mode == "on":
            raise ConfigError(f"grouped_kernel: 'on' but the kernel cannot run here: {reason}")
        return []
    shapes = input_shapes(model, names, example)
    # one eviction buffer for the pass: each layer's ways timed with the caches emptied
    with cache_evictor() as evict:
        choices = []
        for name in names:
            if name not in shapes:  # never called on this input
                continue
            conv = model.get_submodule(name)
            variants = runnable_variants(conv, example.dtype)
            if not variants:  # a shape only the AMX kernel takes, on a CPU without AMX
                continue
            # Which variant is fastest depends on the CPU (measured: the AVX512-BF16 pair kernel is
            # 4x slower per instruction on an Intel Xeon with AMX, where the AMX kernel wins).
            candidates = [
                FastGroupedConv3x3(conv, dtype=example.dtype, variant=v) for v in variants
            ]
            # oneDNN as every backend runs it: its weight prepacked for this input size
            ways = [PrepackedConv(conv, False, False, shapes[name]), *candidates]
            key = layer_key("grouped", shapes[name], example.dtype, conv, ",".join(variants))
            native_ms, *times = time_ways_cold(
                ways, shapes[name], example.dtype, repeats, evict, timings, key
            )
            kernel_ms = min(times)
            fast = candidates[times.index(kernel_ms)]
            amx = candidates[variants.index("amx")] if "amx" in variants else None
            if amx is not None and fast is not amx:
                # Kept for the fusion passes: a fused kernel built on the AMX form can beat this
                # variant plus the 1×1s around it (measured: stage 1 at batch 1, where the AVX-512
                # kernel wins alone). A plain attribute, not a submodule, so that no pass sees it.
                object.__setattr__(fast, "amx_alternative", amx)
            use = mode == "on" or kernel_ms < native_ms + native_extra_ms
            fused = False
            if use:
                set_module(model, name, fast)
                fused = fuse_following_relu(model, name)
                if amx is not None:
                    amx.relu = fast.relu  # the AMX form kept beside it applies the same ReLU
            elif amx is not None or example.dtype == torch.bfloat16:
                # oneDNN wins alone, but our kernel fused with the 1×1s around it may still win
                # (measured: stage 3 at batch 16 lost its blocks' fusion when oneDNN won by a
                # hair, on AMX and on the AVX512-BF16 pair kernels (stop 66))
                native = NativeGroupedConv3x3(conv)
                object.__setattr__(native, "kernel_alternative", fast)
                if amx is not None:
                    object.__setattr__(native, "amx_alternative", amx)
                set_module(model, name, native)
                fuse_following_relu(model, name)
                fast.relu = native.relu
                if amx is not None:
                    amx.relu = native.relu
            choices.append(
                LayerChoice(
                    name,
                    shapes[name],
                    native_ms,
                    kernel_ms,
                    ("kernel+relu" if fused else "kernel") if use else "native",
                    fast.variant,
                )
            )
    return choices


def kernel_form(module: nn.Module | None) -> FastGroupedConv3x3 | None:
    """`module` as one of our grouped kernels: itself if it is one, else the fastest of our forms
    that `swap_grouped_convs` kept beside oneDNN's convolution (with the same ReLU flag), else
    None."""
    if isinstance(module, NativeGroupedConv3x3):
        return getattr(module, "kernel_alternative", None)
    return module if isinstance(module, FastGroupedConv3x3) else None


def amx_form(module: nn.Module | None) -> FastGroupedConv3x3 | None:
    """`module` as our AMX grouped kernel: itself if it is one, else the AMX form that
    `swap_grouped_convs` kept beside a faster variant (with the same ReLU flag), else None."""
    if not isinstance(module, FastGroupedConv3x3):
        return None
    return module if module.variant == "amx" else getattr(module, "amx_alternative", None)


def traced_call(
    root: nn.Module, name: str
) -> tuple[str, fx.Graph, dict[str, nn.Module], fx.Node] | None:
    """The module that holds `name` traced (our kernels kept whole): its name, graph and
    modules, and the node calling `name`; None if `name` has no parent, the parent cannot be
    traced, or it never calls `name`."""
    parent_name, _, child = name.rpartition(".")
    if not parent_name:
        return None
    parent = root.get_submodule(parent_name)
    graph = trace_or_none(KernelLeafTracer, parent)
    if graph is None:
        return None
    node = next((n for n in graph.nodes if n.op == "call_module" and n.target == child), None)
    if node is None:
        return None
    return parent_name, graph, dict(parent.named_modules()), node


def _only_user(node: fx.Node) -> fx.Node | None:
    return next(iter(node.users)) if len(node.users) == 1 else None


def fuse_following_relu(root: nn.Module, name: str) -> bool:
    """Let the kernel at `name` apply the ReLU that follows it (through identities), if it can.

    Saves a full pass over the activation. The parent module is traced with torch.fx and replaced
    by the rewritten graph; if it cannot be traced, or anything but a ReLU (possibly after folded-BN
    identities) consumes the convolution, nothing changes and False is returned.
    """
    traced = traced_call(root, name)
    if traced is None:
        return False
    parent_name, graph, modules, conv_node = traced
    child = str(conv_node.target)
    parent = root.get_submodule(parent_name)
    last, user = conv_node, _only_user(conv_node)
    while (
        user is not None
        and user.op == "call_module"
        and isinstance(modules.get(user.target), nn.Identity)
    ):
        last, user = user, _only_user(user)
    is_relu = user is not None and (
        (user.op == "call_module" and isinstance(modules.get(user.target), nn.ReLU))
        or (user.op == "call_function" and user.target in (F.relu, torch.relu))
    )
    if not is_relu or len(user.args) != 1 or user.kwargs.get("inplace", False):
        return False
    user.replace_all_uses_with(last)
    graph.erase_node(user)
    modules[child].relu = True
    set_module(root, parent_name, graph_module(parent, graph))
    return True
