"""GPU benchmark (issue 5, target 5): our networks against timm's and torchvision's on one device.

Each model's inference and training step are timed ours and the peers' way, bf16 and
channels_last, in interleaved rounds of one process. Before any timing each peer gets our
weights and must compute the same function as ours (float32, TF32 off), so that the ratios
compare implementations of one network, not two networks.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

import resnext
from resnext.config import OptimConfig
from resnext.errors import ConfigError
from resnext.speed.fastpath import optimize
from resnext.speed.measure import Timing, interleaved, validate_bench_config
from resnext.speed.merged_groups import merge_where_faster
from resnext.speed.peers import available
from resnext.train.optim import build_optimizer

PEERS = ("timm", "torchvision")
# "<task>-<library>-<how>": ours-optimize is `resnext.optimize` (BN folded, grouped convolutions
# merged where faster, compiled); eager is channels_last under bf16 autocast; compile is
# torch.compile of the same; ours-fast is our GPU training fast path (`train.merge_groups` and
# `train.compile`). Training steps use our optimiser (fused SGD) for ours and torch's default
# SGD for the peers, as their scripts do.
VARIANTS = (
    "infer-ours-optimize",
    "infer-ours-eager",
    "infer-timm-eager",
    "infer-timm-compile",
    "infer-torchvision-eager",
    "train-ours-eager",
    "train-ours-compile",
    "train-ours-fast",
    "train-timm-eager",
    "train-timm-compile",
    "train-torchvision-eager",
)
DEFAULT_VARIANTS = (
    "infer-ours-optimize",
    "infer-ours-eager",
    "infer-timm-eager",
    "train-ours-eager",
    "train-timm-eager",
)
# Output agreement asked of a peer given our weights: float32 with TF32 off, relative to the
# largest output (the 1e-4 asked of our own fast path against eager in issue 5).
PARITY_TOLERANCE = 1e-4


@dataclass(frozen=True)
class GpuBenchConfig:
    """What one GPU benchmark run measures."""

    models: tuple[str, ...] = ("resnext50_32x4d", "resnet50")
    variants: tuple[str, ...] = DEFAULT_VARIANTS
    batch: int = 256
    image_size: int = 224
    rounds: int = 5
    iters: int = 10
    device: str = "cuda"

    def validate(self) -> None:
        validate_bench_config(self, VARIANTS)
        try:
            kind = torch.device(self.device).type
        except RuntimeError:
            kind = None
        if kind not in ("cuda", "cpu"):
            raise ConfigError(f"device: expected 'cuda', 'cuda:N' or 'cpu', got {self.device!r}")
        if kind == "cuda" and not torch.cuda.is_available():
            raise ConfigError("device: 'cuda' asked for, but torch sees no CUDA device here")


def peer_missing(library: str) -> str | None:
    """Why `library`'s models cannot be built here, or None."""
    if not available(library):
        return f"{library} is not installed"
    try:
        importlib.import_module(library)
    except Exception as exc:  # e.g. a torchvision built for another torch
        return f"{library} does not import ({type(exc).__name__}: {exc})"
    return None


def peer_model(library: str, name: str) -> nn.Module:
    """The peer library's own model `name`, randomly initialised."""
    if library == "timm":
        import timm

        return timm.create_model(name, pretrained=False)
    if library == "torchvision":
        import torchvision

        return torchvision.models.get_model(name, weights=None)
    raise ConfigError(f"peer: expected one of {PEERS}, got {library!r}")


@contextlib.contextmanager
def exact_float32() -> Iterator[None]:
    """TF32 off for cuDNN and matmuls inside the block (float32 products rounded as float32)."""
    saved = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def parity(ours: nn.Module, peer: nn.Module, x: torch.Tensor) -> float:
    """Load our weights into `peer` (strict) and return the largest output difference in eval
    mode, float32, relative to the largest of our outputs."""
    peer.load_state_dict(ours.state_dict(), strict=True)
    ours.eval()
    peer.eval()
    with torch.no_grad(), exact_float32():
        return relative_error(peer(x), ours(x))


def vary_batch_norms(model: nn.Module, seed: int = 0) -> None:
    """Seeded, non-trivial batch-norm statistics and affines (a fresh model's are identities,
    which would let a wrong fold or a missing BN pass unnoticed)."""
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            for tensor, low, high in (
                (m.running_mean, -0.1, 0.1),
                (m.running_var, 0.5, 2.0),
                (m.weight.data, 0.5, 1.5),
                (m.bias.data, -0.1, 0.1),
            ):
                values = torch.empty(tensor.shape).uniform_(low, high, generator=gen)
                tensor.copy_(values)


def relative_error(out: torch.Tensor, reference: torch.Tensor) -> float:
    """Largest difference from `reference`, relative to its largest magnitude, in float32."""
    diff = (out.float() - reference.float()).abs().max()
    return float(diff / reference.float().abs().max().clamp_min(1e-30))


def synchronised(fn: Callable[[], object], device: torch.device) -> Callable[[], object]:
    """`fn`, then wait for the device: a timed call ends when its kernels have run."""
    if device.type != "cuda":
        return fn

    def call() -> object:
        out = fn()
        torch.cuda.synchronize(device)
        return out

    return call


def inference_call(how: str, model: nn.Module, x: torch.Tensor, ours: bool) -> Callable[[], object]:
    """One batch of inference the `how` way ('optimize', 'eager' or 'compile'), bf16."""
    device = x.device
    if how == "optimize":
        if not ours:
            raise ConfigError("variants: 'optimize' is ours only")
        fast = optimize(model, torch.bfloat16, example_input=x, device=device)

        def call() -> object:
            return fast(x)

        call.group_merges = fast.group_merges  # type: ignore[attr-defined]
        return call
    net = model.eval().to(device, memory_format=torch.channels_last)
    if how == "compile":
        net = torch.compile(net)
    cl = x.contiguous(memory_format=torch.channels_last)

    def call() -> object:
        with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16):
            return net(cl)

    return call


def training_step(
    how: str, model: nn.Module, x: torch.Tensor, y: torch.Tensor, ours: bool
) -> Callable[[], object]:
    """One SGD step (forward, cross-entropy, backward, update), channels_last, bf16 autocast."""
    device = x.device
    model = model.train().to(device, memory_format=torch.channels_last)
    if ours:
        opt = build_optimizer(model, OptimConfig(weight_decay=1e-4), lr=0.01)
    else:
        opt = torch.optim.SGD(
            model.parameters(), lr=0.01, momentum=0.9, nesterov=True, weight_decay=1e-4
        )
    cl = x.contiguous(memory_format=torch.channels_last)
    merges: dict[str, int] = {}
    if how == "fast":
        if not ours:
            raise ConfigError("variants: 'fast' is ours only")
        merges = merge_where_faster(model, cl, dtype=torch.bfloat16)
    net = torch.compile(model) if how in ("compile", "fast") else model
    loss_fn = nn.CrossEntropyLoss()

    def step() -> object:
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = loss_fn(net(cl), y)
        loss.backward()
        opt.step()
        return loss

    step.group_merges = merges  # type: ignore[attr-defined]
    return step


def _peak_memory_mb(fn: Callable[[], object], device: torch.device) -> float | None:
    """Peak device memory allocated over two calls of `fn` (None off CUDA)."""
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(2):
        fn()
    if not cuda:
        return None
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) / 2**20


def _check_parity(
    name: str,
    library: str,
    template: nn.Module,
    probe: torch.Tensor,
    record: dict[str, dict],
    log: Callable[[str], None],
) -> str | None:
    """Why `library` has no model `name` (None if it has), after checking that its model with
    our weights computes our function; a RuntimeError if it computes another."""
    try:
        peer = peer_model(library, name).to(probe.device)
    except Exception as exc:  # each library says "no such model" its own way
        return f"{library} has no model {name!r} ({type(exc).__name__}: {exc})"
    diff = parity(template, peer, probe)
    record["parity"][f"{name}/{library}"] = diff
    log(f"{name}: {library}'s model with our weights, largest relative difference {diff:.2e}")
    require_parity(f"{name}: {library}'s model", diff)
    return None


def require_parity(label: str, diff: float) -> None:
    """A RuntimeError naming `label` if its relative difference from ours is over the tolerance."""
    if not diff <= PARITY_TOLERANCE:  # NaN fails too
        raise RuntimeError(
            f"{label} computes another function than ours "
            f"(relative difference {diff:.2e} > {PARITY_TOLERANCE})"
        )


def build_calls(
    config: GpuBenchConfig, log: Callable[[str], None]
) -> tuple[dict[str, tuple[Callable[[], object], int]], dict[str, object]]:
    """Every runnable (model, variant) call, after the peers' parity checks; and the record of
    the checks, memory peaks and skipped variants."""
    device = torch.device(config.device)
    size = config.image_size
    x = torch.randn(config.batch, 3, size, size, device=device)
    calls: dict[str, tuple[Callable[[], object], int]] = {}
    record: dict[str, dict] = {"parity": {}, "max_rel_err": {}, "peak_memory_mb": {}}
    record["skipped"], record["group_merges"] = {}, {}
    peers = sorted({v.split("-")[1] for v in config.variants} - {"ours"})
    installed = {library: peer_missing(library) for library in peers}
    probe = torch.randn(4, 3, size, size, device=device)
    for name in config.models:
        template = resnext.create_model(name).to(device)
        vary_batch_norms(template)
        with torch.no_grad(), exact_float32():
            reference = template.eval()(x)
        missing = {
            library: installed[library]
            or _check_parity(name, library, template, probe, record, log)
            for library in peers
        }
        y = torch.randint(0, template.num_classes, (config.batch,), device=device)
        for variant in config.variants:
            task, library, how = variant.split("-")
            key = f"{name}/{variant}"
            if library != "ours" and missing[library] is not None:
                record["skipped"][key] = missing[library]
                continue
            model = resnext.create_model(name) if library == "ours" else peer_model(library, name)
            model.load_state_dict(template.state_dict())
            model = model.to(device)
            ours = library == "ours"
            if task == "infer":
                fn = inference_call(how, model, x, ours)
                record["max_rel_err"][key] = relative_error(fn(), reference)
            else:
                fn = training_step(how, model, x, y, ours)
            merges = getattr(fn, "group_merges", None)
            if merges:
                record["group_merges"][key] = merges
            fn = synchronised(fn, device)
            record["peak_memory_mb"][key] = _peak_memory_mb(fn, device)
            log(f"{key}: ready")
            calls[key] = (fn, config.batch)
    return calls, record


def ratios(timings: dict[str, Timing], models: tuple[str, ...]) -> dict[str, dict[str, float]]:
    """Throughput of ours ÷ each peer's (same task and way; and our best ÷ their best), and the
    first model's time per image ÷ the second's for each variant (e.g. ResNeXt-50 ÷ ResNet-50)."""
    out: dict[str, dict[str, float]] = {"ours_over_peer": {}, "model_time_ratio": {}}
    speed = {key: t.throughput for key, t in timings.items()}
    for key, value in speed.items():
        name, variant = key.split("/")
        task, library, how = variant.split("-")
        if library == "ours":
            continue
        best_ours = max(
            (v for k, v in speed.items() if k.startswith(f"{name}/{task}-ours-")), default=None
        )
        same = speed.get(f"{name}/{task}-ours-{how}")
        if same is not None:
            out["ours_over_peer"][f"{key} (same way)"] = same / value
        if best_ours is not None:
            out["ours_over_peer"][f"{key} (our best)"] = best_ours / value
    if len(models) >= 2:
        first, second = models[0], models[1]
        for key, value in speed.items():
            name, variant = key.split("/")
            other = speed.get(f"{second}/{variant}")
            if name == first and other is not None:
                out["model_time_ratio"][variant] = other / value
    return out


def run_gpu_bench(config: GpuBenchConfig, log: Callable[[str], None] = print) -> dict[str, object]:
    """Check the peers, build every call, time them interleaved; img/s, ratios, memory peaks."""
    config.validate()
    saved = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True  # as timm's and torchvision's training scripts set it
    try:
        calls, record = build_calls(config, log)
        timings = interleaved(calls, rounds=config.rounds, iters=config.iters, warmup=1)
    finally:
        torch.backends.cudnn.benchmark = saved
    device = torch.device(config.device)
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "throughput": {k: t.as_dict() for k, t in timings.items()},
        **ratios(timings, config.models),
        **record,
    }


def summary_lines(result: dict[str, object]) -> list[str]:
    """Human-readable lines: img/s per call, the ratios, what was skipped."""
    lines = [f"device: {result['device']}"]
    for key, row in result["throughput"].items():
        peak = result["peak_memory_mb"].get(key)
        memory = f"  peak {peak:,.0f} MB" if peak is not None else ""
        err = result["max_rel_err"].get(key)
        error = f"  error {err:.1e}" if err is not None else ""
        lines.append(f"{key:48s} {row['throughput']:8.1f} img/s{memory}{error}")
    for key, value in result["ours_over_peer"].items():
        lines.append(f"ours ÷ {key}: {value:.3f}")
    for key, value in result["model_time_ratio"].items():
        lines.append(f"time per image, first model ÷ second, {key}: {value:.3f}")
    for key, merges in result.get("group_merges", {}).items():
        counts = {f: list(merges.values()).count(f) for f in sorted(set(merges.values()))}
        lines.append(f"{key}: grouped layers by groups merged into one {counts}")
    lines += [f"skipped {key}: {why}" for key, why in result["skipped"].items()]
    return lines
