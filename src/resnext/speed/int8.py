"""Int8 inference: a ResNeXt quantized after training, in torchvision's quantized module tree.

`quantize_int8(model, calibration)` rebuilds a float network as torchvision's quantizable ResNet
lays it out (`quant` and `dequant` stubs around the network; in each bottleneck `relu1`, `relu2`
and `skip_add_relu` beside the float model's children), fuses each convolution with its batch
norm (and ReLU), observes the activations of the calibration batches, and converts it with
torch.ao's eager-mode quantization: int8 weights per output channel, uint8 activations with one
scale per tensor, int32 sums (VNNI where the CPU has it; `torch.backends.quantized` engine
`onednn` where torch has it, else `x86`). Its state-dict keys are then those of torchvision's
quantized checkpoints (`conv1.scale`, `layer1.0.skip_add_relu.zero_point`,
`fc._packed_params._packed_params`, ...), so `int8_template` gives the tree such a checkpoint
loads into (`resnext.weights.int8`).

torch marks both torch.ao's eager quantization and quantized tensors as deprecated (torch 2.13
still has them, as 2.11 and 2.12 do): this module works while torch keeps them. It silences
those two warnings; docs/speed.md ("Int8 inference") says so instead.
"""

from __future__ import annotations

import contextlib
import copy
import warnings
from collections.abc import Iterable, Iterator, Sequence
from typing import NoReturn

import torch
from torch import nn
from torch.ao import quantization as tq
from torch.ao.nn.quantized import FloatFunctional

from resnext.errors import ConfigError
from resnext.models.blocks import Bottleneck
from resnext.models.network import ResNeXt
from resnext.speed import add_int8, autotune, grouped_int8
from resnext.speed.capability import cpu_flags

ENGINES = ("auto", "onednn", "x86", "fbgemm")
OBSERVERS = ("histogram", "minmax")


def _refuse(what: str, got: object, allowed: str) -> NoReturn:
    raise ConfigError(f"{what}: int8 quantization takes {allowed}, got {got!r}")


def check_quantizable(model: nn.Module) -> None:
    """ConfigError (a ValueError) naming the first thing of `model` the int8 tree does not
    take: it takes post-activation form-c ResNeXts (ImageNet or CIFAR stem, no
    squeeze-and-excitation) in float32 on the CPU."""
    if not isinstance(model, ResNeXt):
        _refuse("model", type(model).__name__, "a resnext ResNeXt network")
    spec = model.spec
    if spec.preact:
        _refuse("preact", spec.preact, "post-activation networks (preact=False)")
    if spec.block_form != "c":
        _refuse("block_form", spec.block_form, "the grouped form 'c'")
    if spec.stem not in ("imagenet", "cifar"):
        _refuse("stem", spec.stem, "the 'imagenet' or 'cifar' stem")
    if spec.se_reduction:
        _refuse("se_reduction", spec.se_reduction, "networks without squeeze-and-excitation (0)")
    param = next(model.parameters())
    if param.dtype != torch.float32 or param.device.type != "cpu":
        _refuse("model", f"{param.dtype} on {param.device}", "a float32 model on the CPU")
    if not isinstance(model.fc, (nn.Linear, nn.Identity)):
        _refuse("fc", type(model.fc).__name__, "an nn.Linear classifier (or none)")


class Int8Bottleneck(nn.Module):
    """A bottleneck laid out as torchvision's quantizable one: the float block's children, plus
    `relu1`, `relu2` and `skip_add_relu` (the residual add and ReLU, quantized as one op).

    Once quantized, its grouped 3×3 runs on our int8 kernel (`resnext.speed.grouped_int8`) where
    the CPU has AVX512-VNNI and the kernel takes the layer, and its residual add-and-ReLU on ours
    (`resnext.speed.add_int8`) where the CPU has AVX-512, unless `kernels` is False. They read
    `conv2`'s and `skip_add_relu`'s own weights and scales, so the state dict is the same either
    way."""

    def __init__(self, block: Bottleneck) -> None:
        super().__init__()
        for name in ("conv1", "bn1", "conv2", "bn2", "conv3", "bn3", "downsample"):
            setattr(self, name, copy.deepcopy(getattr(block, name)))
        self.residual = block.residual
        self.relu = nn.ReLU()  # after conv3 where there is no residual; else unused, as there
        self.relu1, self.relu2 = nn.ReLU(), nn.ReLU()
        self.skip_add_relu = FloatFunctional()
        self.kernels = True
        # (the quantized conv2's packed weights, our kernel for them or None): not a module, so
        # neither in the state dict nor stale after new weights are loaded into conv2
        self._kernel: tuple[object, grouped_int8.GroupedInt8 | None] | None = None

    def _conv2(self, x: torch.Tensor) -> torch.Tensor:
        conv = self.conv2
        if self.kernels and x.is_quantized:
            packed = getattr(conv, "_packed_params", None)
            if self._kernel is None or self._kernel[0] is not packed:
                takes = grouped_int8.unavailable_reason() is None and grouped_int8.supports(conv)
                self._kernel = (packed, grouped_int8.GroupedInt8(conv) if takes else None)
            kernel = self._kernel[1]
            if kernel is not None:
                # timed against torch's engine at each new shape, which wins some layers on
                # CPUs without VNNI (RESULTS.md, stop 65)
                key = (tuple(x.shape), kernel.cpg, kernel.stride, torch.backends.quantized.engine)
                candidates = {
                    "engine": lambda: self.relu2(self.bn2(conv(x))),
                    "ours": lambda: kernel(x, float(conv.scale), int(conv.zero_point)),
                }
                return autotune.run("grouped3x3.int8", key, candidates)
        return self.relu2(self.bn2(conv(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self._conv2(out)
        out = self.bn3(self.conv3(out))
        if not self.residual:
            return self.relu(out)
        identity = x if self.downsample is None else self.downsample(x)
        return self._add_relu(out, identity)

    def _add_relu(self, out: torch.Tensor, identity: torch.Tensor) -> torch.Tensor:
        add = self.skip_add_relu
        # not while calibrating: float maps, a float add without a scale yet
        if self.kernels and out.is_quantized and add_int8.unavailable_reason() is None:
            y = add_int8.add_relu_if_taken(out, identity, float(add.scale), int(add.zero_point))
            if y is not None:
                return y
        return add.add_relu(out, identity)

    def fuse(self) -> None:
        """Fold each batch norm into its convolution (and the ReLU after it), in place."""
        last = ["conv3", "bn3"] if self.residual else ["conv3", "bn3", "relu"]
        tq.fuse_modules(
            self, [["conv1", "bn1", "relu1"], ["conv2", "bn2", "relu2"], last], inplace=True
        )
        if self.downsample is not None:
            # (conv, bn), or (avg pool, conv, bn) for the average-pool shortcut
            first = next(i for i, m in enumerate(self.downsample) if isinstance(m, nn.Conv2d))
            tq.fuse_modules(self.downsample, [str(first), str(first + 1)], inplace=True)


class Int8ResNeXt(nn.Module):
    """A ResNeXt in torchvision's quantizable layout (`quant`, `conv1`, `bn1`, `relu`,
    `maxpool`, `layer1`…, `avgpool`, `fc`, `dequant`): float until `quantize_int8` or
    `int8_template` converts it. Takes and returns float tensors."""

    def __init__(self, model: ResNeXt) -> None:
        super().__init__()
        check_quantizable(model)
        self.spec = model.spec
        self.num_classes = model.num_classes
        self.stage_names = list(model.stage_names)
        self.quant, self.dequant = tq.QuantStub(), tq.DeQuantStub()
        self.conv1, self.bn1 = copy.deepcopy(model.conv1), copy.deepcopy(model.bn1)
        self.relu = nn.ReLU()
        self.maxpool = copy.deepcopy(model.maxpool)
        for name, stage in zip(self.stage_names, model.stages(), strict=True):
            setattr(self, name, nn.Sequential(*(Int8Bottleneck(b) for b in stage)))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = copy.deepcopy(model.fc)
        self.preprocessing = getattr(model, "preprocessing", None)
        self.class_names = getattr(model, "class_names", None)

    def _stem(self, x: torch.Tensor) -> torch.Tensor:
        # the int8 convolutions run channels-last; a quantized NCHW input would be reordered
        x = self.quant(x.contiguous(memory_format=torch.channels_last))
        return self.maxpool(self.relu(self.bn1(self.conv1(x))))

    def _head(self, q: torch.Tensor) -> torch.Tensor:
        x = self.dequant(self.fc(torch.flatten(self.avgpool(q), 1)))
        scale = self.spec.logit_scale
        return x * scale if scale != 1.0 and self.num_classes > 0 else x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._stem(x)
        for name in self.stage_names:
            x = getattr(self, name)(x)
        return self._head(x)

    def forward_stages(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Every stage's output map, dequantized to float (as `ResNeXt.forward_stages`)."""
        x, outs = self._stem(x), []
        for name in self.stage_names:
            x = getattr(self, name)(x)
            outs.append(x.dequantize())
        return outs

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The last stage's map, dequantized to float."""
        return self.forward_stages(x)[-1]

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Global average pool, then the int8 classifier unless `pre_logits`, of a float map
        (`forward_features`'s), requantized on the last block's own scale: the logits are
        `forward`'s."""
        if pre_logits:
            return torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1)
        last = getattr(self, self.stage_names[-1])[-1]
        out = last.skip_add_relu if last.residual else last.conv3
        q = torch.quantize_per_tensor(x, float(out.scale), int(out.zero_point), torch.quint8)
        return self._head(q)

    def use_kernels(self, enabled: bool = True) -> Int8ResNeXt:
        """Whether the grouped 3×3s and the residual add-and-ReLUs run on our int8 kernels where
        they run (the default) or on torch's quantized engine (for comparison); returns the
        network."""
        for name in self.stage_names:
            for block in getattr(self, name):
                block.kernels = enabled
        return self

    def fuse(self) -> None:
        """Fold every batch norm into its convolution (and ReLU), in place."""
        tq.fuse_modules(self, ["conv1", "bn1", "relu"], inplace=True)
        for name in self.stage_names:
            for block in getattr(self, name):
                block.fuse()


# CPU flags with which int8 products are summed straight into int32 (no int16 pair sums)
VNNI_FLAGS = frozenset({"avx512_vnni", "avx_vnni", "amx_int8"})


def qconfig(observer: str = "histogram", activation_bits: int = 7) -> tq.QConfig:
    """Weights int8 per output channel, symmetric; activations uint8 with one scale per tensor,
    from a histogram of the calibration values (`histogram`: the range that least distorts
    them) or their extremes (`minmax`, torchvision's own for its checkpoints), spread over
    `activation_bits` bits. 7 (torchvision's) keeps the pair sums of x86 CPUs without VNNI
    within int16; 8 halves the activations' rounding where products are summed in int32."""
    if observer not in OBSERVERS:
        _refuse("observer", observer, f"one of {OBSERVERS}")
    if activation_bits not in (7, 8):
        _refuse("activation_bits", activation_bits, "7 or 8")
    activation = tq.HistogramObserver if observer == "histogram" else tq.MinMaxObserver
    top = 2**activation_bits - 1
    return tq.QConfig(
        activation=activation.with_args(dtype=torch.quint8, quant_min=0, quant_max=top),
        weight=tq.default_per_channel_weight_observer,
    )


def resolve_engine(engine: str, supported: Sequence[str] | None = None) -> str:
    """`engine`, with 'auto' as 'onednn' where this torch has it (ResNeXt-50 ran at 1.12× the
    speed of the x86 engine and 1.43× that of fbgemm on the Xeon of RESULTS.md's stop 62), else
    'x86'. `supported`: the engines to choose among (default: this torch's)."""
    if engine not in ENGINES:
        _refuse("engine", engine, f"one of {ENGINES}")
    if engine != "auto":
        return engine
    if supported is None:
        supported = torch.backends.quantized.supported_engines
    return "onednn" if "onednn" in supported else "x86"


@contextlib.contextmanager
def quantized_engine(engine: str) -> Iterator[None]:
    """torch's quantized engine set to `engine` inside the block, as it was after it (weights
    are packed for the engine set when they are converted or loaded)."""
    engine = resolve_engine(engine)
    if engine not in torch.backends.quantized.supported_engines:
        raise RuntimeError(
            f"engine: this torch has no quantized engine {engine!r} "
            f"(it has {torch.backends.quantized.supported_engines})"
        )
    before = torch.backends.quantized.engine
    torch.backends.quantized.engine = engine
    try:
        yield
    finally:
        torch.backends.quantized.engine = before


def _check_batch(index: int, x: object, channels: int) -> torch.Tensor:
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() != 4:
        what = f"a {x.dtype} tensor of {x.dim()} dims" if isinstance(x, torch.Tensor) else type(x)
        raise ConfigError(
            f"calibration[{index}]: expected a float (N, {channels}, H, W) batch, got {what}"
        )
    if x.shape[1] != channels or x.shape[0] < 1:
        raise ConfigError(
            f"calibration[{index}]: expected a float (N, {channels}, H, W) batch, got "
            f"{tuple(x.shape)}"
        )
    return x.float().cpu()


@contextlib.contextmanager
def _quantizing(engine: str) -> Iterator[None]:
    """Where torch.ao prepares, calibrates and converts: `engine` set, no autograd, and its
    deprecation notices silenced."""
    with quantized_engine(engine), torch.no_grad(), warnings.catch_warnings():
        # torch.ao's eager quantization is marked for a move to torchao; torch 2.11–2.13 have it,
        # and torchvision's own quantized models are built with it
        warnings.filterwarnings("ignore", "torch.ao.quantization is deprecated", DeprecationWarning)
        # and quantized tensors themselves are marked deprecated since torch 2.13 (pytorch#184982)
        warnings.filterwarnings("ignore", ".*quantized tensor creation functions", UserWarning)
        yield


def _converted(
    model: ResNeXt,
    batches: Iterable[torch.Tensor],
    engine: str,
    observer: str,
    activation_bits: int = 7,
) -> Int8ResNeXt:
    net = Int8ResNeXt(model).eval()
    net.fuse()
    net.qconfig = qconfig(observer, activation_bits)
    with _quantizing(engine):
        tq.prepare(net, inplace=True)
        seen = 0
        for i, x in enumerate(batches):
            net(_check_batch(i, x, model.spec.in_chans))
            seen += 1
        if seen == 0:
            raise ConfigError("calibration: expected at least one batch of images, got none")
        tq.convert(net, inplace=True)
    return net


def quantize_int8(
    model: ResNeXt,
    calibration: Iterable[torch.Tensor],
    *,
    engine: str = "auto",
    observer: str = "histogram",
    activation_bits: int = 7,
) -> Int8ResNeXt:
    """`model` (left as it is) quantized to int8 after training, its activation ranges observed
    on the `calibration` batches (float (N, C, H, W), preprocessed as the model expects; a few
    hundred real images are usual). The result computes in int8 and takes and returns float.
    `activation_bits` 8 is refused on a CPU without VNNI (see `qconfig`); a network quantized so
    should run only on CPUs with it."""
    check_quantizable(model)
    if activation_bits == 8 and not VNNI_FLAGS & cpu_flags():
        raise ConfigError(
            "activation_bits: 8 needs a CPU that sums int8 products in int32 (one of "
            f"{sorted(VNNI_FLAGS)}); this one has none, so use 7"
        )
    if isinstance(calibration, torch.Tensor):
        calibration = [calibration]
    elif not isinstance(calibration, Iterable):
        raise ConfigError(
            "calibration: expected float (N, C, H, W) batches (a list, or any iterable), got "
            f"{type(calibration).__name__}"
        )
    return _converted(model, calibration, engine, observer, activation_bits)


def int8_template(model: ResNeXt, *, engine: str = "auto") -> Int8ResNeXt:
    """The quantized tree of `model` with placeholder scales, for loading a quantized state dict
    (torchvision's quantized checkpoints) into with `load_state_dict`."""
    check_quantizable(model)
    probe = torch.rand(1, model.spec.in_chans, 32, 32)
    return _converted(model, [probe], engine, "minmax")


def quantize_conv(
    conv: nn.Conv2d,
    x: torch.Tensor,
    *,
    relu: bool = False,
    observer: str = "minmax",
    activation_bits: int = 8,
    engine: str = "auto",
) -> tuple[nn.Module, torch.Tensor]:
    """One float convolution (and a ReLU after it, fused) quantized as `quantize_int8` quantizes
    a network's, its input and output ranges observed on `x`; returns the quantized module and
    `x` quantized as its input (channels-last): one layer's int8 function, for kernels' checks
    and benchmarks."""
    layers = [copy.deepcopy(conv).eval()] + ([nn.ReLU()] if relu else [])
    net = nn.Sequential(tq.QuantStub(), *layers, tq.DeQuantStub()).eval()
    if relu:
        tq.fuse_modules(net, [["1", "2"]], inplace=True)
    net.qconfig = qconfig(observer, activation_bits)
    with _quantizing(engine):
        tq.prepare(net, inplace=True)
        net(x)
        tq.convert(net, inplace=True)
        return net[1], net[0](x.contiguous(memory_format=torch.channels_last))
