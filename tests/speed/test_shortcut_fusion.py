"""The block kernel with a projection shortcut accumulated onto its last 1×1 equals torch's
convolutions of the same bf16 values; its errors and `optimize`'s pass."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager

import pytest
import torch
import torch.nn.functional as F
from tensor_checks import rel_err
from torch import nn

import resnext
from resnext.speed import grouped_amx, grouped_quads
from resnext.speed.block_fusion import FusedBlock, fuse_blocks
from resnext.speed.fastpath import optimize
from resnext.speed.grouped_swap import FastGroupedConv3x3, swap_grouped_convs
from resnext.speed.pointwise_fusion import fuse_pointwise_convs
from resnext.speed.shortcut_fusion import ShortcutBlock, fuse_shortcuts, shortcut_fusable

REASON = grouped_amx.unavailable_reason()
needs_amx = pytest.mark.skipif(REASON is not None, reason=f"AMX kernel unavailable: {REASON}")
QUADS_REASON = REASON or grouped_quads.unavailable_reason()
needs_quads = pytest.mark.skipif(
    QUADS_REASON is not None, reason=f"AMX quads kernel unavailable: {QUADS_REASON}"
)


def _bf16_nhwc(t: torch.Tensor) -> torch.Tensor:
    return t.bfloat16().contiguous(memory_format=torch.channels_last)


class _Bottleneck:
    """Random bf16 weights of a whole bottleneck with a projection shortcut, its float
    reference, and the kernel on them."""

    def __init__(self, cin: int, c: int, cout: int, cpg: int, seed: int) -> None:
        gen = torch.Generator().manual_seed(seed)

        def weight(*shape: int) -> torch.Tensor:
            fan_in = shape[1] * shape[2] * shape[3]
            return (torch.randn(*shape, generator=gen) / fan_in**0.5).bfloat16()

        self.groups = c // cpg
        self.w1, self.b1 = weight(c, cin, 1, 1), torch.randn(c, generator=gen) * 0.1
        self.w2, self.b2 = weight(c, cpg, 3, 3), torch.randn(c, generator=gen) * 0.1
        self.w3, self.b3 = weight(cout, c, 1, 1), torch.randn(cout, generator=gen) * 0.1
        self.wsc, self.bsc = weight(cout, cin, 1, 1), torch.randn(cout, generator=gen) * 0.1

    def first(self, x: torch.Tensor) -> torch.Tensor:
        """The first 1×1 and its ReLU, rounded to bf16 where the model stores it."""
        return F.relu(F.conv2d(x.float(), self.w1.float(), self.b1)).bfloat16()

    def reference(self, x: torch.Tensor, stride: int) -> torch.Tensor:
        """float32 convolutions of exactly the bf16 values, the two intermediates rounded to bf16
        where the model stores them; the shortcut's output is not (it never leaves the kernel)."""
        s = self.first(x)
        g = F.conv2d(s.float(), self.w2.float(), self.b2, stride, 1, 1, self.groups)
        g = F.relu(g).bfloat16()
        shortcut = F.conv2d(x.float(), self.wsc.float(), self.bsc, stride)
        return F.relu(F.conv2d(g.float(), self.w3.float(), self.b3) + shortcut)

    def kernel(
        self, x: torch.Tensor, stride: int, whole: bool = True, **changes: object
    ) -> torch.Tensor:
        """The kernel on x: the whole block, or (not `whole`) from the first 1×1's output, which
        the caller computed, with x still the shortcut's input."""
        args: dict[str, object] = dict(
            x=x if whole else self.first(x).contiguous(memory_format=torch.channels_last),
            packed=grouped_amx.pack_weights(self.w2, self.groups),
            bias=self.b2,
            groups=self.groups,
            stride=stride,
            tail=grouped_amx.pack_pointwise(self.w3),
            tail_bias=self.b3 + self.bsc,
            shortcut=grouped_amx.pack_pointwise(self.wsc),
            shortcut_input=x,
            pointwise=grouped_amx.pack_pointwise(self.w1) if whole else None,
            pointwise_bias=self.b1 if whole else None,
        )
        args.update(changes)
        return grouped_amx.run_shortcut_block_kernel(**args)  # type: ignore[arg-type]


def _err(
    block: _Bottleneck,
    n: int,
    size: tuple[int, int],
    stride: int,
    whole: bool = True,
    quads: bool = False,
) -> float:
    cin = block.w1.shape[1]
    x = _bf16_nhwc(torch.randn(n, cin, *size, generator=torch.Generator().manual_seed(n + cin)))
    want = block.reference(x, stride)
    if quads:
        packed = grouped_quads.pack_weights(block.w2, block.groups)
        got = block.kernel(x, stride, whole, packed=packed, quads=True)
    else:
        got = block.kernel(x, stride, whole)
    assert got.shape == want.shape and got.dtype == torch.bfloat16
    assert got.is_contiguous(memory_format=torch.channels_last)
    return ((got.float() - want).abs().max() / want.abs().max()).item()


@needs_amx
@pytest.mark.parametrize("cpg", [4, 16, 32])
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("size", [(1, 1), (5, 3), (7, 7), (14, 17)])
@pytest.mark.parametrize("whole", [True, False], ids=["whole-block", "from-grouped"])
def test_kernel_equals_the_convolutions(
    cpg: int, stride: int, size: tuple[int, int], whole: bool
) -> None:
    c = 2 * max(cpg, 16)
    for cin, cout in ((32, 48), (96, 2 * c)):  # an odd count of 16-output tiles; a wide tail
        block = _Bottleneck(cin, c, cout, cpg, seed=cpg + stride + cout)
        # bands of rows (2 images), and the threads splitting the channels of one image whose
        # weights outweigh it
        for n in (2, 1):
            assert _err(block, n, size, stride, whole) < 2**-7, (cin, cout, n)


@needs_quads
@pytest.mark.parametrize("cpg", [4, 8])
@pytest.mark.parametrize("size", [(1, 1), (5, 3), (14, 17), (56, 56)])
@pytest.mark.parametrize("whole", [True, False], ids=["whole-block", "from-grouped"])
def test_the_quads_form_equals_the_convolutions(
    cpg: int, size: tuple[int, int], whole: bool
) -> None:
    """The grouped convolution as quads (stride 1): ResNeXt-50's stage-1 projection block (64 →
    128 in 32 groups of 4 → 256) at 56 × 56, and smaller ones with a last quad part empty."""
    c = 32 * cpg if size == (56, 56) else 8 * cpg
    for cin, cout in ((64, 256), (32, 48)) if size == (56, 56) else ((32, 48), (96, 2 * c)):
        block = _Bottleneck(cin, c, cout, cpg, seed=cpg + cout)
        for n in (1, 3):
            assert _err(block, n, size, 1, whole, quads=True) < 2**-7, (cin, cout, n)


@needs_quads
def test_a_shortcut_block_keeps_its_blocks_quads_form() -> None:
    torch.manual_seed(6)
    conv2 = nn.Conv2d(64, 64, 3, 1, 1, groups=16)
    head = FastGroupedConv3x3(conv2, relu=True, dtype=torch.bfloat16, variant="amx")
    tail, projection = nn.Conv2d(64, 128, 1), nn.Conv2d(32, 128, 1)
    x, b = _bf16_nhwc(torch.randn(2, 64, 7, 9)), _bf16_nhwc(torch.randn(2, 32, 7, 9))
    with torch.no_grad():
        g = F.relu(F.conv2d(x.float(), conv2.weight.bfloat16().float(), conv2.bias, 1, 1, 1, 16))
        want = F.relu(tail(g.bfloat16().float()) + projection(b.float()))
        for quads in (False, True):
            block = ShortcutBlock(FusedBlock(head, tail, quads=quads), projection)
            assert block.quads == quads
            assert rel_err(block(x, b), want) < 2**-7, quads


@needs_amx
@pytest.mark.parametrize("n", [1, 3])
def test_resnext50_projection_blocks(n: int) -> None:
    """Each stage's first block of ResNeXt-50: stride 1 at stage 1, 2 after; at batch 1 the
    channels split between threads at stages 3-4."""
    for cin, c, cout, h, stride in [
        (64, 128, 256, 56, 1),
        (256, 256, 512, 56, 2),
        (512, 512, 1024, 28, 2),
        (1024, 1024, 2048, 14, 2),
    ]:
        block = _Bottleneck(cin, c, cout, c // 32, seed=c)
        assert _err(block, n, (h, h), stride) < 2**-7, (cin, stride)


@needs_amx
@pytest.mark.parametrize("threads", [1, 3])
def test_any_thread_count(
    threads: int, on_threads: Callable[[int], AbstractContextManager[None]]
) -> None:
    block = _Bottleneck(512, 256, 512, 8, seed=threads)
    with on_threads(threads):
        for n, size in ((1, (5, 6)), (2, (13, 11))):
            for stride in (1, 2):
                assert _err(block, n, size, stride) < 2**-7, (n, stride)


@needs_amx
def test_bad_inputs_name_the_argument() -> None:
    block = _Bottleneck(64, 32, 64, 4, seed=1)
    x = _bf16_nhwc(torch.randn(1, 64, 5, 5))
    with pytest.raises(ValueError, match="shortcut: expected 64 outputs"):
        block.kernel(x, 1, shortcut=grouped_amx.pack_pointwise(torch.randn(48, 64, 1, 1)))
    with pytest.raises(ValueError, match="shortcut"):
        block.kernel(x, 1, shortcut=grouped_amx.pack_pointwise(torch.randn(64, 96, 1, 1)))
    with pytest.raises(ValueError, match="tail_bias"):
        block.kernel(x, 1, tail_bias=torch.zeros(63))
    with pytest.raises(ValueError, match="x: expected a 4-d bfloat16"):
        block.kernel(x.float(), 1)
    with pytest.raises(ValueError, match="shortcut_input: expected 1 images of 5×5"):
        block.kernel(x, 1, shortcut_input=x[:, :, :4])
    with pytest.raises(ValueError, match="shortcut_input: expected a 4-d bf16"):
        block.kernel(x, 1, shortcut_input=x.float())


class _Projected(nn.Module):
    """A bottleneck with a projection shortcut whose output is, optionally, also returned."""

    def __init__(self, leak: bool = False) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(64, 64, 1)
        self.conv2 = nn.Conv2d(64, 64, 3, 2, 1, groups=16)
        self.conv3 = nn.Conv2d(64, 128, 1)
        self.downsample = nn.Sequential(nn.Conv2d(64, 128, 1, 2))
        self.relu = nn.ReLU()
        self.leak = leak

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        shortcut = self.downsample(x)
        out = self.conv3(self.relu(self.conv2(self.relu(self.conv1(x)))))
        out = self.relu(out + shortcut)
        return (out, shortcut) if self.leak else out


def _fused_model(leak: bool, pointwise: str = "on") -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv2d(3, 64, 1), _Projected(leak)).eval().bfloat16()
    model = model.to(memory_format=torch.channels_last)
    x = _bf16_nhwc(torch.randn(2, 3, 9, 9))
    swap_grouped_convs(model, x, mode="on")
    fuse_pointwise_convs(model, x, mode=pointwise)
    fuse_blocks(model, x, mode="on")
    return model, x


@needs_amx
@pytest.mark.parametrize("pointwise", ["on", "off"], ids=["whole-block", "from-grouped"])
def test_the_pass_fuses_a_projection_used_only_by_its_block(pointwise: str) -> None:
    # from-grouped: oneDNN computes the first 1×1, and the projection reads the block's input,
    # not the kernel's
    model, x = _fused_model(leak=False, pointwise=pointwise)
    assert (model.get_submodule("1.conv2").pointwise is None) == (pointwise == "off")
    with torch.no_grad():
        want = model(x).float()
    choices = fuse_shortcuts(model, x, mode="on")
    assert [(c.name, c.chosen, c.variant) for c in choices] == [
        ("1.conv2", "fused", "block+shortcut")
    ]
    assert isinstance(model.get_submodule("1.conv2"), ShortcutBlock)
    with torch.no_grad():
        got = model(x).float()
    # the projection's output is no longer rounded to bf16 before the add: one rounding less
    assert ((got - want).abs().max() / want.abs().max()).item() < 2**-6
    assert fuse_shortcuts(model, x, mode="on") == []  # nothing left to fuse


@needs_amx
def test_a_projection_read_elsewhere_is_left_alone() -> None:
    model, x = _fused_model(leak=True)
    assert fuse_shortcuts(model, x, mode="on") == []
    assert isinstance(model.get_submodule("1.conv2"), FusedBlock)


@needs_amx
def test_only_a_whole_block_and_a_matching_1x1_are_fusable() -> None:
    model, _ = _fused_model(leak=False)
    block = model.get_submodule("1.conv2")  # 64 → 128 channels at stride 2, its 1×1 fused in
    assert shortcut_fusable(block, nn.Conv2d(64, 128, 1, 2))
    assert not shortcut_fusable(nn.Identity(), nn.Conv2d(64, 128, 1, 2))
    assert not shortcut_fusable(block, nn.Conv2d(64, 128, 3, 2, 1))  # not a 1×1
    assert not shortcut_fusable(block, nn.Conv2d(64, 128, 1, 1))  # another stride
    assert not shortcut_fusable(block, nn.Conv2d(64, 256, 1, 2))  # another width
    assert not shortcut_fusable(block, nn.Conv2d(64, 128, 1, 2, bias=False))  # BN not folded
    assert not shortcut_fusable(block, nn.Conv2d(48, 128, 1, 2))  # inputs not a multiple of 32
    plain = nn.Sequential(nn.Conv2d(64, 128, 1, 2))
    assert fuse_shortcuts(plain, torch.randn(1, 64, 4, 4).bfloat16()) == []
    assert fuse_shortcuts(plain, torch.randn(1, 64, 4, 4), mode="on") == []  # float32


@needs_amx
def test_optimize_fuses_each_projection_and_computes_the_same_function(
    randomize_bn: Callable[[nn.Module], None],
) -> None:
    torch.manual_seed(4)
    model = resnext.create_model("resnext29_4x16d").eval()
    randomize_bn(model)
    x = torch.randn(2, 3, 32, 32)
    fast = optimize(model, "bf16", backend="none", example_input=x, fuse_block="on")
    shortcuts = [c for c in fast.block_choices if c.variant == "block+shortcut"]
    projections = [n for n, _ in model.named_modules() if n.endswith("downsample.0")]
    assert len(shortcuts) == len(projections) == 3
    assert sum(isinstance(m, ShortcutBlock) for m in fast.modules()) == 3
    fresh = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        want, got = model(fresh), fast(fresh)
    assert ((got - want).abs().max() / want.abs().max()).item() < 0.05
