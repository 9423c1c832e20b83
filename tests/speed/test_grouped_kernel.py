"""Our grouped 3×3 kernel (both builds) equals torch's convolution; its build, errors and model swap."""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F
from builds import use_build
from grouped_timing import time_grouped_ways
from tensor_checks import rel_err, within_bf16_grouped_bound
from torch import nn

import resnext
from resnext import native
from resnext.errors import ConfigError
from resnext.speed import grouped_amx, grouped_kernel, grouped_swap, measure
from resnext.speed.fastpath import optimize
from resnext.speed.grouped_swap import (
    FastGroupedConv3x3,
    NativeGroupedConv3x3,
    amx_form,
    fuse_following_relu,
    swap_grouped_convs,
)
from resnext.speed.prepacked import PrepackedConv

REASON = grouped_kernel.unavailable_reason()
needs_kernel = pytest.mark.skipif(
    REASON is not None, reason=f"grouped kernel unavailable: {REASON}"
)
needs_bf16_kernel = pytest.mark.skipif(
    grouped_kernel.unavailable_reason(torch.bfloat16) is not None,
    reason=f"bf16 kernel unavailable: {grouped_kernel.unavailable_reason(torch.bfloat16)}",
)


@pytest.fixture(params=[grouped_kernel.AVX512, grouped_kernel.AVX2], ids=lambda isa: isa.name)
def isa(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> grouped_kernel.Isa:
    """Each build this CPU runs, made the module's (an AVX-512 CPU also runs the AVX2 build)."""
    build: grouped_kernel.Isa = request.param
    use_build(monkeypatch, grouped_kernel, "ISA", build, "grouped kernel")
    return build


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        ({"avx2", "fma", "avx512f", "avx512bw", "avx512vl"}, "avx512"),
        ({"avx2", "fma", "avx512f"}, "avx2"),  # AVX-512 without BW/VL: the AVX2 build
        ({"avx2", "fma"}, "avx2"),
        ({"sse4_2"}, "avx512"),  # neither: the AVX-512 build, which names what is missing
    ],
)
def test_the_widest_build_the_cpu_runs_is_chosen(flags: set[str], expected: str) -> None:
    assert grouped_kernel.choose_isa(flags).name == expected


@pytest.mark.parametrize("cpg", [4, 8, 16, 32, 64])
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("size", [(1, 1), (2, 3), (7, 7), (9, 14), (15, 8)])
def test_kernel_equals_conv2d(
    isa: grouped_kernel.Isa, cpg: int, stride: int, size: tuple[int, int]
) -> None:
    groups = 32 if cpg <= 16 else 4
    channels = cpg * groups
    torch.manual_seed(cpg * 100 + stride * 10 + size[0])
    x = torch.randn(2, channels, *size)
    w = torch.randn(channels, cpg, 3, 3)
    b = torch.randn(channels)
    packed = grouped_kernel.pack_weights(w, groups)
    for bias, relu in ((None, False), (b, True)):
        got = grouped_kernel.run_kernel(x, packed, bias, groups, stride, relu)
        expected = F.conv2d(x, w, bias, stride=stride, padding=1, groups=groups)
        if relu:
            expected = expected.relu()
        assert got.shape == expected.shape
        assert got.is_contiguous(memory_format=torch.channels_last)
        assert rel_err(got, expected) < 1e-5


@needs_kernel
@needs_bf16_kernel
@pytest.mark.parametrize("cpg", [4, 8, 32])
def test_bf16_kernel_matches_fp32_of_the_same_inputs(cpg: int) -> None:
    groups = 16
    channels = cpg * groups
    x = torch.randn(3, channels, 10, 9).to(torch.bfloat16)
    w = torch.randn(channels, cpg, 3, 3)
    got = grouped_kernel.run_kernel(x, grouped_kernel.pack_weights(w, groups), None, groups, 1)
    assert got.dtype == torch.bfloat16
    # The kernel accumulates in fp32 and rounds once: error of one bf16 rounding (2^-8).
    expected = F.conv2d(x.float(), w, stride=1, padding=1, groups=groups)
    assert rel_err(got, expected) < 2**-7


def test_empty_batch_and_nchw_input(isa: grouped_kernel.Isa) -> None:
    w = torch.randn(64, 4, 3, 3)
    packed = grouped_kernel.pack_weights(w, 16)
    assert grouped_kernel.run_kernel(torch.randn(0, 64, 5, 5), packed, None, 16, 2).shape == (
        0,
        64,
        3,
        3,
    )
    x = torch.randn(1, 64, 6, 6)  # NCHW contiguous: converted, same result
    expected = F.conv2d(x, w, padding=1, groups=16)
    assert rel_err(grouped_kernel.run_kernel(x, packed, None, 16, 1), expected) < 1e-5


def test_bad_inputs_name_the_argument(isa: grouped_kernel.Isa) -> None:
    with pytest.raises(ValueError, match="weight"):
        grouped_kernel.pack_weights(torch.randn(48, 3, 3, 3), 16)  # 3 channels per group
    with pytest.raises(ValueError, match="weight"):
        grouped_kernel.pack_weights(torch.randn(64, 4, 1, 1), 16)
    packed = grouped_kernel.pack_weights(torch.randn(64, 4, 3, 3), 16)
    with pytest.raises(ValueError, match="x"):
        grouped_kernel.run_kernel(torch.randn(1, 64, 5, 5).double(), packed, None, 16, 1)
    with pytest.raises(ValueError, match="x"):
        grouped_kernel.run_kernel(torch.randn(1, 64, 5, 5), packed, None, 16, 3)
    with pytest.raises(ValueError, match="packed"):
        grouped_kernel.run_kernel(torch.randn(1, 64, 5, 5), packed[:-1], None, 16, 1)
    with pytest.raises(ValueError, match="bias"):
        grouped_kernel.run_kernel(torch.randn(1, 64, 5, 5), packed, torch.zeros(3), 16, 1)
    assert not grouped_kernel.supports(48, 16, 1)
    assert not grouped_kernel.supports(64, 16, 3)
    assert grouped_kernel.supports(24, 6, 1) == (isa.lanes == 8)  # 4 per group, 3 × 8 channels


def test_the_avx2_build_takes_channels_in_blocks_of_8(isa: grouped_kernel.Isa) -> None:
    if isa.lanes != 8:
        pytest.skip("the AVX-512 build takes blocks of 16 channels")
    for channels, groups in ((24, 6), (40, 5), (24, 3)):  # 4 and 8 per group, odd block counts
        x = torch.randn(2, channels, 9, 7)
        w = torch.randn(channels, channels // groups, 3, 3)
        got = grouped_kernel.run_kernel(x, grouped_kernel.pack_weights(w, groups), None, groups, 2)
        expected = F.conv2d(x, w, stride=2, padding=1, groups=groups)
        assert rel_err(got, expected) < 1e-5


def test_the_avx2_build_refuses_bf16(isa: grouped_kernel.Isa) -> None:
    if isa.bf16:
        pytest.skip("the AVX-512 build takes bf16")
    assert "float32 only" in str(grouped_kernel.unavailable_reason(torch.bfloat16))
    assert not grouped_kernel.takes_pairs(64, 16, torch.bfloat16)
    packed = grouped_kernel.pack_weights(torch.randn(64, 4, 3, 3), 16)
    x = torch.randn(1, 64, 5, 5).to(torch.bfloat16)
    with pytest.raises(
        ValueError, match=r"x: expected a 4-d float32 CPU tensor \(the avx2 build\)"
    ):
        grouped_kernel.run_kernel(x, packed, None, 16, 1)


def test_a_missing_compiler_is_named(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    # (the build cache itself, shared by every kernel: test_native_build.py)
    monkeypatch.setenv("CC", "no-such-compiler-xyz")
    with pytest.raises(grouped_kernel.KernelUnavailable, match="no-such-compiler-xyz"):
        grouped_kernel.build(tmp_path)


def test_cache_dir_follows_the_environment(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RESNEXT_KERNEL_CACHE", str(tmp_path / "k"))
    assert native.cache_dir() == tmp_path / "k"


class _Block(nn.Module):
    """conv → identity (a folded BN) → shared ReLU, as in the Bottleneck."""

    def __init__(self) -> None:
        super().__init__()
        self.conv2 = nn.Conv2d(64, 64, 3, padding=1, groups=16, bias=True)
        self.bn2 = nn.Identity()
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.bn2(self.conv2(x))) + 1.0


@needs_kernel
def test_swap_on_fuses_the_relu_and_keeps_the_function() -> None:
    model = nn.Sequential(_Block()).eval()
    x = torch.randn(2, 64, 8, 8).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        expected = model(x)
    choices = swap_grouped_convs(model, x, mode="on")
    assert [c.chosen for c in choices] == ["kernel+relu"]
    assert isinstance(model[0].conv2, FastGroupedConv3x3) and model[0].conv2.relu
    with torch.no_grad():
        assert rel_err(model(x), expected) < 1e-5


@needs_kernel
def test_relu_not_fused_when_the_conv_output_is_used_twice() -> None:
    class TwoUses(_Block):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.conv2(x)
            return self.relu(y) + y

    model = nn.Sequential(TwoUses()).eval()
    model[0].conv2 = FastGroupedConv3x3(model[0].conv2)
    assert not fuse_following_relu(model, "0.conv2")
    assert not model[0].conv2.relu


def test_bad_mode_is_a_config_error() -> None:
    model = resnext.create_model("resnext_tiny").eval()
    with pytest.raises(ConfigError, match="grouped_kernel"):
        optimize(model, backend="none", grouped_kernel="fast")
    with pytest.raises(ConfigError, match="grouped_kernel"):
        swap_grouped_convs(model, torch.randn(1, 3, 32, 32), mode="yes")


@needs_kernel
@pytest.mark.parametrize("backend", ["none", "jit", "inductor"])
def test_optimize_with_the_kernel_same_function(backend: str) -> None:
    torch.manual_seed(0)
    # 64 channels per stage-1 group width 4 ×16 groups: the kernel takes every grouped conv.
    spec = resnext.models.ModelSpec(
        depths=(1, 1), stem="cifar", cardinality=16, base_width=4, num_classes=10
    )
    model = resnext.models.build_model(spec).eval()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_(0.0, 0.1)
            m.running_var.uniform_(0.5, 2.0)
    x = torch.randn(2, 3, 32, 32)
    fast = optimize(model, "fp32", backend=backend, example_input=x, grouped_kernel="on")
    assert [c.chosen for c in fast.grouped_choices] == ["kernel+relu"] * 2
    fresh = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert rel_err(fast(fresh), model(fresh)) < 1e-4


# Channels of each pair kernel's test: 3 blocks of 32 for the narrow kernels (4 and 8 per group);
# 2 to 8 groups for the wide one (16, 32 and 64 per group).
PAIR_CHANNELS = {4: 96, 8: 96, 16: 128, 32: 128, 64: 128}


@needs_kernel
@needs_bf16_kernel
@pytest.mark.parametrize("cpg", list(PAIR_CHANNELS))
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("size", [(1, 1), (5, 8), (13, 7), (14, 15)])
def test_bf16_pair_kernels_equal_conv2d(cpg: int, stride: int, size: tuple[int, int]) -> None:
    # widths that leave a partial tile (of 6, 2 or 7 pixels), rows and columns at the edges
    channels = PAIR_CHANNELS[cpg]
    groups = channels // cpg
    torch.manual_seed(cpg + stride + size[0])
    x = torch.randn(2, channels, *size).to(torch.bfloat16)
    w = torch.randn(channels, cpg, 3, 3).to(torch.bfloat16).float()  # exactly representable
    b = torch.randn(channels)
    assert grouped_kernel.takes_pairs(channels, groups, torch.bfloat16)
    packed = grouped_kernel.pack_weights(w, groups, pairs=True)
    assert packed.dtype == torch.bfloat16
    got = grouped_kernel.run_kernel(x, packed, b, groups, stride, relu=True)
    assert within_bf16_grouped_bound(got, x, w, b, stride, groups)
    with pytest.raises(ValueError, match="packed"):  # pair weights with fp32 activations
        grouped_kernel.run_kernel(x.float(), packed, b, groups, stride)


@needs_kernel
@needs_bf16_kernel
def test_pair_packing_refuses_channels_off_the_32_channel_blocks() -> None:
    assert not grouped_kernel.takes_pairs(48, 6, torch.bfloat16)  # 8 per group, C % 32 != 0
    assert not grouped_kernel.takes_pairs(48, 3, torch.bfloat16)  # 16 per group, likewise
    with pytest.raises(ValueError, match="weight: pair packing needs"):
        grouped_kernel.pack_weights(torch.randn(48, 8, 3, 3), 6, pairs=True)


@needs_kernel
@needs_bf16_kernel
@pytest.mark.parametrize("cpg", [4, 8])
def test_narrow_pair_packing_puts_each_weight_where_the_kernel_reads_it(cpg: int) -> None:
    groups = 64 // cpg  # two 32-channel blocks
    w = torch.randn(64, cpg, 3, 3)
    packed = grouped_kernel.pack_weights(w, groups, pairs=True)
    assert packed.shape == (2, 9, cpg, 32)
    # value q of output o's vector: from input channel 32·block + q to output o of its group
    for block, tap, o, q in ((0, 0, 0, 0), (1, 4, cpg - 1, 13), (1, 8, 2, 31), (0, 5, 1, 17)):
        channel = 32 * block + q
        want = w[channel // cpg * cpg + o, channel % cpg, tap // 3, tap % 3].to(torch.bfloat16)
        assert packed[block, tap, o, q] == want


@needs_kernel
@needs_bf16_kernel
def test_wide_pair_packing_puts_each_outputs_pair_where_the_kernel_reads_it() -> None:
    cpg, groups = 16, 2
    w = torch.randn(cpg * groups, cpg, 3, 3)
    packed = grouped_kernel.pack_weights(w, groups, pairs=True)
    assert packed.shape == (2, 9, cpg // 2, 16, 2)
    for block, tap, pair, lane, k in ((0, 0, 0, 0, 0), (1, 4, 3, 5, 1), (1, 8, 7, 15, 0)):
        want = w[16 * block + lane, 2 * pair + k, tap // 3, tap % 3].to(torch.bfloat16)
        assert packed[block, tap, pair, lane, k] == want


@needs_kernel
@needs_bf16_kernel
def test_optimize_bf16_with_the_kernel_close_to_fp32() -> None:
    torch.manual_seed(1)
    spec = resnext.models.ModelSpec(
        depths=(1, 1), stem="cifar", cardinality=8, base_width=4, num_classes=10
    )  # stage 1: 32 channels, 4 per group (pair kernel); stage 2: 64, 8 per group
    model = resnext.models.build_model(spec).eval()
    x = torch.randn(4, 3, 32, 32)
    fast = optimize(model, "bf16", backend="none", example_input=x, grouped_kernel="on")
    assert [c.chosen for c in fast.grouped_choices] == ["kernel+relu"] * 2
    with torch.no_grad():
        assert rel_err(fast(x), model(x)) < 3e-2


@needs_kernel
@needs_bf16_kernel
def test_inference_module_widening_and_pair_variants_both_equal_conv2d() -> None:
    torch.manual_seed(3)
    conv = nn.Conv2d(64, 64, 3, 1, 1, groups=16, bias=True)  # 4 channels per group
    x = torch.randn(2, 64, 9, 7).to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
    want = F.conv2d(x.float(), conv.weight.detach().bfloat16().float(), conv.bias, 1, 1, 1, 16)
    pair = FastGroupedConv3x3(conv, dtype=torch.bfloat16)
    widening = FastGroupedConv3x3(conv, dtype=torch.bfloat16, variant="widening")
    assert pair.variant == "pairs" and widening.variant == "widening"
    with pytest.raises(ValueError, match="variant"):  # fp32 activations have no pair kernel
        FastGroupedConv3x3(conv, dtype=torch.float32, variant="pairs")
    with torch.no_grad():
        for module in (pair, widening):
            assert rel_err(module(x), want) < 2**-7


@needs_kernel
@needs_bf16_kernel
def test_auto_records_which_kernel_variant_it_swapped_in() -> None:
    torch.manual_seed(4)
    spec = resnext.models.ModelSpec(
        depths=(1,), stem="cifar", cardinality=8, base_width=4, num_classes=10
    )  # 32 channels, 4 per group: both variants apply
    model = resnext.models.build_model(spec).eval()
    x = torch.randn(8, 3, 32, 32)
    # fusions off: a fused 1×1 or block would replace the swapped module this test looks for
    fast = optimize(
        model, "bf16", backend="none", example_input=x, fuse_pointwise="off", fuse_block="off"
    )
    (choice,) = fast.grouped_choices
    if choice.chosen != "native":
        swapped = next(m for m in fast.modules() if isinstance(m, FastGroupedConv3x3))
        assert swapped.variant == choice.variant
    with torch.no_grad():
        assert rel_err(fast(x), model(x)) < 3e-2


@pytest.mark.skipif(
    grouped_amx.unavailable_reason() is not None, reason="needs the AMX grouped kernel"
)
def test_every_swapped_layer_has_an_amx_form_for_the_fusion_passes() -> None:
    """Whichever variant wins a layer (at stage 1, batch 1 the AVX-512 one has), its AMX form is
    at hand for the fused kernels, with the winner's ReLU flag, and is not a child module."""
    block = nn.Sequential(nn.Conv2d(128, 128, 3, 1, 1, groups=32), nn.ReLU())
    model = nn.Sequential(block).eval().bfloat16()
    x = torch.randn(1, 128, 56, 56).bfloat16().contiguous(memory_format=torch.channels_last)
    (choice,) = swap_grouped_convs(model, x, mode="on")
    chosen = model.get_submodule("0.0")
    amx = amx_form(chosen)
    assert amx is not None and amx.variant == "amx" and amx.relu == chosen.relu
    assert (amx is chosen) == (choice.variant == "amx")
    assert all(m.variant == choice.variant for m in model.modules() if hasattr(m, "variant"))
    with torch.no_grad():
        assert rel_err(amx(x), chosen(x)) < 2**-7


@pytest.mark.skipif(
    grouped_amx.unavailable_reason() is not None, reason="needs the AMX grouped kernel"
)
def test_where_onednn_wins_alone_its_conv_is_kept_with_an_amx_form_beside_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # oneDNN made to win every timing: the layer stays oneDNN's, in a form the fusion passes see
    time_grouped_ways(monkeypatch, 0.0, 1.0)
    block = nn.Sequential(nn.Conv2d(128, 128, 3, 1, 1, groups=32), nn.ReLU())
    model = nn.Sequential(block).eval().bfloat16()
    x = torch.randn(2, 128, 9, 9).bfloat16().contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        want = model(x)
    (choice,) = swap_grouped_convs(model, x, mode="auto")
    assert choice.chosen == "native"
    kept = model.get_submodule("0.0")
    assert isinstance(kept, NativeGroupedConv3x3) and kept.relu  # the ReLU moved in
    assert not any(isinstance(m, nn.ReLU) for m in model.modules())
    amx = amx_form(kept)
    assert amx is not None and amx.variant == "amx" and amx.relu
    with torch.no_grad():
        assert torch.equal(model(x), want)  # exactly the convolution it was
        assert rel_err(amx(x), want) < 2**-7


@pytest.mark.parametrize(("extra_ms", "chosen"), [(0.0, "native"), (0.2, "kernel")])
def test_onednn_is_timed_prepacked_and_a_replay_weighs_leaving_its_loop(
    monkeypatch: pytest.MonkeyPatch, extra_ms: float, chosen: str
) -> None:
    # oneDNN (prepacked, as every backend runs it) 1.0 ms, our kernels 1.1: a replay leaves its
    # C loop for oneDNN, which `native_extra_ms` adds to its time in the choice
    timed: list[type] = []

    def times(fns, x, repeats, before=None):  # type: ignore[no-untyped-def]
        timed.extend(type(fn) for fn in fns)
        return [1.0 if isinstance(fn, PrepackedConv) else 1.1 for fn in fns]

    monkeypatch.setattr(grouped_swap, "time_each_ms", times)
    model = nn.Sequential(nn.Conv2d(64, 64, 3, 1, 1, groups=16)).eval()
    x = torch.randn(2, 64, 9, 9).contiguous(memory_format=torch.channels_last)
    (choice,) = swap_grouped_convs(model, x, mode="auto", native_extra_ms=extra_ms)
    assert timed[0] is PrepackedConv and nn.Conv2d not in timed
    assert choice.chosen == chosen and choice.native_ms == 1.0  # the time measured


def test_the_choosers_time_their_ways_in_turns_and_keep_each_ones_best(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # a clock that jumps 10 s while way "a" runs its second timed call: a slow moment of the
    # machine. Each way's best call is kept, so the jump decides nothing.
    log: list[str] = []
    now = [0.0]
    durations = {"a": 0.003, "b": 0.002}

    def way(name: str):  # type: ignore[no-untyped-def]
        def run(x: torch.Tensor) -> None:
            log.append(name)
            now[0] += durations[name] + (10.0 if log.count("a") == 4 else 0.0)

        return run

    monkeypatch.setattr(grouped_swap.time, "perf_counter", lambda: now[0])
    a_ms, b_ms = grouped_swap.time_each_ms([way("a"), way("b")], torch.zeros(1), repeats=3)
    # two untimed calls each, then turns, each starting one way further on
    untimed = ["a", "a", "b", "b"]
    assert log == [*untimed, "a", "b", "b", "a", "a", "b"]
    assert a_ms == pytest.approx(3.0) and b_ms == pytest.approx(2.0)
    # `before` (cache eviction) runs before every timed call, and its time is not counted
    log.clear()

    def before() -> None:
        log.append("evict")
        now[0] += 5.0

    a_ms, b_ms = grouped_swap.time_each_ms([way("a"), way("b")], torch.zeros(1), 2, before)
    assert log == [*untimed, "evict", "a", "evict", "b", "evict", "b", "evict", "a"]
    assert a_ms == pytest.approx(3.0) and b_ms == pytest.approx(2.0)


@needs_kernel
def test_the_grouped_chooser_times_each_call_cold_with_one_buffer_a_pass(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    opened: list[int] = []
    evictions: list[int] = []

    @contextlib.contextmanager
    def counting():  # type: ignore[no-untyped-def]
        opened.append(1)
        yield lambda: evictions.append(1)

    monkeypatch.setattr(grouped_swap, "cache_evictor", counting)
    model = resnext.create_model("resnext_tiny").eval().to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    ways = {
        name: 1 + len(grouped_swap.runnable_variants(m, torch.float32))
        for name, m in model.named_modules()
        if grouped_swap.eligible(m)
    }
    choices = swap_grouped_convs(model, x, mode="auto", repeats=3)
    assert choices and opened == [1]  # one eviction buffer for the whole pass
    # one eviction before each timed call: every way of every layer timed, 3 times each
    assert len(evictions) == sum(3 * ways[c.name] for c in choices)


@pytest.mark.real_eviction
def test_evicting_writes_a_buffer_larger_than_a_last_level_cache_freed_after() -> None:
    with measure.cache_evictor() as evict:
        evict()
        (cell,) = evict.__closure__
        (buffer,) = cell.cell_contents
        assert buffer.numel() * buffer.element_size() >= 32 * 2**20  # an EPYC CCX's L3: 32 MB
        assert bool((buffer == 1.0).all())
        del buffer
    with pytest.raises(IndexError):  # the buffer was freed when the block ended...
        evict()
    with pytest.raises(KeyError), measure.cache_evictor() as evict:
        raise KeyError("a timing failed")
    with pytest.raises(IndexError):  # ...however it ended
        evict()


def test_layer_input_shapes_come_from_one_and_two_image_forwards() -> None:
    model = resnext.create_model("resnext_tiny").eval()
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    batches: list[int] = []
    model.register_forward_pre_hook(lambda _m, args: batches.append(args[0].shape[0]))
    x = torch.randn(5, 3, 32, 32)
    shapes = grouped_swap.input_shapes(model, names, x)
    assert batches == [1, 2]  # the shape probes, not the 5-image forward
    # what hooks on a forward of all 5 images see
    seen: dict[str, tuple] = {}
    for name in names:
        model.get_submodule(name).register_forward_pre_hook(
            lambda _m, args, name=name: seen.__setitem__(name, tuple(args[0].shape))
        )
    with torch.no_grad():
        model(x)
    assert shapes == seen and len(seen) == len(names)


class _ImagesAsChannels(nn.Module):
    """Stacks the batch's images along channels: what `seen` gets depends on the batch."""

    def __init__(self, conv: bool) -> None:
        super().__init__()
        self.seen = nn.LazyConv2d(4, 3, padding=1) if conv else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.seen(x.reshape(1, -1, *x.shape[2:]))


@pytest.mark.parametrize("conv", [False, True])  # the probes run but differ / the probes fail
def test_a_model_that_mixes_images_is_measured_on_the_whole_batch(conv: bool) -> None:
    model = _ImagesAsChannels(conv)
    batches: list[int] = []
    model.register_forward_pre_hook(lambda _m, args: batches.append(args[0].shape[0]))
    x = torch.randn(3, 2, 8, 8)
    with torch.no_grad():
        model(x)  # the lazy conv takes 3 images × 2 channels
    batches.clear()
    assert grouped_swap.input_shapes(model, ["seen"], x) == {"seen": (1, 6, 8, 8)}
    assert batches[-1] == 3
