"""The eager fast path's prepacked oneDNN convolutions (`resnext.speed.prepacked`)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from block_nets import Bottleneck
from tensor_checks import nhwc, rel_err
from torch import nn

import resnext
from resnext.speed.capability import bf16_supported
from resnext.speed.dense_swap import prepack_convs
from resnext.speed.fastpath import optimize
from resnext.speed.grouped_swap import NativeGroupedConv3x3
from resnext.speed.prepacked import PrepackedConv

DTYPES = [torch.float32] + ([torch.bfloat16] if bf16_supported() else [])


def _reference(conv: nn.Conv2d, x: torch.Tensor, res: torch.Tensor | None, relu: bool):
    weight, bias = conv.weight.double(), conv.bias.double()
    y = F.conv2d(x.double(), weight, bias, conv.stride, conv.padding, 1, conv.groups)
    if res is not None:
        y = y + res.double()
    return y.clamp(min=0) if relu else y


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("epilogue", ["none", "relu", "add+relu", "add+relu in place"])
@pytest.mark.parametrize("groups", [1, 4])
def test_a_prepacked_convolution_computes_the_convolution_and_its_epilogue(
    dtype: torch.dtype, epilogue: str, groups: int
) -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(16, 32, 3, stride=2, padding=1, groups=groups).to(dtype)
    x = nhwc(torch.randn(2, 16, 9, 9)).to(dtype)
    res = nhwc(torch.randn(2, 32, 5, 5)).to(dtype) if "add" in epilogue else None
    before = None if res is None else res.clone()
    fast = PrepackedConv(conv, epilogue != "none", "in place" in epilogue, tuple(x.shape))
    if torch.backends.mkldnn.is_available():  # packed, whatever the epilogue
        assert fast.packed is not None
    with torch.no_grad():
        want = _reference(conv, x, res, epilogue != "none")
        got = fast(x, res)
    assert rel_err(got.double(), want) < (1e-5 if dtype == torch.float32 else 2e-2)
    if res is not None:  # written over only in place, and then returned
        assert (got is res) == ("in place" in epilogue)
        if "in place" not in epilogue:
            assert torch.equal(res, before)


def test_inputs_it_was_not_packed_for_take_torchs_convolution_and_copies_pack_again() -> None:
    torch.manual_seed(1)
    conv = nn.Conv2d(8, 16, 1)
    fast = PrepackedConv(conv, True, False, (1, 8, 6, 6))
    nchw = torch.randn(1, 8, 6, 6)  # not channels-last: not what the weight was packed for
    with torch.no_grad():
        want = F.relu(conv(nchw))
        assert rel_err(fast(nchw), want) < 1e-5
        assert rel_err(fast(nhwc(nchw)), want) < 1e-5
        twin = copy.deepcopy(fast)
        assert twin.packed is not None and rel_err(twin(nhwc(nchw)), want) < 1e-5
    grad_in = nhwc(nchw).requires_grad_()
    fast(grad_in).sum().backward()  # a gradient through torch's convolution
    assert grad_in.grad is not None
    with pytest.raises(ValueError, match="conv: expected a float32 or bf16 CPU convolution"):
        PrepackedConv(nn.Conv2d(8, 8, 3, dilation=2), False, False, (1, 8, 6, 6))
    with pytest.raises(ValueError, match="conv: expected a float32 or bf16 CPU convolution"):
        PrepackedConv(nn.Conv2d(8, 8, 3).double(), False, False, (1, 8, 6, 6))


def test_where_the_fused_operator_refuses_its_probe_the_convolution_runs_unpacked(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    torch.manual_seed(3)
    conv = nn.Conv2d(8, 16, 3, padding=1)
    x = nhwc(torch.randn(1, 8, 6, 6))

    class Refusing:
        def __getattr__(self, name: str) -> object:
            raise RuntimeError(f"no {name} here")

    monkeypatch.setattr(torch.ops, "mkldnn", Refusing())
    fast = PrepackedConv(conv, True, False, tuple(x.shape))
    assert fast.packed is None
    with torch.no_grad():
        assert rel_err(fast(x), F.relu(conv(x))) < 1e-5


def test_the_pass_packs_every_convolution_left_to_onednn_and_keeps_the_function() -> None:
    torch.manual_seed(2)
    model = resnext.create_model("resnext_tiny").eval().to(memory_format=torch.channels_last)
    x = nhwc(torch.randn(2, 3, 32, 32))
    with torch.no_grad():
        want = model(x)
        names = prepack_convs(model, x)
        got = model(x)
    left = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    assert names and not left
    assert any(model.get_submodule(n).groups > 1 for n in names)  # the grouped 3×3s too
    assert all(isinstance(model.get_submodule(n), PrepackedConv) for n in names)
    assert rel_err(got, want) < 1e-5
    # optimize's eager fast path runs them the same way
    plain = resnext.create_model("resnext_tiny").eval()
    fast = optimize(plain, "fp32", backend="none", example_input=x, grouped_kernel="off")
    assert not any(isinstance(m, nn.Conv2d) for m in fast.modules())


def test_a_shortcut_1x1_is_packed_once_its_block_was_rewritten_and_holds_no_other_conv() -> None:
    # A pass that fuses a block's last 1×1 with its add reinstalls the block's graph, leaving
    # the shortcut's Sequential a plain container fx cannot trace. With every other convolution
    # of the block already taken (here: packed), only the block's graph calls the shortcut's
    # 1×1; it must still be found and packed, not left to run unpacked (found by a chooser
    # that, under load, kept oneDNN for the shortcut and our kernel for the last 1×1).
    torch.manual_seed(5)
    model = nn.Sequential(Bottleneck(16, 8, 32, 1)).eval().to(memory_format=torch.channels_last)
    x = nhwc(torch.randn(2, 16, 6, 6))
    with torch.no_grad():
        prepack_convs(model, x)
    container = model[0].downsample
    assert type(container) is nn.Module  # what the rewrite leaves, as the pass sees it
    # a fresh shortcut 1×1, as a chooser leaves one to oneDNN
    setattr(container, "0", nn.Conv2d(16, 32, 1).to(memory_format=torch.channels_last))
    with torch.no_grad():
        want = model(x)
        assert prepack_convs(model, x) == ["0.downsample.0"]
        assert isinstance(model.get_submodule("0.downsample.0"), PrepackedConv)
        assert rel_err(model(x), want) < 1e-5


def test_a_grouped_convolution_kept_for_its_amx_form_is_packed_with_its_relu() -> None:
    torch.manual_seed(4)
    conv = nn.Conv2d(32, 32, 3, padding=1, groups=8).eval()
    model = nn.Sequential(nn.Sequential(NativeGroupedConv3x3(conv, relu=True)))
    x = nhwc(torch.randn(2, 32, 7, 7))
    with torch.no_grad():
        want = F.relu(conv(x))
        assert prepack_convs(model, x) == ["0.0"]
        fast = model[0][0]
        assert isinstance(fast, PrepackedConv) and fast.relu and fast.groups == 8
        assert rel_err(model(x), want) < 1e-5
