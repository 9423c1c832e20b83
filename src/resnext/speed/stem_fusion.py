"""Putting the ImageNet stem (7×7 conv, ReLU, 3×3/2 max pooling) into one kernel, where faster.

After BN folding, the stem of a `ResNeXt` is conv1 (with the folded bias), the ReLU and the max
pooling. Run apart, the convolution writes the network's largest tensor and the pooling reads it
back; `resnext.speed.stem` (AMX: bf16, or float32 as bf16×3) and `resnext.speed.stem_dot`
(AVX512-BF16 pair dot products: bf16) compute all three in one pass and write only the pooled
output.
This pass times the fused kernel against the two steps apart: the convolution as the compiled
graph would run it (oneDNN with its weight prepacked and the ReLU fused, and in float32 also our
bf16×3 `conv_x3`, whichever is faster), then the pooling by the training fast path's max-pool
kernel (`resnext.speed.maxpool`), standing in for the compiled graph's generated loop, which
would cost seconds of compiling to time. Measured on the Intel Xeon, the stand-in took 0.64×
the compiled pooling's time at batch 1 and 1.4× at batch 16 (bf16); the fused stem won by more
than that difference at both. The model's `conv1` then becomes a `FusedStem`, its `bn1` a
`ReluApplied` and its `maxpool` an identity; the other layers' state-dict keys do not change.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import nn

from resnext.errors import ConfigError
from resnext.models.network import ResNeXt
from resnext.speed import conv_x3, maxpool, stem, stem_dot
from resnext.speed.conv1x1_kernel import float_bias
from resnext.speed.conv_x3_swap import ConvX3
from resnext.speed.conv_x3_swap import eligible as x3_eligible
from resnext.speed.dense_swap import square_geometry
from resnext.speed.grouped_swap import LayerChoice, check_mode, input_shapes, time_on_random
from resnext.speed.kernel_module import KernelModule
from resnext.speed.pointwise_fusion import onednn_conv
from resnext.speed.prepacked import PrepackedConv
from resnext.speed.timing_cache import TimingCache, cached, layer_key

BACKENDS = ("amx", "dot")  # `stem` on AMX tiles, `stem_dot` on AVX512-BF16 pair dot products


class FusedStem(KernelModule):
    """``max_pool2d(relu(conv(x)), 3, 2, 1)`` in one call of a fused stem kernel, in the
    convolution's dtype: `backend` 'amx' (`stem.run`: bf16, or float32 as bf16×3) or 'dot'
    (`stem_dot.run`: bf16).

    It reads float32 or bf16 input in NCHW or channels_last layout alike (`reads_any_input`),
    so the fast path hands it the caller's image without a cast. The packed weight and bias are
    plain attributes, as in `FastGroupedConv3x3`, so that a later ``.to(dtype)`` leaves them
    packed."""

    reads_any_input = True
    pools = True  # its output is the pooled map: the stem's activation before pooling is gone

    def __init__(self, conv: nn.Conv2d, backend: str = "amx") -> None:
        super().__init__()
        if backend not in BACKENDS:
            raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
        if not eligible(conv, backend):
            dtypes = "bf16" if backend == "dot" else "float32 or bf16"
            raise ValueError(
                f"conv: expected a {dtypes} square convolution with groups 1, zero padding below "
                f"the kernel size and outputs a multiple of {32 if backend == 'amx' else 64}, "
                f"got {conv}"
            )
        self.backend = backend
        self.packed = (stem if backend == "amx" else stem_dot).pack(conv.weight)
        self.bias = float_bias(conv)
        geometry = square_geometry(conv)
        assert geometry is not None  # eligible() checked it
        self.kernel, self.stride, self.padding = geometry
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.bf16 = conv.weight.dtype == torch.bfloat16

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.backend == "dot":
            return torch.ops.resnext.stem_dot(
                x, self.packed, self.bias, self.kernel, self.stride, self.padding
            )
        return torch.ops.resnext.stem(
            x, self.packed, self.bias, self.kernel, self.stride, self.padding, self.bf16
        )

    def extra_repr(self) -> str:
        k = self.kernel
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size=({k}, {k}), "
            f"stride={self.stride}, padding={self.padding} → relu → max_pool(3, 2, 1), "
            + ("bf16" if self.bf16 else "bf16x3")
            + f", {self.backend}"
        )


class ReluApplied(nn.Module):
    """Stands where the stem's (folded) BN was once `FusedStem` has applied the ReLU: the identity,
    also as `norm_act`'s fused call, so the network's forward applies nothing more."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def forward_act(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        if residual is not None:
            raise ValueError("residual: the stem has none; expected None")
        return x


def fuse_stem_relu(model: nn.Module) -> bool:
    """Where a `ResNeXt`'s stem is left apart (no `FusedStem`) with its convolution on oneDNN
    (`PrepackedConv`) and its BN folded away, have the convolution apply the stem's ReLU, in
    place, as the blocks' 1×1s apply theirs: its `bn1` becomes a `ReluApplied`. Whether it did.

    The eager fast paths' pass (`prepack_convs`) fuses only epilogues it finds in a traced
    block, and the network's own forward is not one; apart, the ReLU is a pass of its own over
    the network's largest tensor (3.3 ms of a 25 ms stem at batch 16 on the Xeon without AMX).
    """
    if not isinstance(model, ResNeXt) or not model._stem_act:
        return False
    conv = model.conv1
    if not isinstance(conv, PrepackedConv) or conv.relu or conv.in_place:
        return False
    if type(model.bn1) is not nn.Identity or not isinstance(model.relu, nn.ReLU):
        return False
    conv.relu = True
    model.bn1 = ReluApplied()
    return True


def eligible(conv: nn.Module, backend: str = "amx") -> bool:
    """Whether `conv` is a convolution the `backend` stem kernel computes."""
    geometry = square_geometry(conv)
    if backend == "dot":
        dtypes, supports = (torch.bfloat16,), stem_dot.supports
    else:
        dtypes, supports = (torch.float32, torch.bfloat16), stem.supports
    return (
        geometry is not None
        and conv.weight.dtype in dtypes
        and supports(conv.in_channels, conv.out_channels, *geometry)
    )


def stem_fusable(model: nn.Module, backend: str = "amx") -> bool:
    """Whether `model` is a BN-folded `ResNeXt` whose stem is conv → ReLU → 3×3/2 max pooling
    (padding 1) with a convolution the `backend` kernel takes."""
    if not isinstance(model, ResNeXt) or not model._stem_act:
        return False
    pool = model.maxpool
    return (
        isinstance(model.bn1, nn.Identity)
        and isinstance(model.relu, nn.ReLU)
        and isinstance(pool, nn.MaxPool2d)
        and _pair(pool.kernel_size) == (3, 3)
        and _pair(pool.stride) == (2, 2)
        and _pair(pool.padding) == (1, 1)
        and _pair(pool.dilation) == (1, 1)
        and not pool.ceil_mode
        and eligible(model.conv1, backend)
    )


def _pair(value: int | tuple[int, ...]) -> tuple[int, ...]:
    return (value, value) if isinstance(value, int) else tuple(value)


Runner = Callable[[torch.Tensor], object]


def _convolution_ways(conv: nn.Conv2d, input_size: tuple[int, ...]) -> list[Runner]:
    """The stem's convolution and ReLU as the compiled graph could run them: oneDNN with the
    weight prepacked and the ReLU fused (`onednn_conv`), and in float32 also our bf16×3 kernel."""
    dtype = conv.weight.dtype
    ways: list[Runner] = [onednn_conv(conv, input_size, relu=True)]
    if dtype == torch.float32 and conv_x3.unavailable_reason() is None and x3_eligible(conv):
        ways.append(ConvX3(conv, relu=True))
    return ways


def backend_for(dtype: torch.dtype) -> tuple[str | None, str | None]:
    """(the fused stem kernel this CPU runs for `dtype`, None) — 'amx' where it can, else 'dot'
    for bf16 — or (None, why neither can)."""
    amx = stem.unavailable_reason()
    if amx is None:
        return "amx", None
    if dtype != torch.bfloat16:
        return None, f"float32 needs the AMX kernel: {amx}"
    dot = stem_dot.unavailable_reason()
    if dot is None:
        return "dot", None
    return None, f"AMX kernel: {amx}; AVX512-BF16 kernel: {dot}"


def fuse_stem(
    model: nn.Module,
    example: torch.Tensor,
    *,
    mode: str = "auto",
    conv_x3_mode: str = "auto",
    repeats: int = 5,
    timings: TimingCache | None = None,
) -> list[LayerChoice]:
    """Put a `FusedStem` in place of `model`'s conv1, ReLU and max pooling (in place).

    `model` is a BN-folded `ResNeXt` in its inference dtype and channels_last, `example` its
    input (the same dtype and layout). 'auto' times the fused kernel against the fastest way to
    run the convolution (oneDNN; in float32 also `conv_x3`) followed by the pooling, on the real
    input shape, in turns, and fuses where the kernel is faster; 'on' always fuses (where the
    kernel cannot run here, a ConfigError says why); 'off' changes nothing. Returns one
    `LayerChoice` ('conv1', native_ms: convolution and pooling apart, kernel_ms: the fused stem,
    chosen 'fused' or 'separate', variant 'stem'), or none where the model's stem does not
    qualify or ('auto') the kernel cannot run here. The kernel is the AMX one where the CPU has
    AMX, else (bf16 only) the AVX512-BF16 one (`backend_for`). In float32 the AMX kernel computes
    bf16×3 products, so `conv_x3_mode` 'off' (float32 FMAs throughout) leaves the stem alone.
    With `timings`, times stored there are used instead of measured.
    """
    check_mode("fuse_stem", mode)
    if mode == "off":
        return []
    backend, reason = backend_for(example.dtype)
    if backend is None:
        if mode == "on" and stem_fusable(model):
            raise ConfigError(f"fuse_stem: 'on' but the kernel cannot run here: {reason}")
        return []
    if not stem_fusable(model, backend):
        return []
    if example.dtype == torch.float32 and conv_x3_mode == "off":
        return []  # float32 here is bf16×3 arithmetic, which conv_x3='off' rules out
    assert isinstance(model, ResNeXt)  # stem_fusable() checked it
    conv = model.conv1
    shape = input_shapes(model, ["conv1"], example).get("conv1")
    if shape is None:
        return []
    fused = FusedStem(conv, backend)
    ways = _convolution_ways(conv, shape)
    pool = "ours" if maxpool.unavailable_reason() is None else "torch"
    if pool == "ours":
        ways = [lambda x, way=way: maxpool.forward(way(x), *stem.POOL) for way in ways]
    measure = functools.partial(time_on_random, [*ways, fused], shape, example.dtype, repeats)
    key = layer_key(
        "stem", shape, example.dtype, conv, f"{len(ways)} ways, {pool} pooling, {backend}"
    )
    times = cached(timings, key, len(ways) + 1, measure)
    separate_ms, fused_ms = min(times[:-1]), times[-1]
    use = mode == "on" or fused_ms < separate_ms
    if use:
        model.conv1, model.bn1, model.maxpool = fused, ReluApplied(), nn.Identity()
    chosen = "fused" if use else "separate"
    return [LayerChoice("conv1", tuple(shape), separate_ms, fused_ms, chosen, "stem")]
