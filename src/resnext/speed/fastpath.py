"""`optimize`: the inference fast path (eval, BN folded, channels_last, bf16, compiled graph).

On CPU it also swaps in our kernels where they time faster; on a GPU it is the generic part."""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn

from resnext import devices
from resnext.errors import ConfigError
from resnext.models.features import FeatureNet
from resnext.speed.capability import (
    bf16_faster,
    bf16_runs_on,
    bf16_speedup,
    fastest_dtype,
    fastest_precision,
)
from resnext.speed.fold import fold_batchnorm
from resnext.speed.grouped_swap import check_mode
from resnext.speed.kernel_passes import Choices, run_passes
from resnext.speed.measure import interleaved, median_ratio
from resnext.speed.merged_groups import widen_where_faster
from resnext.speed.pointwise_fp16 import unavailable_reason as pointwise_fp16_unavailable
from resnext.speed.replay import TORCH_STEP_MS, Replayed
from resnext.speed.shapes import check_new_shapes, input_key
from resnext.speed.timing_cache import TimingCache

BACKENDS = ("inductor", "jit", "replay", "none")
MERGE_MODES = ("auto", "off")
RECOMPILE_LIMIT = 256


def check_batch(
    x: object, channels: int | None, what: str = "input", error: type[ValueError] = ValueError
) -> None:
    """An `error` naming `what` unless `x` is a float image batch (N, C, H, W) with `channels`
    channels (any count where None): our kernels would otherwise fail on it with messages about
    their own operands, or a replay on its first recording."""
    if not isinstance(x, torch.Tensor):
        raise error(f"{what}: expected a torch.Tensor image batch, got {type(x).__name__}")
    if x.dim() != 4:
        raise error(f"{what}: expected an image batch (N, C, H, W), got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise error(f"{what}: expected a floating-point image batch, got {x.dtype}")
    if channels is not None and x.shape[1] != channels:
        raise error(
            f"{what}: expected {channels} channels (N, C, H, W), got shape {tuple(x.shape)}"
        )


def input_channels(model: nn.Module) -> int:
    """The channels of the images `model` takes: its spec's `in_chans`, else its first Conv2d's
    input channels; a ConfigError unless it is an image network (a module with a Conv2d)."""
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model: expected a torch nn.Module, got {type(model).__name__}")
    if isinstance(model, FeatureNet):
        raise ConfigError(
            "model: expected a network returning one tensor, got a FeatureNet (features_only), "
            "which returns a list of maps; optimize the whole network instead"
        )
    chans = getattr(getattr(model, "spec", None), "in_chans", None)
    if isinstance(chans, int):
        return chans
    first = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    if first is None:
        raise ConfigError(
            "model: expected an image network with Conv2d layers (e.g. resnext.create_model's), "
            f"got {type(model).__name__} without one"
        )
    return first.in_channels


def check_device(device: torch.device | str | int, *, present: bool = True) -> torch.device:
    """`device` as a torch.device the fast path can run on ('cpu' or 'cuda'), and with `present`
    one torch sees here; a ConfigError naming it otherwise (checked before the model is copied,
    folded and moved)."""
    return devices.check_device(device, present=present, runner="the fast path")


def check_shapes(shapes: object, channels: int) -> list[tuple[int, ...]]:
    """`warmup_shapes` as a list of (N, C, H, W) tuples of `channels` channels; a ConfigError
    naming it otherwise."""
    expected = f"(N, {channels}, H, W) tuples of integers >= 1"
    try:
        found = [tuple(shape) for shape in shapes]  # type: ignore[union-attr]
    except TypeError:
        raise ConfigError(f"warmup_shapes: expected {expected}, got {shapes!r}") from None
    for shape in found:
        if (
            len(shape) != 4
            or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in shape)
            or shape[1] != channels
        ):
            raise ConfigError(f"warmup_shapes: expected {expected}, got {shape!r}")
    return found


class CastInput(nn.Module):
    """Moves the input to the model's device, dtype and memory format; returns float32 outputs.

    A model whose first layer reads float32 and bf16 input in either layout itself (a fused
    stem, `reads_any_input`, CPU only) gets the input as it is (other dtypes as float32): the
    layer converts each value once as it reads it, where a cast would be a pass of its own.
    Inputs are checked first (`check_batch`, against `in_channels` where given)."""

    in_channels: int | None = None  # modules saved before it was kept check the rest

    def __init__(
        self,
        model: nn.Module,
        dtype: torch.dtype,
        channels_last: bool,
        device: torch.device | None = None,
        in_channels: int | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        self.dtype = dtype
        self.device = device or torch.device("cpu")
        # a flag, not the torch.memory_format: torch.save's pickle protocol cannot store one
        self.channels_last = channels_last
        self.in_channels = in_channels

    @property
    def memory_format(self) -> torch.memory_format:
        return torch.channels_last if self.channels_last else torch.contiguous_format

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_tracing():  # a trace keeps no check (TracedModule checks itself)
            check_batch(x, self.in_channels)
        if getattr(getattr(self.model, "conv1", None), "reads_any_input", False):
            if x.dtype not in (torch.float32, torch.bfloat16):
                x = x.float()
        else:
            x = x.to(device=self.device, dtype=self.dtype, memory_format=self.memory_format)
        return self.model(x).float()


class FrozenInductor(nn.Module):
    """A torch.compile'd module whose calls (and so its compilations) run with inductor freezing.

    Freezing turns the parameters into constants, so inductor can pre-pack the convolution
    weights for oneDNN; the flag is patched around each call instead of set process-wide.
    `new_shapes` says what an input unlike every one compiled so far does once `build` is over:
    'compile' (torch.compile's way: a new graph, seconds to tens of seconds on a small CPU) or
    'eager' (it runs on `module`, the same function without the compiled graph).
    """

    def __init__(
        self,
        module: nn.Module,
        dynamic: bool | None = False,
        cpp_wrapper: bool = False,
        new_shapes: str = "compile",
    ) -> None:
        super().__init__()
        check_new_shapes(new_shapes)
        self.module = module
        self.cpp_wrapper = cpp_wrapper
        self.new_shapes = new_shapes
        self.compiled = torch.compile(module, dynamic=dynamic)
        self.built: set[tuple[object, ...]] = set()  # the inputs compiled for, by `input_key`

    def build(self, x: torch.Tensor) -> torch.Tensor:
        """Compile for an input like `x` (if not yet) and run it."""
        out = self._compiled(x)
        self.built.add(input_key(x))
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(self.module, CastInput):  # before dynamo, which would retrace to refuse it
            check_batch(x, self.module.in_channels)
        if self.new_shapes == "eager" and input_key(x) not in self.built:
            with torch.no_grad():
                return self.module(x)
        return self.build(x)

    def _compiled(self, x: torch.Tensor) -> torch.Tensor:
        import torch._inductor.config as inductor_config

        # Every optimize() call compiles the same forward code again (new module, new guards);
        # dynamo's default limit of 8 versions per code object would silently fall back to eager
        # after a few optimized models in one process.
        with (
            torch.no_grad(),
            inductor_config.patch(freezing=True, cpp_wrapper=self.cpp_wrapper),
            torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT),
        ):
            return self.compiled(x)


class TracedModule(nn.Module):
    """A torch.jit.trace'd and frozen module (the TorchScript fast path), one trace per kind of
    input (`shapes.input_key`).

    A trace keeps as constants what `module` computed for the input it was traced on (our 1×1
    kernels' weights packed for its pixel count), so it runs only inputs like that one: traced in
    `build`, an input unlike every one so far is traced for when it comes (`new_shapes`
    'compile', a forward's time and the freezing) or runs on `module`, the same function
    without the trace ('eager'), as the inductor and replay backends do."""

    def __init__(
        self, module: nn.Module, example: torch.Tensor, new_shapes: str = "compile"
    ) -> None:
        super().__init__()
        check_new_shapes(new_shapes)
        self.module = module
        self.in_channels = example.shape[1]
        self.new_shapes = new_shapes
        self.traces: dict[tuple[object, ...], torch.jit.ScriptModule] = {}
        self.build(example)

    def build(self, x: torch.Tensor) -> torch.Tensor:
        """Trace for inputs like `x` (if not yet) and run it."""
        key = input_key(x)
        with torch.no_grad():
            if key not in self.traces:
                traced = torch.jit.trace(self.module, x, check_trace=False)
                self.traces[key] = torch.jit.optimize_for_inference(torch.jit.freeze(traced.eval()))
            return self.traces[key](x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_batch(x, self.in_channels)  # a trace keeps none of CastInput's checks
        if self.new_shapes == "eager" and input_key(x) not in self.traces:
            with torch.no_grad():
                return self.module(x)
        return self.build(x)


def resolve_dtype(dtype: torch.dtype | str, device: torch.device | None = None) -> torch.dtype:
    """torch.float32 / torch.bfloat16 from a dtype or its name ('fp32', 'bf16', 'float32' ...);
    'auto' is `fastest_dtype(device)`."""
    names = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16}
    names["bfloat16"] = torch.bfloat16
    if dtype == "auto" and device is not None:
        return fastest_dtype(device)
    if isinstance(dtype, str):
        if dtype not in names:
            choices = sorted(names) + (["auto"] if device is not None else [])
            raise ConfigError(f"dtype: expected one of {choices}, got {dtype!r}")
        dtype = names[dtype]
    if dtype not in (torch.float32, torch.bfloat16):
        raise ConfigError(f"dtype: expected torch.float32 or torch.bfloat16, got {dtype}")
    return dtype


def float16_products(
    dtype: torch.dtype | str, pointwise_fp16: str | None, on_cpu: bool
) -> tuple[torch.dtype | str, str]:
    """`optimize`'s dtype and `pointwise_fp16` mode for what was asked: 'fp16' is float32 with
    the 1×1s' products in float16 where faster (`pointwise_fp16` 'auto' unless given); where the
    CPU has no float16 kernel it is float32 with a warning, and a GPU refuses it by name."""
    if not (isinstance(dtype, str) and dtype == "fp16"):
        return dtype, pointwise_fp16 or "off"
    if not on_cpu:
        raise ConfigError("dtype: 'fp16' (float16 products in the 1×1s) is a CPU kernel's")
    reason = pointwise_fp16_unavailable()
    if reason is not None:
        warnings.warn(
            f"fp16 requested but this CPU has no float16 1×1 kernel ({reason}); using float32",
            RuntimeWarning,
            stacklevel=3,
        )
    return "fp32", pointwise_fp16 or "auto"


def default_example(model: nn.Module, batch: int = 1) -> torch.Tensor:
    """A random input of the model's natural size (from `model.spec` when it has one)."""
    spec = getattr(model, "spec", None)
    chans = input_channels(model)
    size = 32 if getattr(spec, "stem", "imagenet") == "cifar" else 224
    return torch.randn(batch, chans, size, size)


def model_device(model: nn.Module, device: torch.device | str | None = None) -> torch.device:
    """`device` if given, else where the model's first parameter or buffer lives (CPU if none)."""
    if device is not None:
        return torch.device(device)
    for tensor in (*model.parameters(), *model.buffers()):
        return tensor.device
    return torch.device("cpu")


def open_timing_cache(spec: TimingCache | str | Path | bool | None) -> TimingCache | None:
    """`optimize`'s `timing_cache` argument as a cache (None for None or False)."""
    if spec is None or spec is False:
        return None
    if spec is True:
        return TimingCache()
    if isinstance(spec, TimingCache):
        return spec
    if isinstance(spec, (str, Path)):
        return TimingCache(spec)
    raise ConfigError(
        "timing_cache: expected None, a bool, a folder path or a TimingCache, got "
        f"{type(spec).__name__}"
    )


# interleaved rounds that time a replay's two builds against each other (`replay_exit_ms`)
REPLAY_ROUNDS = 7


def exit_weights(backend: str, replay_exit_ms: float | None) -> tuple[float, ...]:
    """What leaving a replay's C loop for a torch operator costs, as `optimize`'s choosers are to
    weigh it: for a replay `replay_exit_ms`, or where that is None both `replay.TORCH_STEP_MS`
    and 0 (the two builds, where they differ, timed against each other); 0 for the backends that
    have no such loop."""
    if replay_exit_ms is not None and (
        isinstance(replay_exit_ms, bool)
        or not isinstance(replay_exit_ms, (int, float))
        or not 0 <= replay_exit_ms < float("inf")
    ):
        raise ConfigError(
            f"replay_exit_ms: expected None or a finite number of ms >= 0, got {replay_exit_ms!r}"
        )
    if backend != "replay":
        return (0.0,)
    return (TORCH_STEP_MS, 0.0) if replay_exit_ms is None else (float(replay_exit_ms),)


def carry_choices(
    module: nn.Module,
    choices: Choices,
    exit_ms: float,
    timings: TimingCache | None,
    merges: dict[str, int],
) -> nn.Module:
    """`module` carrying what its build chose, as `optimize` documents: each kind's choices, the
    exit weight they were made with (`replay_exit_ms`), the timing cache, the group merges."""
    for attr, value in choices.carried().items():
        setattr(module, attr, value)
    module.replay_exit_ms = exit_ms
    module.timing_cache = timings
    module.group_merges = merges
    return module


def _replayed(eager: nn.Module, shapes: Sequence[tuple[int, ...]], new_shapes: str) -> Replayed:
    replayed = Replayed(eager, new_shapes=new_shapes)
    for shape in shapes:
        replayed.build(torch.randn(shape))
    return replayed


def _other_replay(
    eager: nn.Module, shapes: Sequence[tuple[int, ...]], new_shapes: str
) -> Replayed | None:
    """The second build's replay, or None (with a warning) where it cannot be recorded: the
    first, already recorded, is then kept."""
    try:
        return _replayed(eager, shapes, new_shapes)
    except Exception as exc:  # an optional candidate: its failure must not cost the first
        warnings.warn(
            f"optimize: recording failed for the replay built without the exit weight "
            f"({type(exc).__name__}: {exc}); keeping the one built with it",
            RuntimeWarning,
            stacklevel=3,
        )
        return None


def replays_faster(challenger: nn.Module, incumbent: nn.Module, shape: Sequence[int]) -> bool:
    """Whether `challenger` computes a random input of `shape` faster than `incumbent`: the median
    over `REPLAY_ROUNDS` interleaved rounds of their time ratio is below 1."""
    x = torch.randn(tuple(shape))

    def call(module: nn.Module) -> tuple[Callable[[], object], int]:
        def run() -> object:
            with torch.no_grad():
                return module(x)

        return run, x.shape[0]

    timings = interleaved(
        {"challenger": call(challenger), "incumbent": call(incumbent)},
        rounds=REPLAY_ROUNDS,
        iters=1,
    )
    return median_ratio(timings["challenger"].seconds, timings["incumbent"].seconds) < 1


def optimize(
    model: nn.Module,
    dtype: torch.dtype | str = torch.float32,
    *,
    channels_last: bool = True,
    fold_bn: bool = True,
    backend: str = "inductor",
    example_input: torch.Tensor | None = None,
    warmup_shapes: Sequence[tuple[int, ...]] = (),
    grouped_kernel: str = "auto",
    cpp_wrapper: bool = True,
    fuse_pointwise: str = "auto",
    fuse_block: str = "auto",
    conv_x3: str = "auto",
    fuse_stem: str = "auto",
    pointwise_fma: str = "auto",
    pointwise_mkl: str = "auto",
    pointwise_fp16: str | None = None,
    pointwise_bf16: str = "auto",
    split_groups: str = "auto",
    merge_groups: str = "auto",
    device: torch.device | str | None = None,
    timing_cache: TimingCache | str | Path | bool | None = None,
    new_shapes: str = "compile",
    replay_exit_ms: float | None = None,
) -> nn.Module:
    """A module computing the same function as `model` (in eval mode), faster.

    The model is copied (the original is left untouched), put in eval mode, its BNs are folded
    into the preceding convolutions, it is moved to channels_last and `dtype` ('fp16' is float32
    with the 1×1s' products in float16, `pointwise_fp16` below; bf16 only where
    the CPU has native bf16, else fp32 with a warning; a warning too where native bf16 measures
    slower than fp32, `capability.bf16_faster`; 'auto' takes bf16 only where it is faster, else
    'fp16' where the CPU has its kernel, else fp32, `capability.fastest_precision`) and compiled with `backend`: 'inductor'
    (torch.compile with freezing), 'jit' (torch.jit.trace + freeze), 'replay' (the eager fast
    path's kernel calls recorded once and replayed from C, `resnext.speed.replay`: no Python
    per layer, for the lowest batch-1 latency; CPU, x86-64 Linux) or 'none'. The compiled
    graph (or recording) is built once on `example_input` (default: batch 1 at the model's
    natural size) and on each shape of `warmup_shapes`; if that fails, the eager fast path is
    returned with a warning. Inputs may be any float dtype and layout; outputs are float32.
    With inductor, jit or replay an input of another shape (a last short batch) or dtype or
    layout is built for when it comes (`new_shapes` 'compile': ~10 s of compiling for ResNeXt-50 on a
    2-core CPU, two forwards' time to record) or runs on the eager fast path ('eager'; the
    same function, no wait).

    `grouped_kernel` ('auto', 'on', 'off') puts our grouped 3×3 kernel (AVX-512, or AVX2) in place of
    oneDNN's for the grouped convolutions (channels_last only): 'auto' times both on each layer at
    the largest of the example and warm-up shapes and keeps the faster. Which layers got it is in
    the returned module's `grouped_choices` (a list of `LayerChoice`).

    `fuse_pointwise` ('auto', 'on', 'off'; bf16 with the AMX grouped kernel, or on CPUs with
    AVX512-BF16) computes each bottleneck's first 1×1 convolution and ReLU inside the grouped
    kernel that consumes them: on AMX per image into the grouped kernel's own buffers, so that the
    1×1's output never goes to memory; on AVX512-BF16 (after `pointwise_bf16` put the 1×1 on our
    product, `resnext.speed.dot_grouped`) row by row just ahead of the grouped rows that read it,
    so that they find it in cache. 'auto' times each block both ways and fuses where that is
    faster. The blocks' timings are in `fusion_choices`.

    `fuse_block` ('auto', 'on', 'off'; likewise) then computes the rest of each bottleneck (its
    grouped 3×3, last 1×1, residual add and ReLU) in one AMX kernel, so that the grouped output
    never goes to memory either; 'auto' times each block both ways. Where the graph shows the
    residual dead after the block (and the backend is not 'jit'), the block writes over it, as
    oneDNN's 1×1 adds into its residual. A whole bottleneck whose shortcut is a 1×1 projection
    of its input then also takes the projection into the same kernel, its products added onto
    the last 1×1's, where that is faster. On CPUs with AVX512-BF16 and no AMX, a stride-1 block
    with an identity shortcut whose first 1×1 `fuse_pointwise` put in the grouped kernel's call
    takes its last 1×1 into that call too (`resnext.speed.dot_block`), written over the block's
    input where it is dead after the block: the grouped rows go to the last 1×1 from a
    per-thread buffer, not through memory. Timings: `block_choices`.

    `conv_x3` ('auto', 'on', 'off'; float32 on CPUs with AMX) computes the dense convolutions
    (the 1×1s, the stem, dense 3×3s), with the ReLU or residual add and ReLU after them, on the
    AMX tile unit as three bf16 products per float32 product (`resnext.speed.conv_x3`): float32
    to ~1e-5 of each product instead of float32 FMA rounding, at up to 2.9× oneDNN's float32 speed
    on the Intel Xeon it was measured on. 'auto' times each layer both ways; 'off' keeps float32
    FMA arithmetic throughout. A block's last 1×1 and its 1×1 projection shortcut, both on this
    kernel, then become one product where that is faster. Timings: `conv_x3_choices`.

    `fuse_stem` ('auto', 'on', 'off'; bf16, and float32 unless `conv_x3` is 'off', on CPUs with
    AMX; bf16 on CPUs with AVX512-BF16) computes an ImageNet stem's convolution, ReLU and 3×3/2
    max pooling in one kernel (`resnext.speed.stem` on AMX, else `resnext.speed.stem_dot`) that
    writes only the pooled output; 'auto' fuses where that is faster than the convolution and
    pooling apart. Timings: `stem_choices`.

    `pointwise_mkl` ('auto', 'on', 'off'; float32) computes the 1×1 convolutions that `conv_x3`
    left to oneDNN, with the ReLU or residual add and ReLU after them, as MKL's product on a
    weight packed once for the layer's output pixel count (a strided one on its pixels gathered
    first), then one pass for the bias, residual and ReLU (`resnext.speed.pointwise_mkl`);
    'auto' times each layer both ways with the caches cold, as in the network, and keeps the
    faster. On the Xeon without AMX it took every 1×1 of a replayed ResNeXt-50 at batch 1 (0.88×
    the time) and about two thirds of them at batch 16 (0.93×; RESULTS.md, stop 55); on the
    AVX-512 AMD EPYC none of ResNeXt-50's (4 of ResNet-50's at batch 16). Timings:
    `pointwise_choices`.

    `pointwise_fma` ('auto', 'on', 'off'; float32 on CPUs with AVX2 and FMA) computes the 1×1s
    still left to oneDNN, with their epilogues, in our register-tiled FMA kernel
    (`resnext.speed.pointwise_fma`: 7 pixels × 64 outputs a tile on AVX-512, 6 × 16 on AVX2);
    'auto' times each layer both ways, cold, and keeps the faster. On an AVX-512 AMD EPYC it took
    33–36 of a replayed ResNeXt-50's 36 1×1s at batch 1, ~1 % off its latency, and 6–11 at
    batch 16, level (RESULTS.md, stop 68); its AVX2 build was written on an AVX2-only AMD Zen 3,
    where oneDNN's float32 1×1s ran at 70–85 % of the FMA peak. Its choices follow
    `pointwise_mkl`'s in `pointwise_choices`.

    `pointwise_fp16` ('auto' with dtype 'fp16', else 'off' unless given; 'on'; float32 on CPUs
    with AVX512-FP16) trades float32's exactness for speed: it computes the 1×1s left to oneDNN,
    before `pointwise_mkl` and `pointwise_fma` weigh theirs, with float16 products (the weight
    and each block of input pixels scaled by powers of two into float16's range, runs of 64
    products summed in float16, the runs in float32; `resnext.speed.pointwise_fp16`), their
    epilogues in float32. Each output is then within ~3.3 % of the sum of its products'
    magnitudes (typically ~0.1 % of the output's range), bf16's order, instead of float32's
    ~1e-6. 'auto' times each layer both ways, cold, and keeps the faster. On the Xeon without
    AMX, where bf16 runs at float32's rate, it took ResNeXt-50's 1×1s to 0.67× oneDNN's time
    (RESULTS.md, stop 56). Its choices come first in `pointwise_choices`.

    `pointwise_bf16` ('auto', 'on', 'off'; bf16 on CPUs with AVX512-BF16) likewise computes the
    1×1s left to oneDNN (those the AMX block fusions did not take; a strided one on its gathered
    pixels), with their epilogues, as one product of AVX512-BF16 pair dot products
    (`pointwise_gemm.conv1x1`), which splits the pixels evenly between the threads; 'auto' times
    each layer both ways, cold, and keeps the faster. Its choices follow `pointwise_fma`'s in
    `pointwise_choices`. Both 1×1 passes weigh their kernel against oneDNN as the returned
    module runs it: on a prepacked weight with its epilogue fused, in the compiled graph and in
    the eager paths alike (there `dense_swap.prepack_convs` packs the layers oneDNN keeps), plus
    `replay.TORCH_STEP_MS` for a replay.

    `split_groups` ('auto', 'on', 'off'; bf16 on CPUs with AVX512-BF16) computes a grouped 3×3
    of 4 or 8 channels per group that sits between two 1×1s (a ResNeXt bottleneck) on its
    channels in another order (`resnext.speed.grouped_split`), in which no register lane crosses
    a group: the 1×1 before writes that order and the 1×1 after reads it, their weights permuted
    once (`resnext.speed.group_order`), so the block computes the same function. It runs before
    the `grouped_kernel` pass; 'auto' times it against oneDNN and our other variants on each
    such layer and keeps it where it is the fastest. Those layers are in `grouped_choices` with
    the variant 'split'.

    `merge_groups` ('auto', 'off'; on a GPU) computes each grouped convolution as one of fewer,
    wider groups with block-diagonal weights (`resnext.speed.merged_groups`): the same function
    for more products, which cuDNN runs faster than ResNeXt's narrow groups on some layers.
    'auto' times 1, 2, 4, … 32 groups merged into one on each grouped layer at the largest of
    the example and warm-up shapes and keeps the fastest; on an H200 that made ResNeXt-50's
    compiled bf16 inference ~5 % faster. The factors are in `group_merges` (name: factor).

    `cpp_wrapper` (inductor only) has inductor call its kernels from generated C++ instead of
    Python: less overhead per call, for ~5 s more compiling. Measured side by side on the Intel
    machine it cut ResNeXt-50's batch-1 latency by 3–9 % and raised batch-16 throughput by 1–2 %
    (benchmarks/RESULTS.md, stop 19); False gives the Python wrapper.

    `timing_cache` keeps the per-layer times behind those 'auto' choices on disk
    (`resnext.speed.timing_cache`): True for the default folder (~/.cache/resnext/timings), a
    folder, or a `TimingCache`. Layers timed before on this machine (same CPU, threads, torch
    and kernel sources) are not timed again, which makes a later `optimize` of the same model
    quicker (the compile remains) and its choices the same. None (the default) keeps the times
    for this call only and writes nothing; either way layers alike (a stage's later blocks) are
    timed once and get the same pick. The returned module's `timing_cache` is the cache used
    (its `hits` count the comparisons read rather than timed; None on a GPU).

    `replay_exit_ms` is what a replay's choosers add to each layer oneDNN keeps, for leaving the
    C loop to run it as a torch operator: on the Xeon with AMX weighing `replay.TORCH_STEP_MS`
    (0.2 ms) made bf16 batch 1 2.4 % faster, on the AMD EPYC without AMX it cost float32 batch 1
    3 %, by giving the 1×1s to a slower kernel (benchmarks/RESULTS.md, stops 49 and 66). None
    (the default) runs the choosers both ways and, where their picks differ, records both
    replays and keeps the one faster on the largest shape it is built for (`REPLAY_ROUNDS`
    interleaved rounds); a number weighs that. The weight used is the returned module's `replay_exit_ms`
    (0 for the other backends).

    `device` (default: where the model is) places the result; on a GPU the generic steps apply
    (BN folding, channels_last, `dtype`, the compiled graph, with inductor's Python wrapper) and
    `merge_groups`: the other kernel options are CPU kernels, so their 'auto' does nothing there
    and 'on' is refused. The returned module moves its input to the device.

    `model` is an image network: an nn.Module with Conv2d layers (this package's, or e.g.
    torchvision's), taking images of its spec's `in_chans` channels, else of its first Conv2d's
    input channels; `example_input` a float (N, C, H, W) batch of those channels, `warmup_shapes`
    (N, C, H, W) tuples; `device` 'cpu', or 'cuda' / 'cuda:N' where torch sees that device. Each
    is checked before the model is copied: anything else is a ConfigError naming the argument.
    """
    channels = input_channels(model)  # refuses what is not an image network
    if backend not in BACKENDS:
        raise ConfigError(f"backend: expected one of {BACKENDS}, got {backend!r}")
    if example_input is not None:
        check_batch(example_input, channels, "example_input", ConfigError)
    warmup_shapes = check_shapes(warmup_shapes, channels)
    if any(p.is_quantized for p in model.state_dict().values() if isinstance(p, torch.Tensor)):
        raise ConfigError(
            "model: an int8 (quantized) network runs on torch's int8 kernels as it is; "
            "the float fast path does not take it (leave optimize off)"
        )
    check_new_shapes(new_shapes)  # before the layer timing, not after it
    exits = exit_weights(backend, replay_exit_ms)
    kernels = {
        "grouped_kernel": grouped_kernel,
        "fuse_pointwise": fuse_pointwise,
        "fuse_block": fuse_block,
        "conv_x3": conv_x3,
        "fuse_stem": fuse_stem,
        "pointwise_fma": pointwise_fma,
        "pointwise_mkl": pointwise_mkl,
        "pointwise_fp16": pointwise_fp16 or "off",
        "pointwise_bf16": pointwise_bf16,
        "split_groups": split_groups,
    }
    for name, mode in kernels.items():
        check_mode(name, mode)
    if merge_groups not in MERGE_MODES:
        raise ConfigError(f"merge_groups: expected one of {MERGE_MODES}, got {merge_groups!r}")
    # whether the GPU is there is asked after the refusals of what cannot run on one at all
    target = check_device(model_device(model) if device is None else device, present=False)
    on_cpu = target.type == "cpu"
    if isinstance(dtype, str) and dtype == "auto":
        dtype = fastest_precision(check_device(target))
    dtype, pointwise_fp16 = float16_products(dtype, pointwise_fp16, on_cpu)
    dtype = resolve_dtype(dtype, target)
    if backend == "replay" and not on_cpu:
        raise ConfigError(f"backend: 'replay' records CPU kernels; {target} takes another")
    # refused here if malformed; used on a CPU only
    timings = open_timing_cache(timing_cache) or TimingCache.in_memory()
    for name, mode in kernels.items():
        if mode == "on" and not on_cpu:
            raise ConfigError(f"{name}: 'on' is a CPU kernel; {target} takes 'auto' or 'off'")
    check_device(target)  # before torch asks the GPU anything, and before the model is copied
    if dtype == torch.bfloat16 and not bf16_runs_on(target):
        warnings.warn(
            f"bf16 requested but {target.type} has no native bf16 arithmetic; using float32",
            RuntimeWarning,
            stacklevel=2,
        )
        dtype = torch.float32
    elif dtype == torch.bfloat16 and on_cpu and not bf16_faster():
        # asked for, so kept; but a user choosing bf16 for speed should know
        warnings.warn(
            f"bf16 requested, but this CPU runs bf16 convolutions at {bf16_speedup():.2f}× "
            "float32's speed (measured): dtype='fp32' is faster here, and exact",
            RuntimeWarning,
            stacklevel=2,
        )
    work = fold_batchnorm(model) if fold_bn else copy.deepcopy(model).eval()
    work.requires_grad_(False)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    work = work.to(device=target, dtype=dtype, memory_format=memory_format)
    example = default_example(model) if example_input is None else example_input
    shapes = [tuple(example.shape), *(tuple(s) for s in warmup_shapes)]
    largest = max(shapes, key=lambda shape: torch.Size(shape).numel())  # what layers are timed on
    made = Choices()
    alternative = None  # a replay's other build, by the other exit weight, where it differs
    if channels_last and on_cpu:
        probe = torch.randn(largest, dtype=dtype).contiguous(memory_format=memory_format)
        modes = {**kernels, "pointwise_fp16": pointwise_fp16}  # as `dtype` 'fp16' set it
        pristine = copy.deepcopy(work) if len(exits) > 1 else None
        made = run_passes(work, probe, modes, timings, backend=backend, exit_ms=exits[0])
        if pristine is not None:
            unweighed = run_passes(
                pristine, probe, modes, timings, backend=backend, exit_ms=exits[1]
            )
            if unweighed.decisions() != made.decisions():
                alternative = (pristine, unweighed, exits[1])
        timings.save()
    elif grouped_kernel == "on" or split_groups == "on":
        switch = "grouped_kernel" if grouped_kernel == "on" else "split_groups"
        raise ConfigError(f"{switch}: 'on' needs channels_last=True")
    merges: dict[str, int] = {}
    if merge_groups == "auto" and not on_cpu:  # CPUs have their own grouped kernels
        probe = torch.randn(largest, device=target, dtype=dtype)
        merges = widen_where_faster(work, probe.contiguous(memory_format=memory_format))

    def wrap(body: nn.Module, choices: Choices, exit_ms: float) -> nn.Module:
        eager = CastInput(body, dtype, channels_last, target, in_channels=example.shape[1])
        return carry_choices(eager.eval(), choices, exit_ms, timings if on_cpu else None, merges)

    eager = wrap(work, made, exits[0] if on_cpu and channels_last else 0.0)
    if backend == "none":
        return eager
    try:
        fast: nn.Module
        if backend == "replay":
            fast = _replayed(eager, shapes, new_shapes)
            if alternative is not None:  # the other exit weight chose otherwise: the faster
                other = _other_replay(wrap(*alternative), shapes, new_shapes)
                if other is not None and replays_faster(other, fast, largest):
                    eager, fast = other.module, other
        elif backend == "jit":
            traced = TracedModule(eager, example, new_shapes=new_shapes)
            for shape in shapes:
                traced.build(torch.randn(shape, device=target))
            fast = traced
        else:
            inductor = FrozenInductor(
                eager, cpp_wrapper=cpp_wrapper and on_cpu, new_shapes=new_shapes
            )
            for shape in shapes:
                inductor.build(torch.randn(shape, device=target))
            fast = inductor
    except Exception as exc:  # any build failure falls back to the (still faster) eager path
        warnings.warn(
            f"optimize: {backend} {'recording' if backend == 'replay' else 'compilation'} failed "
            f"({type(exc).__name__}: {exc}); "
            "using the eager fast path",
            RuntimeWarning,
            stacklevel=2,
        )
        return eager
    return carry_choices(
        fast.eval(), Choices.of(eager), eager.replay_exit_ms, eager.timing_cache, eager.group_merges
    )
