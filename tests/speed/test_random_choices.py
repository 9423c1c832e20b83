"""optimize() with every chooser's timings drawn at random: whatever mix of our kernels and
oneDNN the choosers settle on, the fast path computes the plain model's function, and the eager
paths leave no convolution to run unpacked. Likewise the training fast path with each op's
implementation picked at random takes the step the references take.

The other same-function tests ask for each kernel everywhere it applies ('on'); on a real machine
'auto' picks per layer by timing, so mixes (a block's last 1×1 ours and its shortcut oneDNN's,
say) are met only when the timings fall that way: a noisy machine once found a shortcut 1×1 left
unpacked so. Here the timings are drawn from a seeded generator instead of measured.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib
import random
import re
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pytest
import torch
from registry_models import OPTION_VARIANTS, randomize_bn
from tensor_checks import rel_err
from torch import nn

import resnext
from resnext.speed import autotune, grouped_amx, pointwise_fp16, replay, timing_cache
from resnext.speed.capability import bf16_supported
from resnext.speed.fastpath import optimize
from resnext.speed.train_paths import use_training_fast_paths

SPEED = Path(resnext.__file__).parent / "speed"
IMPORTS_CACHED = re.compile(r"^from resnext\.speed\.timing_cache import .*\bcached\b", re.M)


def _choosers() -> list[ModuleType]:
    """The fast path's modules that time ways through `timing_cache.cached` (every chooser)."""
    names = sorted(p.stem for p in SPEED.glob("*.py") if IMPORTS_CACHED.search(p.read_text()))
    return [importlib.import_module(f"resnext.speed.{name}") for name in names]


@pytest.fixture
def random_timings(monkeypatch: pytest.MonkeyPatch) -> Callable[[int], list[str]]:
    """`random_timings(seed)`: from then on every chooser gets times drawn from `seed`'s
    generator, none measured; it returns the keys of the comparisons drawn, listed as they come."""

    def install(seed: int) -> list[str]:
        rng = random.Random(seed)
        keys: list[str] = []

        def drawn(cache, key: str, count: int, measure) -> list[float]:
            keys.append(key)
            return [rng.uniform(0.5, 1.5) for _ in range(count)]

        for module in _choosers():
            assert module.cached is timing_cache.cached
            monkeypatch.setattr(module, "cached", drawn)
        return keys

    return install


def test_every_chooser_module_is_found() -> None:
    # the modules whose passes weigh ways (grouped kernels, 1×1s and 3×3s, every fusion, the stem)
    names = {m.__name__.rpartition(".")[2] for m in _choosers()}
    assert {"grouped_swap", "dense_swap", "block_fusion", "stem_fusion"} <= names
    assert len(names) >= 7


# ResNeXt-50's and ResNeXt-29 4×16d's stems and widths (so that every kernel takes its layers),
# two blocks in the first stage (an identity block) and one in each other (a strided projection)
LAYOUTS = {
    "imagenet": (resnext.ModelSpec(depths=(2, 1, 1, 1), cardinality=32, base_width=4), 64),
    "cifar": (resnext.ModelSpec(depths=(2, 1, 1), cardinality=4, base_width=16, stem="cifar"), 32),
}


def _model(layout: str) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    spec, size = LAYOUTS[layout]
    model = resnext.build_model(spec).eval()
    randomize_bn(model)
    return model, torch.randn(2, 3, size, size)


BACKENDS = ["none"] + (["replay"] if replay.unavailable_reason() is None else [])
DTYPES = ["fp32"] + (["bf16"] if bf16_supported() else [])
# float32 with the 1×1s' products in float16 where they run: `optimize(model, "fp16")` in
# inference, `train.fp16_products` in training
FP16 = ["fp16"] if pointwise_fp16.unavailable_reason() is None else []
INFER_DTYPES = DTYPES + FP16
TRAIN_DTYPES = DTYPES + FP16
# where AMX runs, its passes take layers first: once more as on a CPU without it, so that the
# vector kernels' mixes are drawn too
AMX = ["amx", "no-amx"] if grouped_amx.unavailable_reason() is None else ["as-found"]


@pytest.fixture(params=AMX)
def amx(request: pytest.FixtureRequest) -> str:
    """Each of `AMX` in turn: 'no-amx' with every AMX kernel reporting itself unavailable."""
    if request.param == "no-amx":
        request.getfixturevalue("without_amx")
    return request.param


def _has_grouped_layers(model: nn.Module) -> bool:
    return any(isinstance(m, nn.Conv2d) and m.groups > 1 for m in model.modules())


def _assert_same_function(fast: nn.Module, x: torch.Tensor, want: torch.Tensor, dtype: str) -> None:
    """`fast` computes `want` on `x` and on its first image alone (a batch it was not built on):
    float32 to our kernels' bf16×3 products (~1e-5 each); bf16 to 8 significant bits through the
    network (0.4-0.8 % of the output range measured), as the registry tests bound them; float16
    products to their 11 bits (ResNeXt-50's output 4.6e-4 off, RESULTS.md stop 59)."""
    bound = {"fp32": 1e-4, "fp16": 1e-2}.get(dtype, 3e-2)
    with torch.no_grad():
        assert rel_err(fast(x.clone()), want) < bound
        assert rel_err(fast(x[:1].clone()), want[:1]) < bound


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("dtype", INFER_DTYPES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_any_mix_of_choices_computes_the_same_function(
    layout: str,
    backend: str,
    dtype: str,
    amx: str,
    seed: int,
    random_timings: Callable[[int], list[str]],
) -> None:
    model, x = _model(layout)
    with torch.no_grad():
        want = model(x)
    drawn = random_timings(seed)
    fast = optimize(model, dtype, backend=backend, example_input=x)
    assert drawn  # the choosers did weigh ways, with the drawn times
    eager = fast.module if isinstance(fast, replay.Replayed) else fast
    unpacked = [n for n, m in eager.named_modules() if isinstance(m, nn.Conv2d)]
    assert unpacked == [], f"left to oneDNN unpacked: {unpacked}"
    if dtype == "fp16":  # the float16 1×1 weighed, and taken somewhere
        fp16 = [c.chosen for c in eager.pointwise_choices if c.variant.startswith("fp16")]
        assert "kernel" in fp16
    _assert_same_function(fast, x, want, dtype)
    if backend == "replay":  # built (not the eager fallback), both batches recorded
        assert isinstance(fast, replay.Replayed)
        assert len(fast.recordings) == 2 and None not in fast.recordings.values()


@pytest.mark.parametrize("dtype", INFER_DTYPES)
@pytest.mark.parametrize("option", sorted(OPTION_VARIANTS))
def test_any_mix_of_choices_on_every_spec_option(
    option: str,
    dtype: str,
    amx: str,
    random_timings: Callable[[int], list[str]],
) -> None:
    # the zoo's other blocks (SE, pooled shortcuts, forms a and b, pre-activation, ...) at
    # ResNeXt-50's widths, where the kernels take their layers, on a non-square input
    torch.manual_seed(1)
    spec = dataclasses.replace(LAYOUTS["imagenet"][0], **OPTION_VARIANTS[option])
    if spec.block_form != "c":  # one module per path: 4 paths of 32 channels build in ~1 s, not 4-9
        spec = dataclasses.replace(spec, cardinality=4, base_width=32)
    model = resnext.build_model(spec).eval()
    randomize_bn(model)
    x = torch.randn(2, 3, 64, 48)
    with torch.no_grad():
        want = model(x)
    drawn = random_timings(sorted(OPTION_VARIANTS).index(option))
    fast = optimize(model, dtype, backend=BACKENDS[-1], example_input=x)
    # Without AMX, float32's only weighed way is the grouped kernel (1×1s and dense 3×3s go to
    # oneDNN prepacked unweighed), and forms a and b have no grouped layer: nothing to draw there.
    if dtype == "bf16" or amx == "amx" or _has_grouped_layers(model):
        assert drawn  # the choosers did weigh ways, with the drawn times
    _assert_same_function(fast, x, want, dtype)


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return nn.functional.cosine_similarity(a.double().flatten(), b.double().flatten(), dim=0).item()


def _training_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, dtype: str):
    """The loss, input gradient and parameter gradients of one training step of `model`."""
    xg = x.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16"):
        loss = nn.functional.cross_entropy(model(xg), y)
    loss.backward()
    return loss.detach(), xg.grad, torch.cat([p.grad.flatten() for p in model.parameters()])


def _check_random_training_step(
    spec: resnext.ModelSpec,
    shape: tuple[int, ...],
    dtype: str,
    seed: int,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """One training step of `spec`'s model on an input of `shape`, every op's implementation
    drawn at random, must be the step every op's reference (oneDNN) takes."""
    torch.manual_seed(seed)
    model = resnext.build_model(spec).train().to(memory_format=torch.channels_last)
    use_training_fast_paths(
        model,
        fused_bn=True,
        grouped_kernels=True,
        gemm_weight_grad=True,
        fast_maxpool=True,
        fp16_products=dtype == "fp16",
    )
    x = torch.randn(shape).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, spec.num_classes, (x.shape[0],))
    reference = autotune.Chooser()
    monkeypatch.setattr(autotune, "CHOOSER", reference)
    with reference.prefer():  # no name preferred: every op runs its reference
        want = _training_step(copy.deepcopy(model), x, y, dtype)
    rng = random.Random(seed)
    drawn = autotune.Chooser(margin=0.0, warmup=0, repeats=1, clock=rng.random)
    monkeypatch.setattr(autotune, "CHOOSER", drawn)
    got = _training_step(copy.deepcopy(model), x, y, dtype)
    winners = {(d.op, d.winner) for d in drawn.decisions()}
    grouped = _has_grouped_layers(model)
    # forward and both gradients of the 1×1s, and of the grouped 3×3s (forms a and b have none)
    assert len({op for op, _ in winners}) >= (6 if grouped else 3)
    assert any(d.winner != next(iter(d.ms)) for d in drawn.decisions())  # not all references
    if dtype == "fp16":
        assert any(winner == "ours-fp16" for _, winner in winners)  # float16 products drawn
    # a ReLU mask flipped by rounding moves a few gradient entries (RESULTS.md, stop 51): the
    # gradients' directions are compared, not their entries. Float16 products against the
    # float32 reference: cosines 0.977-0.984 with every 1×1 on them, down to 0.956 over ten
    # draws in a network without residuals, where each gradient passes every layer; bf16
    # autocast's there 0.86-0.89 (RESULTS.md, stop 60).
    loss_bound, direction = {"fp32": (1e-4, 0.999), "fp16": (3e-2, 0.94)}.get(dtype, (3e-2, 0.97))
    assert rel_err(got[0], want[0]) < loss_bound
    assert _cosine(got[1], want[1]) > direction
    assert _cosine(got[2], want[2]) > direction


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("dtype", TRAIN_DTYPES)
def test_any_mix_of_training_kernels_computes_the_reference_step(
    seed: int,
    dtype: str,
    amx: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The training fast path picks each op's implementation by timing (`autotune`); a clock
    # reading random times makes the picks random, per op and shape, and the step must still be
    # the one every op's reference (oneDNN) computes, up to rounding.
    spec = resnext.ModelSpec(depths=(2, 1, 1), cardinality=8, base_width=8, num_classes=10)
    _check_random_training_step(spec, (4, 3, 64, 64), dtype, seed, monkeypatch)


@pytest.mark.parametrize("dtype", ["fp32", *FP16])
@pytest.mark.parametrize("option", sorted(OPTION_VARIANTS))
def test_any_mix_of_training_kernels_on_every_spec_option(
    option: str, dtype: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = resnext.ModelSpec(
        depths=(2, 1, 1), cardinality=8, base_width=8, num_classes=10, **OPTION_VARIANTS[option]
    )
    _check_random_training_step(spec, (4, 3, 64, 48), dtype, 0, monkeypatch)
