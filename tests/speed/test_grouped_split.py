"""The split-order grouped 3×3 kernel equals torch's convolution in its orders; the pass that
puts a bottleneck's channels in that order keeps the block's function."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from tensor_checks import rel_err, within_bf16_grouped_bound
from torch import nn

import resnext
from resnext.errors import ConfigError
from resnext.speed import grouped_split
from resnext.speed.fastpath import optimize
from resnext.speed.fold import fold_batchnorm
from resnext.speed.group_order import find_sandwich, split_group_channels
from resnext.speed.grouped_split import SplitGroupedConv3x3, input_order, output_order

REASON = grouped_split.unavailable_reason()
needs_split = pytest.mark.skipif(REASON is not None, reason=f"split kernels unavailable: {REASON}")

# two blocks of 16 groups each
CHANNELS = {4: 128, 8: 256}


def test_orders_follow_their_definition_worked_by_hand() -> None:
    # 4 per group: input position 32r + 2g + k is channel 4g + 2r + k; output 16o + g is 4g + o
    inputs, outputs = input_order(64, 16), output_order(64, 16)
    assert inputs[:6].tolist() == [0, 1, 4, 5, 8, 9]
    assert inputs[32:36].tolist() == [2, 3, 6, 7]
    assert inputs[62:].tolist() == [62, 63]
    assert outputs[:3].tolist() == [0, 4, 8]
    assert outputs[16:18].tolist() == [1, 5]
    assert outputs[63].item() == 63
    # 8 per group, two blocks of 128: pair r of group g at 32r + 2g; output o of group g at 16o + g
    inputs, outputs = input_order(256, 32), output_order(256, 32)
    assert inputs[2:4].tolist() == [8, 9]
    assert inputs[96:98].tolist() == [6, 7]  # r = 3
    assert inputs[128].item() == 128 and inputs[130].item() == 136
    assert outputs[1].item() == 8 and outputs[16].item() == 1 and outputs[127].item() == 127
    assert outputs[128 + 17].item() == 128 + 9
    for order in (inputs, outputs):
        assert sorted(order.tolist()) == list(range(256))


@needs_split
@pytest.mark.parametrize("cpg", [4, 8])
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("size", [(1, 1), (5, 7), (9, 14), (14, 13)])
def test_kernel_equals_conv2d_in_its_orders(cpg: int, stride: int, size: tuple[int, int]) -> None:
    # widths that leave partial tiles (of 4 or 2 pixels), edges on every side, two blocks
    channels = CHANNELS[cpg]
    groups = channels // cpg
    torch.manual_seed(cpg + stride + size[1])
    x = torch.randn(2, channels, *size).to(torch.bfloat16)
    w = torch.randn(channels, cpg, 3, 3).to(torch.bfloat16).float()  # exactly representable
    b = torch.randn(channels)
    packed = grouped_split.pack_weights(w, groups)
    x_split = x[:, input_order(channels, groups)].contiguous(memory_format=torch.channels_last)
    order = output_order(channels, groups)
    got = grouped_split.run_split(x_split, packed, b[order], groups, stride, relu=True)
    assert got.dtype == torch.bfloat16
    assert within_bf16_grouped_bound(got, x, w, b, stride, groups, channel_order=order)


@needs_split
def test_without_bias_or_relu_the_sums_are_kept_negative() -> None:
    torch.manual_seed(5)
    x = torch.randn(1, 128, 6, 6).to(torch.bfloat16)
    w = torch.randn(128, 4, 3, 3).to(torch.bfloat16).float()
    x_split = x[:, input_order(128, 32)].contiguous(memory_format=torch.channels_last)
    got = grouped_split.run_split(x_split, grouped_split.pack_weights(w, 32), None, 32, 1)
    expected = F.conv2d(x.double(), w.double(), None, 1, 1, 1, 32)[:, output_order(128, 32)]
    assert (got < 0).any()
    assert rel_err(got.double(), expected) < 2**-7


def test_packing_puts_each_weight_where_the_kernel_reads_it() -> None:
    for cpg in (4, 8):
        groups = CHANNELS[cpg] // cpg
        w = torch.randn(CHANNELS[cpg], cpg, 3, 3)
        packed = grouped_split.pack_weights(w, groups)
        assert packed.shape == (2, 9, cpg, cpg // 2, 16, 2) and packed.dtype == torch.bfloat16
        # vector (o, r) of block b at a tap: lane g holds the pair of group g's input 2r + k
        for block, tap, o, r, g, k in (
            (0, 0, 0, 0, 0, 0),
            (1, 4, cpg - 1, 1, 15, 1),
            (1, 8, 2, 0, 7, 0),
        ):
            want = w[cpg * (16 * block + g) + o, 2 * r + k, tap // 3, tap % 3].to(torch.bfloat16)
            assert packed[block, tap, o, r, g, k] == want


@needs_split
def test_same_bits_on_any_thread_count(on_threads) -> None:
    torch.manual_seed(6)
    conv = nn.Conv2d(256, 256, 3, 2, 1, groups=32)
    module = SplitGroupedConv3x3(conv, relu=True)
    x = torch.randn(3, 256, 11, 10).to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
    outs = []
    for threads in (1, 2, 3):
        with on_threads(threads), torch.no_grad():
            outs.append(module(x))
    assert all(torch.equal(outs[0], o) for o in outs[1:])


@needs_split
def test_bad_inputs_name_what_was_expected() -> None:
    w = torch.randn(128, 4, 3, 3)
    packed = grouped_split.pack_weights(w, 32)
    x = torch.randn(1, 128, 5, 5).to(torch.bfloat16)
    with pytest.raises(ValueError, match="x: expected a 4-d bfloat16"):
        grouped_split.run_split(x.float(), packed, None, 32, 1)
    with pytest.raises(ValueError, match="not a shape the split kernels take"):
        grouped_split.run_split(x, packed, None, 8, 1)  # 16 per group
    with pytest.raises(ValueError, match="not a shape the split kernels take"):
        grouped_split.run_split(x, packed, None, 32, 3)
    with pytest.raises(ValueError, match="packed: expected a contiguous bf16 tensor of 4608"):
        grouped_split.run_split(x, packed[:1], None, 32, 1)
    with pytest.raises(ValueError, match="bias"):
        grouped_split.run_split(x, packed, torch.zeros(64), 32, 1)
    with pytest.raises(ValueError, match="channels: expected"):
        input_order(96, 24)  # 4 per group, but 24 groups are not whole blocks of 16
    with pytest.raises(ValueError, match=r"weight: expected a \(C, C/groups, 3, 3\)"):
        grouped_split.pack_weights(torch.randn(128, 4, 1, 1), 32)
    with pytest.raises(ValueError, match="conv: not a shape the split kernels take"):
        SplitGroupedConv3x3(nn.Conv2d(512, 512, 3, 1, 1, groups=32))  # 16 per group


def _model() -> nn.Module:
    """Two ResNeXt stages whose grouped 3×3s the split kernels take: 64 channels in 16 groups of
    4, then 128 in 16 of 8 (stride 2), with non-trivial BNs."""
    torch.manual_seed(7)
    spec = resnext.models.ModelSpec(
        depths=(1, 1), stem="cifar", cardinality=16, base_width=4, num_classes=10
    )
    model = resnext.models.build_model(spec).eval()
    gen = torch.Generator().manual_seed(3)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_(0.0, 0.1, generator=gen)
            m.running_var.uniform_(0.5, 2.0, generator=gen)
    return model


def test_a_bottleneck_is_a_sandwich_and_a_shared_input_is_not() -> None:
    folded = fold_batchnorm(_model())
    sandwich = find_sandwich(folded, "layer1.0.conv2")
    assert sandwich is not None
    assert (sandwich.before, sandwich.after) == ("layer1.0.conv1", "layer1.0.conv3")

    class Shared(nn.Module):
        """The grouped 3×3's input also goes to the output: its order is not free."""

        def __init__(self) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(64, 64, 1)
            self.conv2 = nn.Conv2d(64, 64, 3, 1, 1, groups=16)
            self.conv3 = nn.Conv2d(64, 64, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.conv1(x).relu()
            return self.conv3(self.conv2(y)) + y

    class Last(nn.Module):
        """Nothing reads the grouped 3×3's output in a 1×1."""

        def __init__(self) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(64, 64, 1)
            self.conv2 = nn.Conv2d(64, 64, 3, 1, 1, groups=16)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.conv2(self.conv1(x).relu()).mean((2, 3))

    for net in (Shared(), Last()):
        wrapped = nn.Sequential(net)
        assert find_sandwich(wrapped, "0.conv2") is None


@needs_split
def test_the_pass_keeps_the_function_and_permutes_the_neighbours() -> None:
    model = fold_batchnorm(_model())
    model = model.to(torch.bfloat16, memory_format=torch.channels_last)
    x = torch.randn(2, 3, 32, 32).to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
    conv1, conv3 = model.layer2[0].conv1.weight.clone(), model.layer2[0].conv3.weight.clone()
    with torch.no_grad():
        before = model(x).float()
    choices = split_group_channels(model, x, mode="on")
    assert [(c.name, c.variant, c.chosen) for c in choices] == [
        ("layer1.0.conv2", "split", "kernel+relu"),
        ("layer2.0.conv2", "split", "kernel+relu"),
    ]
    assert sum(isinstance(m, SplitGroupedConv3x3) for m in model.modules()) == 2
    assert torch.equal(model.layer2[0].conv1.weight, conv1[input_order(128, 16)])
    assert torch.equal(model.layer2[0].conv3.weight, conv3[:, output_order(128, 16)])
    with torch.no_grad():
        after = model(x).float()
    # the same products; only the last 1×1 adds its terms in another order (bf16 outputs)
    assert rel_err(after, before) < 2e-2


@needs_split
def test_auto_leaves_layers_the_amx_kernel_runs_to_its_fusions(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import resnext.speed.group_order as group_order

    model = fold_batchnorm(_model()).to(torch.bfloat16, memory_format=torch.channels_last)
    x = torch.randn(2, 3, 32, 32).to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
    # as on a CPU with AMX: the AMX variant runs (it is not built here; nothing times it)
    monkeypatch.setattr(group_order, "runnable_variants", lambda conv, dtype: ("amx",))
    assert split_group_channels(model, x, mode="auto") == []
    assert not any(isinstance(m, SplitGroupedConv3x3) for m in model.modules())


@needs_split
@pytest.mark.parametrize(("extra_ms", "split"), [(0.0, False), (0.2, True)])
def test_auto_weighs_onednn_prepacked_plus_what_a_replay_adds(
    monkeypatch: pytest.MonkeyPatch, extra_ms: float, split: bool
) -> None:
    import resnext.speed.group_order as group_order
    from resnext.speed.prepacked import PrepackedConv

    model = fold_batchnorm(_model()).to(torch.bfloat16, memory_format=torch.channels_last)
    x = torch.randn(2, 3, 32, 32).to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
    monkeypatch.setattr(group_order, "runnable_variants", lambda conv, dtype: ())
    firsts: list[type] = []

    def times(ways, shape, dtype, repeats, evict, timings, key):  # type: ignore[no-untyped-def]
        firsts.append(type(ways[0]))
        return [1.0, 1.1]  # oneDNN, the split kernel

    monkeypatch.setattr(group_order, "time_ways_cold", times)
    choices = split_group_channels(model, x, mode="auto", native_extra_ms=extra_ms)
    assert firsts and set(firsts) == {PrepackedConv}
    assert len(choices) == (len(firsts) if split else 0)


@needs_split
@pytest.mark.parametrize("backend", ["none", "inductor"])
def test_optimize_with_the_split_order_computes_the_same_function(backend: str) -> None:
    model = _model()
    x = torch.randn(4, 3, 32, 32)
    fast = optimize(model, "bf16", backend=backend, example_input=x, split_groups="on")
    split = [c for c in fast.grouped_choices if c.variant == "split"]
    assert [c.name for c in split] == ["layer1.0.conv2", "layer2.0.conv2"]
    plain = optimize(model, "bf16", backend="none", example_input=x, split_groups="off")
    assert all(c.variant != "split" for c in plain.grouped_choices)
    with torch.no_grad():
        reference = model(x)
        assert rel_err(fast(x), reference) < 3e-2  # bf16 through the network (the registry bound)
        assert rel_err(fast(x), plain(x)) < 3e-2


def test_bad_modes_are_config_errors() -> None:
    model = _model()
    x = torch.randn(2, 3, 32, 32)
    with pytest.raises(ConfigError, match="split_groups: expected one of"):
        optimize(model, "bf16", backend="none", example_input=x, split_groups="yes")
    with pytest.raises(ConfigError, match="split_groups"):
        # float32 activations: the split kernels take bf16 only
        split_group_channels(fold_batchnorm(model), x, mode="on")
