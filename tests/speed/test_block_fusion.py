"""The AMX block kernel (grouped 3×3 → 1×1 → + residual → ReLU, optionally with the first 1×1 in
front) equals torch's convolutions of the same bf16 values; its errors and `optimize`'s pass."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager

import pytest
import torch
import torch.nn.functional as F
from tensor_checks import rel_err
from torch import nn

import resnext
from resnext.errors import ConfigError
from resnext.speed import block_fusion, grouped_amx, grouped_quads
from resnext.speed.block_fusion import FusedBlock, block_fusable, fuse_blocks
from resnext.speed.fastpath import optimize
from resnext.speed.grouped_swap import FastGroupedConv3x3
from resnext.speed.pointwise_fusion import FusedPointwiseGrouped
from resnext.speed.shortcut_fusion import ShortcutBlock

REASON = grouped_amx.unavailable_reason()
needs_amx = pytest.mark.skipif(REASON is not None, reason=f"AMX kernel unavailable: {REASON}")


def _bf16_nhwc(t: torch.Tensor) -> torch.Tensor:
    return t.bfloat16().contiguous(memory_format=torch.channels_last)


class _Block:
    """Random bf16 weights of one bottleneck (the first 1×1 optional) and its float reference."""

    def __init__(self, cin: int, c: int, cout: int, cpg: int, first: bool, seed: int) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.groups = c // cpg
        self.w1 = (
            (torch.randn(c, cin, 1, 1, generator=gen) / cin**0.5).bfloat16() if first else None
        )
        self.b1 = torch.randn(c, generator=gen) * 0.1 if first else None
        self.w2 = (torch.randn(c, cpg, 3, 3, generator=gen) / (9 * cpg) ** 0.5).bfloat16()
        self.b2 = torch.randn(c, generator=gen) * 0.1
        self.w3 = (torch.randn(cout, c, 1, 1, generator=gen) / c**0.5).bfloat16()
        self.b3 = torch.randn(cout, generator=gen) * 0.1

    def reference(self, x: torch.Tensor, residual: torch.Tensor, stride: int) -> torch.Tensor:
        """float32 convolutions of exactly the bf16 values, each intermediate rounded to bf16
        where the unfused bf16 model stores it."""
        s = x
        if self.w1 is not None:
            s = F.relu(F.conv2d(x.float(), self.w1.float(), self.b1)).bfloat16()
        g = F.conv2d(s.float(), self.w2.float(), self.b2, stride, 1, 1, self.groups)
        g = F.relu(g).bfloat16()
        return F.relu(F.conv2d(g.float(), self.w3.float(), self.b3) + residual.float())

    def kernel(
        self,
        x: torch.Tensor,
        residual: torch.Tensor,
        stride: int,
        in_place: bool = False,
        quads: bool = False,
    ) -> torch.Tensor:
        first = self.w1 is not None
        pack = grouped_quads.pack_weights if quads else grouped_amx.pack_weights
        return grouped_amx.run_block_kernel(
            x,
            pack(self.w2, self.groups),
            self.b2,
            self.groups,
            stride,
            grouped_amx.pack_pointwise(self.w3),
            self.b3,
            residual,
            grouped_amx.pack_pointwise(self.w1) if first else None,
            self.b1 if first else None,
            quads=quads,
            in_place=in_place,
        )


def _check(
    block: _Block,
    n: int,
    cin: int,
    cout: int,
    size: tuple[int, int],
    stride: int,
    in_place: bool = False,
    quads: bool = False,
):
    gen = torch.Generator().manual_seed(n + cin + cout + stride)
    x = _bf16_nhwc(torch.randn(n, cin, *size, generator=gen))
    out_size = [(d - 1) // stride + 1 for d in size]
    if cin == cout and stride == 1:
        residual = x  # an identity shortcut: the same tensor as the input
    else:
        residual = _bf16_nhwc(torch.randn(n, cout, *out_size, generator=gen))
    want = block.reference(x, residual, stride)
    got = block.kernel(x, residual, stride, in_place, quads)
    if in_place:
        assert got.data_ptr() == residual.data_ptr()
    assert got.shape == want.shape and got.dtype == torch.bfloat16
    assert got.is_contiguous(memory_format=torch.channels_last)
    return rel_err(got, want)


@needs_amx
@pytest.mark.parametrize("cpg", [1, 4, 8, 16, 32, 64])
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("size", [(1, 1), (5, 3), (7, 7), (14, 17)])
@pytest.mark.parametrize("first", [False, True], ids=["from-grouped", "whole-block"])
def test_block_kernel_equals_the_convolutions(
    cpg: int, stride: int, size: tuple[int, int], first: bool
) -> None:
    c = 2 * max(cpg, 16)
    for cin, cout in ((c, 48), (96, 2 * c)):  # an odd count of 16-output tiles; a wide tail
        if not first:
            cin = c
        block = _Block(cin, c, cout, cpg, first, seed=cpg + stride + cout)
        assert _check(block, 2, cin, cout, size, stride) < 2**-7, (cin, cout)


@needs_amx
@pytest.mark.parametrize("n", [1, 16])
@pytest.mark.parametrize("in_place", [False, True])
def test_resnext50_block_shapes(n: int, in_place: bool) -> None:
    """Each stage's first block (stride 2 from stage 2, a projection shortcut) and a later one
    (identity shortcut), whole-block: at batch 16 one band per image except where an image's
    grids pass 1 MB; at batch 1 a band per thread at least (stages 1-2) or the channels split
    between the threads (stages 3-4, where the weights outweigh the image); in place, the
    identity blocks overwrite their own input."""
    shapes = [
        (256, 128, 256, 56, 1),
        (256, 256, 512, 56, 2),
        (512, 256, 512, 28, 1),
        (1024, 512, 1024, 14, 1),
        (1024, 1024, 2048, 14, 2),
        (2048, 1024, 2048, 7, 1),
    ]
    for cin, c, cout, h, stride in shapes:
        block = _Block(cin, c, cout, c // 32, True, seed=c + h)
        err = _check(block, n, cin, cout, (h, h), stride, in_place)
        assert err < 2**-7, (cin, c, h, stride)


QUADS_REASON = REASON or grouped_quads.unavailable_reason()
needs_quads = pytest.mark.skipif(
    QUADS_REASON is not None, reason=f"AMX quads kernel unavailable: {QUADS_REASON}"
)


@needs_quads
@pytest.mark.parametrize("cpg", [4, 8])
@pytest.mark.parametrize("size", [(1, 1), (5, 3), (7, 7), (14, 17)])
@pytest.mark.parametrize("first", [False, True], ids=["from-grouped", "whole-block"])
@pytest.mark.parametrize("in_place", [False, True])
def test_block_kernel_in_the_quads_form_equals_the_convolutions(
    cpg: int, size: tuple[int, int], first: bool, in_place: bool
) -> None:
    """The grouped convolution as quads (4 or 8 channels per group, stride 1) inside the block:
    widths that leave a last quad part empty, an identity residual overwritten in place, one
    image (a thread idle) and three (uneven between the threads)."""
    c = 8 * cpg  # two sets of 4 groups
    for cin, cout in ((c, c), (96, 48)):  # an identity shortcut; an odd count of output tiles
        if not first:
            cin = c
        block = _Block(cin, c, cout, cpg, first, seed=cpg + cout)
        for n in (1, 3):
            err = _check(block, n, cin, cout, size, 1, in_place, quads=True)
            assert err < 2**-7, (cin, cout, n)


@needs_quads
@pytest.mark.parametrize("n", [1, 3])
def test_quads_form_at_resnext50_shapes_and_several_strips(n: int) -> None:
    """Stages 1 (4 channels per group) and 2 (8) of ResNeXt-50, whole block in place over its
    input; and images tall enough that their output rows go through the last 1×1 in 2-3 strips
    (z holds at most ~128 KB of rows)."""
    for cin, c, cout, size in [
        (256, 128, 256, (56, 56)),
        (512, 256, 512, (28, 28)),
        (64, 128, 64, (36, 30)),
        (64, 256, 32, (20, 21)),
    ]:
        block = _Block(cin, c, cout, c // 32, True, seed=c + size[0])
        err = _check(block, n, cin, cout, size, 1, in_place=cin == cout, quads=True)
        assert err < 2**-7, (cin, c, size)


def test_unpack_weights_inverts_pack_weights() -> None:
    gen = torch.Generator().manual_seed(3)
    for channels, groups in ((64, 64), (64, 16), (128, 32), (256, 32), (64, 2), (256, 4)):
        weight = torch.randn(channels, channels // groups, 3, 3, generator=gen).bfloat16()
        packed = grouped_amx.pack_weights(weight, groups)
        assert torch.equal(grouped_amx.unpack_weights(packed, channels, groups), weight)
    with pytest.raises(ValueError, match="packed"):
        grouped_amx.unpack_weights(packed[:-1].contiguous(), 256, 4)


@needs_quads
def test_the_quads_form_refuses_what_it_does_not_take() -> None:
    block = _Block(64, 64, 64, 4, True, seed=2)
    x = _bf16_nhwc(torch.randn(1, 64, 6, 6))
    tail = grouped_amx.pack_pointwise(block.w3)

    def run(packed: torch.Tensor, groups: int) -> torch.Tensor:
        return grouped_amx.run_block_kernel(
            x, packed, block.b2, groups, 1, tail, block.b3, x, quads=True
        )

    with pytest.raises(ValueError, match="packed"):  # the block-diagonal pack is half as long
        run(grouped_amx.pack_weights(block.w2, block.groups), block.groups)
    with pytest.raises(ValueError, match=r"x: 64 channels in 4 groups .* quads form takes"):
        run(grouped_quads.pack_weights(block.w2, block.groups), 4)  # 16 channels per group
    with pytest.raises(ValueError, match=r"pointwise: .* stride 2 .* quads form takes"):
        block.kernel(x, _bf16_nhwc(torch.randn(1, 64, 3, 3)), 2, quads=True)
    head = FastGroupedConv3x3(nn.Conv2d(64, 64, 3, 2, 1, groups=16), True, torch.bfloat16, "amx")
    with pytest.raises(ValueError, match="quads"):
        FusedBlock(head, nn.Conv2d(64, 64, 1), quads=True)


@needs_quads
@pytest.mark.parametrize("quads_on", [True, False], ids=["quads-here", "no-quads"])
def test_the_pass_times_the_quads_form_and_keeps_it_where_fastest(
    quads_on: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The pass times the quads form beside the block-diagonal one where it runs (each writing
    a new output, and in place where the residual is dead), and a block taken in that form
    computes the model's function. The timer is replaced by one that makes the last way timed
    the fastest."""
    if not quads_on:
        monkeypatch.setattr(grouped_quads, "unavailable_reason", lambda *_: "off for this test")
    timed: list[int] = []

    def last_fastest(runs: list[Callable[[torch.Tensor], object]], x: torch.Tensor, repeats: int):
        timed.append(len(runs))
        for run in runs:
            run(x)  # each way runs (and must not fail)
        return [float(len(runs) - i) for i in range(len(runs))]

    monkeypatch.setattr(block_fusion, "time_each_ms", last_fastest)
    torch.manual_seed(4)
    model = nn.Sequential(*(_Residual(_amx(64, 16)) for _ in range(3))).bfloat16()
    x = _bf16_nhwc(torch.randn(2, 64, 9, 10))
    with torch.no_grad():
        want = model(x)
    choices = fuse_blocks(model, x)
    # unfused, then each form's ways: the first block's residual is the model's input (a new
    # output only), the others' the block before's output (also in place)
    forms = 2 if quads_on else 1
    assert timed == [1 + forms, 1 + 2 * forms, 1 + 2 * forms]
    quads = "-quads" if quads_on else ""
    assert [(c.chosen, c.variant) for c in choices] == [
        ("fused", "block" + quads),
        ("fused", "block-in-place" + quads),
        ("fused", "block-in-place" + quads),
    ]
    assert [block.head.quads for block in model] == [quads_on] * 3
    with torch.no_grad():
        assert rel_err(model(x), want.float()) < 2**-7


@needs_quads
def test_the_quads_form_never_decides_whether_a_block_is_fused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Separate faster than the block-diagonal form but slower than the quads form: the block is
    left separate, and its choice reports the block-diagonal time that decided."""

    def quads_fastest(runs: list[Callable[[torch.Tensor], object]], x: torch.Tensor, repeats: int):
        # unfused 2 ms; block-diagonal (new output, in place) 3 ms; quads 1 ms
        return [2.0, 3.0, 3.0, 1.0, 1.0][: len(runs)]

    monkeypatch.setattr(block_fusion, "time_each_ms", quads_fastest)
    model = nn.Sequential(*(_Residual(_amx(64, 16)) for _ in range(2))).bfloat16()
    x = _bf16_nhwc(torch.randn(1, 64, 6, 6))
    choices = fuse_blocks(model, x)
    assert [(c.chosen, c.variant, c.kernel_ms) for c in choices] == [
        ("separate", "block", 3.0),
        ("separate", "block", 3.0),
    ]
    assert all(isinstance(block.head, FastGroupedConv3x3) for block in model)


@needs_quads
def test_on_builds_and_times_only_the_block_diagonal_form(monkeypatch: pytest.MonkeyPatch) -> None:
    """'on' runs every block in the block-diagonal form, so it neither repacks a block's weight
    for the quads form nor times that form, even where it would be the fastest."""
    timed: list[int] = []
    built: list[bool] = []
    real_init = FusedBlock.__init__

    def quads_fastest(runs: list[Callable[[torch.Tensor], object]], x: torch.Tensor, repeats: int):
        timed.append(len(runs))
        return [2.0, 3.0, 3.0, 1.0, 1.0][: len(runs)]

    def recording_init(self: FusedBlock, head: nn.Module, tail: nn.Conv2d, *args, **kw) -> None:
        real_init(self, head, tail, *args, **kw)
        built.append(self.quads)

    monkeypatch.setattr(block_fusion, "time_each_ms", quads_fastest)
    monkeypatch.setattr(FusedBlock, "__init__", recording_init)
    model = nn.Sequential(*(_Residual(_amx(64, 16)) for _ in range(2))).bfloat16()
    x = _bf16_nhwc(torch.randn(1, 64, 6, 6))
    choices = fuse_blocks(model, x, mode="on")
    # unfused and the block-diagonal ways only: a new output, then also in place
    assert timed == [2, 3] and built == [False, False]
    assert [(c.chosen, c.variant) for c in choices] == [
        ("fused", "block"),
        ("fused", "block-in-place"),
    ]


@needs_amx
@pytest.mark.parametrize("threads", [3, 5])
@pytest.mark.parametrize("stride", [1, 2])
def test_bands_split_an_image_at_any_row(
    threads: int, stride: int, on_threads: Callable[[int], AbstractContextManager[None]]
) -> None:
    """One image over more threads than rows divide evenly: bands of several output rows and a
    shorter last one, each recomputing the 1×1 on its halo rows."""
    block = _Block(64, 64, 64, 4, True, seed=threads)
    with on_threads(threads):
        assert _check(block, 1, 64, 64, (13, 11), stride) < 2**-7


@needs_amx
@pytest.mark.parametrize("threads", [2, 3])
@pytest.mark.parametrize("first", [False, True], ids=["from-grouped", "whole-block"])
@pytest.mark.parametrize("in_place", [False, True])
def test_channels_split_between_threads_for_one_image(
    threads: int,
    first: bool,
    in_place: bool,
    on_threads: Callable[[int], AbstractContextManager[None]],
) -> None:
    """One image whose weights outweigh it: units of 32 channels, then pairs of output tiles,
    spread over the threads (3: uneven shares); cin = cout, so in place it overwrites x."""
    cin, c, cout = 512, 256, 512
    block = _Block(cin if first else c, c, cout, 8, first, seed=threads + first)
    with on_threads(threads):
        for stride in (1, 2):
            err = _check(block, 1, cin if first else c, cout, (5, 6), stride, in_place)
            assert err < 2**-7, stride


def test_bad_inputs_name_the_argument() -> None:
    block = _Block(64, 32, 64, 4, True, seed=1)
    x = _bf16_nhwc(torch.randn(1, 64, 5, 5))
    packed = grouped_amx.pack_weights(block.w2, 8)
    tail = grouped_amx.pack_pointwise(block.w3)
    w1 = grouped_amx.pack_pointwise(block.w1)

    def run(**changes):
        args = dict(
            x=x,
            packed=packed,
            bias=block.b2,
            groups=8,
            stride=1,
            tail=tail,
            tail_bias=block.b3,
            residual=x,
            pointwise=w1,
            pointwise_bias=block.b1,
        )
        args.update(changes)
        return grouped_amx.run_block_kernel(**args)

    with pytest.raises(ValueError, match="residual: expected a bf16 tensor of the output's shape"):
        run(residual=x[:, :, :4])
    with pytest.raises(ValueError, match="residual"):
        run(residual=x.float())
    with pytest.raises(ValueError, match="tail: expected"):
        run(tail=grouped_amx.pack_pointwise(torch.randn(64, 64, 1, 1)))  # 64 inputs, not 32
    with pytest.raises(ValueError, match="tail_bias"):
        run(tail_bias=torch.zeros(63))
    with pytest.raises(ValueError, match="bias"):
        run(bias=torch.zeros(31))
    with pytest.raises(ValueError, match="pointwise_bias"):
        run(pointwise_bias=None)
    with pytest.raises(ValueError, match="pointwise_bias: given without"):
        run(pointwise=None, x=_bf16_nhwc(torch.randn(1, 32, 5, 5)))
    with pytest.raises(ValueError, match="x: expected a 4-d bfloat16"):
        run(x=x.float())


def _amx(channels: int, groups: int, relu: bool = True) -> FastGroupedConv3x3:
    conv = nn.Conv2d(channels, channels, 3, 1, 1, groups=groups)
    return FastGroupedConv3x3(conv, dtype=torch.bfloat16, variant="amx", relu=relu)


@needs_amx
def test_only_a_bias_carrying_1x1_after_an_amx_head_with_its_relu_is_fusable() -> None:
    head = _amx(64, 16)
    assert block_fusable(head, nn.Conv2d(64, 256, 1))
    assert block_fusable(FusedPointwiseGrouped(nn.Conv2d(256, 64, 1), head), nn.Conv2d(64, 256, 1))
    assert not block_fusable(head, nn.Conv2d(64, 256, 1, bias=False))  # BN not folded in
    assert not block_fusable(head, nn.Conv2d(64, 256, 1, stride=2))
    assert not block_fusable(head, nn.Conv2d(64, 256, 3, padding=1))
    assert not block_fusable(head, nn.Conv2d(64, 40, 1))  # not a multiple of 16 outputs
    assert not block_fusable(_amx(64, 16, relu=False), nn.Conv2d(64, 256, 1))
    assert not block_fusable(_amx(48, 12), nn.Conv2d(48, 64, 1))  # 48: not a multiple of 32
    with pytest.raises(ValueError, match="tail"):
        FusedBlock(head, nn.Conv2d(64, 40, 1))


class _Residual(nn.Module):
    """A bottleneck's rest as plain modules: head → 1×1 → + x → ReLU (or without the add)."""

    def __init__(self, head: nn.Module, add: bool = True) -> None:
        super().__init__()
        self.head, self.conv3, self.relu, self.add = head, nn.Conv2d(64, 64, 1), nn.ReLU(), add

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv3(self.head(x))
        return self.relu(out + x if self.add else out)


@needs_amx
def test_only_a_chain_ending_in_an_add_and_relu_inside_a_submodule_is_fused() -> None:
    x = _bf16_nhwc(torch.randn(1, 64, 6, 6))
    model = nn.Sequential(_Residual(_amx(64, 16)), _Residual(_amx(64, 16), add=False)).bfloat16()
    with torch.no_grad():
        want = model(x)
    choices = fuse_blocks(model, x, mode="on")
    assert [c.name for c in choices] == ["0.head"]
    assert choices[0].variant == "block"  # its residual is the model's input: not overwritten
    assert isinstance(model[0].get_submodule("head"), FusedBlock)
    assert isinstance(model[1].head, FastGroupedConv3x3)  # no residual add: left as it is
    with torch.no_grad():
        assert rel_err(model(x), want.float()) < 2**-7
    root = _Residual(_amx(64, 16)).bfloat16()  # the chain's parent is the root: never rewritten
    assert fuse_blocks(root, x, mode="on") == []


class _ReadsInputAgain(_Residual):
    """A residual chain whose input is read again after the add."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.conv3(self.head(x)) + x) * x


class _KeepsInput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.block = _ReadsInputAgain(_amx(64, 16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x * 1.0)  # the block's input is not the model's own


@needs_amx
def test_a_residual_read_after_the_block_is_not_overwritten() -> None:
    x = _bf16_nhwc(torch.randn(1, 64, 6, 6))
    model = _KeepsInput().bfloat16()
    with torch.no_grad():
        want = model(x).float()
    choices = fuse_blocks(model, x, mode="on")
    assert [(c.name, c.variant) for c in choices] == [("block.head", "block")]
    with torch.no_grad():
        assert rel_err(model(x), want) < 2**-6


@needs_amx
@pytest.mark.parametrize("name,size", [("resnext50_32x4d", 64), ("resnext29_4x16d", 32)])
def test_optimize_fuses_every_block_and_computes_the_same_function(
    name: str, size: int, randomize_bn: Callable[[nn.Module], None]
) -> None:
    torch.manual_seed(8)
    model = resnext.create_model(name).eval()
    randomize_bn(model)
    x = torch.randn(2, 3, size, size)
    plain = optimize(model, "bf16", backend="none", example_input=x, fuse_block="off")
    fused = optimize(model, "bf16", backend="none", example_input=x, fuse_block="on")
    # every grouped layer of these models has an AMX form (chosen, kept beside the winning
    # variant, or beside oneDNN's conv where that won alone), so every block is a candidate
    amx_layers = fused.grouped_choices
    assert plain.block_choices == []
    blocks = [c for c in fused.block_choices if c.variant != "block+shortcut"]
    shortcuts = [c for c in fused.block_choices if c.variant == "block+shortcut"]
    assert len(blocks) == len(amx_layers) > 0
    # every block's residual is dead after it (the model traces), so each writes over it
    assert all(c.chosen == "fused" and c.variant == "block-in-place" for c in blocks)
    # then each stage's first block takes its projection shortcut in too (all have one here)
    projections = [n for n, m in model.named_modules() if n.endswith("downsample.0")]
    assert len(shortcuts) == len(projections) > 0 and all(c.chosen == "fused" for c in shortcuts)
    assert sum(isinstance(m, ShortcutBlock) for m in fused.modules()) == len(projections)
    assert sum(isinstance(m, FusedBlock) for m in fused.modules()) == len(amx_layers) - len(
        projections
    )
    fresh = torch.randn(4, 3, size, size)
    mine = _bf16_nhwc(fresh)  # already the fast path's dtype and layout: passed on as it is
    before = mine.clone()
    with torch.no_grad():
        want, unfused, got = model(fresh), plain(fresh), fused(fresh)
        fused(mine)
    assert torch.equal(mine, before)  # the caller's tensor is never written over
    # the same bf16 roundings less one per block: as close to the unfused path as that is to fp32
    assert rel_err(got, unfused) < 0.02
    assert rel_err(got, want) < 0.05
    assert (got.argmax(1) == want.argmax(1)).float().mean() >= 0.75


@needs_amx
@pytest.mark.parametrize("backend", ["inductor", "jit"])
def test_fused_blocks_compile(backend: str, randomize_bn: Callable[[nn.Module], None]) -> None:
    torch.manual_seed(9)
    model = resnext.create_model("resnext29_4x16d").eval()
    randomize_bn(model)
    x = torch.randn(2, 3, 32, 32)
    fast = optimize(model, "bf16", backend=backend, example_input=x, fuse_block="on")
    assert fast.block_choices and all(c.chosen == "fused" for c in fast.block_choices)
    # optimize_for_inference (jit) would lose the in-place write: jit blocks write a new output
    variant = "block" if backend == "jit" else "block-in-place"
    assert {c.variant for c in fast.block_choices} == {variant, "block+shortcut"}
    fresh = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert rel_err(fast(fresh), model(fresh)) < 0.05


def test_block_fusion_modes() -> None:
    model = nn.Sequential(nn.Conv2d(64, 64, 1), nn.ReLU())
    x = torch.randn(1, 64, 4, 4).bfloat16()
    assert fuse_blocks(model, x, mode="off") == []
    assert fuse_blocks(model, x, mode="auto") == []  # no AMX grouped head to fuse
    assert fuse_blocks(model, x.float(), mode="on") == []  # fp32: the kernel is bf16 only
    with pytest.raises(ConfigError, match="fuse_block"):
        fuse_blocks(model, x, mode="always")
    with pytest.raises(ConfigError, match="fuse_block"):
        optimize(model, "bf16", backend="none", fuse_block="yes")


@needs_amx
@pytest.mark.parametrize("kernel", ["grouped", "pointwise", "block", "block-quads"])
def test_scratch_kept_across_calls_leaves_no_trace(kernel: str) -> None:
    """The kernels keep their per-thread buffers between calls and zero only what a call reads
    beyond what it fills: a call after one of another shape on NaN inputs is unaffected."""
    block = _Block(64, 64, 64, 4, True, seed=5)
    packed = grouped_amx.pack_weights(block.w2, block.groups)

    def run(x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        if kernel == "grouped":
            return grouped_amx.run_kernel(x, packed, block.b2, block.groups, 1, relu=True)
        if kernel == "pointwise":
            w1 = grouped_amx.pack_pointwise(block.w1)
            return grouped_amx.run_pointwise_kernel(
                x, w1, block.b1, packed, block.b2, block.groups, 1, relu=True
            )
        return block.kernel(x, residual, 1, quads=kernel == "block-quads")

    def want(x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        s = x.float()
        if kernel != "grouped":
            s = F.relu(F.conv2d(s, block.w1.float(), block.b1)).bfloat16().float()
        g = F.relu(F.conv2d(s, block.w2.float(), block.b2, 1, 1, 1, block.groups))
        if not kernel.startswith("block"):
            return g
        return F.relu(F.conv2d(g.bfloat16().float(), block.w3.float(), block.b3) + residual.float())

    poison = _bf16_nhwc(torch.full((2, 64, 20, 21), float("nan")))
    run(poison, poison)
    x = _bf16_nhwc(torch.randn(2, 64, 7, 5))
    got = run(x, x)
    assert torch.isfinite(got.float()).all()
    assert rel_err(got, want(x, x)) < 2**-7


@needs_amx
def test_the_operators_refuse_an_input_that_needs_a_gradient() -> None:
    """Inference kernels without a gradient: an error, not a silently missing gradient."""
    block = _Block(64, 64, 64, 4, False, seed=2)
    x = _bf16_nhwc(torch.randn(1, 64, 5, 5)).requires_grad_()
    packed = grouped_amx.pack_weights(block.w2, block.groups)
    tail = grouped_amx.pack_pointwise(block.w3)
    with pytest.raises(ValueError, match="requires one"):
        torch.ops.resnext.grouped_conv3x3_amx(x, packed, block.b2, block.groups, 1, True)
    with pytest.raises(ValueError, match="requires one"):
        torch.ops.resnext.block_amx(
            x.detach(), packed, block.b2, block.groups, 1, tail, block.b3, x
        )
    with torch.no_grad():  # fine without grad mode
        got = torch.ops.resnext.block_amx(x, packed, block.b2, block.groups, 1, tail, block.b3, x)
    assert rel_err(got, block.reference(x.detach(), x.detach(), 1)) < 2**-7


class _TwoCalls(nn.Module):
    """One block called twice: its first input is used only there, its second also after."""

    def __init__(self) -> None:
        super().__init__()
        self.block = _Residual(_amx(64, 16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x * 1.0
        z = self.block(y)
        w = z * 1.0
        return self.block(w) + w


@needs_amx
def test_a_block_called_twice_overwrites_its_input_only_if_every_call_allows_it() -> None:
    x = _bf16_nhwc(torch.randn(1, 64, 6, 6))
    model = _TwoCalls().bfloat16()
    with torch.no_grad():
        want = model(x).float()
    # the second call's input is read again after it, so neither call may write over its input
    choices = fuse_blocks(model, x, mode="on")
    assert all(c.variant != "block-in-place" for c in choices)
    with torch.no_grad():
        assert rel_err(model(x), want) < 2**-6
