"""Grouped convolutions run as convolutions of fewer, wider groups with block-diagonal weights.

A convolution of G groups equals one of G/m groups whose weights hold each run of m original
groups as the diagonal blocks of one wider group, zeros elsewhere: the same function for m times
the products. On a GPU, cuDNN runs ResNeXt-50's narrow groups (4 to 32 channels) well below its
dense rate, so fewer, wider groups can take less time despite the zeros. `widen_groups` does it
for inference (the wide weights made once); `MergedGroupsConv2d` for training, where the wide
weights are made from the grouped ones on each call so that the parameter, its gradient and its
state-dict key stay those of the grouped convolution.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from resnext.errors import ConfigError
from resnext.speed.fold import set_module
from resnext.speed.measure import time_call

FACTORS = (1, 2, 4, 8, 16, 32)  # groups merged into one; 1 is the grouped convolution itself


def merged_weight(weight: torch.Tensor, groups: int, factor: int) -> torch.Tensor:
    """The weight of `groups // factor` groups whose diagonal blocks are `weight`'s groups.

    `weight` is a grouped convolution's (out, in // groups, kh, kw); the result is
    (out, factor * in // groups, kh, kw). Differentiable: gradients reach `weight` only.
    """
    if factor < 1 or groups % factor:
        raise ConfigError(f"factor: expected a divisor of the {groups} groups, got {factor}")
    out_ch, in_per, kh, kw = weight.shape
    if out_ch % groups:
        raise ConfigError(f"groups: {groups} does not divide the weight's {out_ch} outputs")
    if factor == 1:
        return weight
    blocks = weight.reshape(groups // factor, factor, out_ch // groups, in_per, kh, kw)
    eye = torch.eye(factor, dtype=weight.dtype, device=weight.device)
    # wide[g, a, o, b, i] = blocks[g, a, o, i] if a == b else 0 (multiplying by 1 and 0 is exact)
    wide = torch.einsum("gaoikl,ab->gaobikl", blocks, eye)
    return wide.reshape(out_ch, factor * in_per, kh, kw)


def _check_mergeable(conv: nn.Conv2d, factor: int) -> None:
    if conv.padding_mode != "zeros":
        raise ConfigError(f"padding_mode: merging groups needs 'zeros', got {conv.padding_mode!r}")
    if factor < 1 or conv.groups % factor:
        raise ConfigError(f"factor: expected a divisor of the {conv.groups} groups, got {factor}")


def _like(cls: type[nn.Conv2d], conv: nn.Conv2d, groups: int, **where: object) -> nn.Conv2d:
    """A `cls` convolution of `conv`'s shape and geometry with `groups` groups and no bias yet."""
    return cls(
        conv.in_channels,
        conv.out_channels,
        conv.kernel_size,
        stride=conv.stride,
        padding=conv.padding,
        dilation=conv.dilation,
        groups=groups,
        bias=False,
        **where,
    )


def widened(conv: nn.Conv2d, factor: int) -> nn.Conv2d:
    """A plain convolution of `conv.groups // factor` groups computing what `conv` computes."""
    _check_mergeable(conv, factor)
    weight = conv.weight.detach()
    wide = _like(nn.Conv2d, conv, conv.groups // factor, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        wide.weight.copy_(merged_weight(weight, conv.groups, factor))
    if conv.bias is not None:
        wide.bias = nn.Parameter(conv.bias.detach().clone())
    return wide.requires_grad_(conv.weight.requires_grad)


class MergedGroupsConv2d(nn.Conv2d):
    """A grouped convolution (same parameters, keys and gradients) computed `merge` groups at a
    time through a block-diagonal weight made on each call."""

    merge: int

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, factor: int) -> MergedGroupsConv2d:
        """`conv` computed `factor` groups at a time; it shares `conv`'s parameters."""
        _check_mergeable(conv, factor)
        # on the meta device: no memory for a weight about to be replaced by conv's
        out = _like(cls, conv, conv.groups, device="meta")
        out.weight = conv.weight
        out.bias = conv.bias
        out.merge = factor
        return out.train(conv.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = merged_weight(self.weight, self.groups, self.merge)
        return F.conv2d(
            x,
            weight,
            self.bias,
            self.stride,
            self.padding,
            self.dilation,
            self.groups // self.merge,
        )

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, merge={self.merge}"


def grouped_convs(model: nn.Module) -> list[str]:
    """Names of the model's convolutions with more than one group."""
    return [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and m.groups > 1]


def widen_groups(model: nn.Module, factors: Mapping[str, int]) -> nn.Module:
    """`model` (in place) with each named grouped convolution widened by its factor; for
    inference (the wide weights are fixed copies, no longer the grouped parameters)."""
    for name, factor in factors.items():
        if factor != 1:
            set_module(model, name, widened(model.get_submodule(name), factor))
    return model


def merge_groups(model: nn.Module, factors: Mapping[str, int]) -> nn.Module:
    """`model` (in place) with each named grouped convolution computed `factor` groups at a time
    (for training: parameters, state-dict keys and gradients unchanged)."""
    for name, factor in factors.items():
        if factor != 1:
            set_module(model, name, MergedGroupsConv2d.from_conv(model.get_submodule(name), factor))
    return model


@dataclass(frozen=True)
class GroupedLayer:
    """One grouped convolution's configuration and input shape: what its timing depends on."""

    in_channels: int
    out_channels: int
    kernel: int
    stride: int
    padding: int
    groups: int
    input_shape: tuple[int, ...]

    @property
    def label(self) -> str:
        _, c, h, w = self.input_shape
        size = f"{self.kernel}x{self.kernel}/{self.stride}"
        if self.padding != self.kernel // 2:
            size += f" pad {self.padding}"
        return f"{c}->{self.out_channels} {size} g{self.groups} @ {h}x{w}"

    def conv(self, factor: int, device: torch.device, dtype: torch.dtype) -> nn.Conv2d:
        """A random convolution of this layer's configuration, merged by `factor`."""
        conv = nn.Conv2d(
            self.in_channels,
            self.out_channels,
            self.kernel,
            stride=self.stride,
            padding=self.padding,
            groups=self.groups,
            bias=False,
        )
        conv = conv.to(device=device, dtype=dtype, memory_format=torch.channels_last)
        return MergedGroupsConv2d.from_conv(conv, factor) if factor > 1 else conv


def grouped_layers(
    model: nn.Module, example: torch.Tensor, names: Iterable[str] | None = None
) -> dict[str, GroupedLayer]:
    """Each grouped convolution of `model` (or each convolution in `names`), by name, with the
    input shape that `example` gives it."""
    found: dict[str, GroupedLayer] = {}
    handles = []
    training = model.training  # probed in eval mode: no batch-norm statistics move
    for name in grouped_convs(model) if names is None else names:
        conv = model.get_submodule(name)

        def hook(module: nn.Module, args: tuple, name: str = name) -> None:
            found[name] = GroupedLayer(
                module.in_channels,
                module.out_channels,
                module.kernel_size[0],
                module.stride[0],
                module.padding[0],
                module.groups,
                tuple(args[0].shape),
            )

        handles.append(conv.register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            model.eval()(example)
    finally:
        model.train(training)
        for handle in handles:
            handle.remove()
    return found


def time_ms(fn: Callable[[], object], device: torch.device, iters: int, rounds: int = 3) -> float:
    """Median over `rounds` of the mean milliseconds per call of `fn` (device time on CUDA)."""
    fn()  # first call: cuDNN's algorithm search, allocations
    cuda = device.type == "cuda"
    per_round = []
    for _ in range(rounds):
        if cuda:
            torch.cuda.synchronize(device)
            start, end = (torch.cuda.Event(enable_timing=True) for _ in range(2))
            start.record()
            for _ in range(iters):
                fn()
            end.record()
            end.synchronize()
            per_round.append(start.elapsed_time(end) / iters)
        else:
            per_round.append(1e3 * time_call(fn, iters))
    return statistics.median(per_round)


def layer_call(
    layer: GroupedLayer, factor: int, device: torch.device, dtype: torch.dtype, train: bool
) -> Callable[[], object]:
    """One call of the layer merged by `factor`: forward (no grad), or forward and backward
    (input and weight gradients, the wide weight made inside the step as in training)."""
    conv = layer.conv(factor, device, dtype)
    x = torch.randn(layer.input_shape, device=device, dtype=dtype)
    x = x.contiguous(memory_format=torch.channels_last)
    if not train:
        wide = widened(conv, factor) if factor > 1 else conv

        def forward() -> object:
            with torch.no_grad():
                return wide(x)

        return forward
    x.requires_grad_(True)
    with torch.no_grad():
        grad = torch.randn_like(conv(x))

    def step() -> object:
        x.grad = None
        conv.weight.grad = None
        conv(x).backward(grad)
        return x.grad

    return step


def choose_factors(
    layers: Mapping[str, GroupedLayer],
    device: torch.device,
    *,
    train: bool,
    dtype: torch.dtype = torch.bfloat16,
    candidates: Iterable[int] = FACTORS,
    iters: int = 10,
) -> tuple[dict[str, int], dict[str, dict[int, float]]]:
    """The fastest merge factor of each layer (by name) on `device`, and each layer
    configuration's ms per factor (by label). Alike layers (same configuration and input shape)
    are timed once."""
    candidates = tuple(candidates)  # read once per layer
    times: dict[str, dict[int, float]] = {}
    chosen: dict[str, int] = {}
    for name, layer in layers.items():
        if layer.label not in times:
            usable = [f for f in candidates if layer.groups % f == 0]
            times[layer.label] = {
                f: time_ms(layer_call(layer, f, device, dtype, train), device, iters)
                for f in usable
            }
        row = times[layer.label]
        chosen[name] = min(row, key=row.__getitem__)
    return chosen, times


def widen_where_faster(
    model: nn.Module, example: torch.Tensor, *, candidates: Iterable[int] = FACTORS
) -> dict[str, int]:
    """`model`'s grouped convolutions (in place) each widened by its fastest factor for inference
    on inputs like `example` (on its device, in its dtype); the factors (1: left as it is)."""
    layers = grouped_layers(model, example)
    factors, _ = choose_factors(
        layers, example.device, train=False, dtype=example.dtype, candidates=candidates
    )
    widen_groups(model, factors)
    return factors


def merge_where_faster(
    model: nn.Module,
    example: torch.Tensor,
    *,
    dtype: torch.dtype | None = None,
    candidates: Iterable[int] = FACTORS,
) -> dict[str, int]:
    """`model`'s grouped convolutions (in place) each computed by its fastest merge factor for a
    training step (forward, input and weight gradients) on inputs like `example`, with the
    products in `dtype` (the autocast dtype; default `example`'s); the factors (1: as it is)."""
    layers = grouped_layers(model, example)
    factors, _ = choose_factors(
        layers, example.device, train=True, dtype=dtype or example.dtype, candidates=candidates
    )
    merge_groups(model, factors)
    return factors
