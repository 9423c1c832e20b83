"""The bf16 1×1-convolution product (`kernels/pointwise_gemm.c`): forward and input gradient equal
torch's in float64 on the same rounded operands, the packs equal torch's cast and permutation,
and bad input is refused with a message naming it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from tensor_checks import rel_err

from resnext.speed import pointwise_gemm

pytestmark = pytest.mark.skipif(
    pointwise_gemm.unavailable_reason() is not None,
    reason=f"pointwise GEMM kernel unavailable: {pointwise_gemm.unavailable_reason()}",
)

# (batch, in channels, out channels, height, width): pixel counts below, at and above the
# kernel's 6-row tile and not multiples of it (a thread's last tile is partial), one pixel,
# several 64-column strips, a reduction of 64 to 1,024 channels.
SHAPES = [
    (1, 64, 64, 1, 1),
    (1, 128, 64, 2, 3),
    (2, 64, 192, 5, 7),
    (3, 256, 128, 7, 7),
    (4, 1024, 256, 3, 5),
    (16, 512, 1024, 7, 7),
]
# bf16 output: one rounding of a float32 sum, relative to the output's largest magnitude.
TOLERANCE = 2**-8


def _cl(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.bfloat16).contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("weight_dtype", [torch.float32, torch.bfloat16])
def test_forward_and_input_gradient_match_torch_in_float64(shape, weight_dtype) -> None:
    n, cin, cout, h, w = shape
    g = torch.Generator().manual_seed(sum(shape))
    x = _cl(torch.randn(n, cin, h, w, generator=g))
    weight = torch.randn(cout, cin, 1, 1, generator=g).to(weight_dtype)
    grad = _cl(torch.randn(n, cout, h, w, generator=g))
    rounded = weight.to(torch.bfloat16).double()  # what the kernel multiplies by

    y = pointwise_gemm.matmul_channels(x, pointwise_gemm.pack_forward(weight))
    assert y.shape == (n, cout, h, w) and y.dtype == torch.bfloat16
    assert y.is_contiguous(memory_format=torch.channels_last)
    assert rel_err(y, F.conv2d(x.double(), rounded)) < TOLERANCE

    dx = pointwise_gemm.matmul_channels(grad, pointwise_gemm.pack_input_grad(weight))
    want = torch.nn.grad.conv2d_input(x.shape, rounded, grad.double())
    assert dx.shape == x.shape and rel_err(dx, want) < TOLERANCE


def test_every_output_element_is_written_and_no_row_is_mixed_up() -> None:
    # One-hot rows pick single weight columns: any misplaced row, column or pair shows exactly.
    cin, cout, rows = 64, 128, 13
    weight = torch.randn(cout, cin, 1, 1, generator=torch.Generator().manual_seed(3))
    picks = torch.arange(rows) * 5 % cin
    x = torch.zeros(1, cin, 1, rows)
    x[0, picks, 0, torch.arange(rows)] = 1.0
    y = pointwise_gemm.matmul_channels(_cl(x), pointwise_gemm.pack_forward(weight))
    want = weight.to(torch.bfloat16)[:, picks, 0, 0]  # (cout, rows)
    assert torch.equal(y[0, :, 0, :], want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packs_are_torch_cast_and_permutation(dtype) -> None:
    cout, cin = 192, 128
    weight = torch.randn(cout, cin, 1, 1, generator=torch.Generator().manual_seed(5)).to(dtype)
    as_bf16 = weight.to(torch.bfloat16).reshape(cout, cin)
    # forward: word (j, n) = (w[n][2j], w[n][2j+1]); input gradient: (w[2j][n], w[2j+1][n])
    assert torch.equal(
        pointwise_gemm.pack_forward(weight), as_bf16.reshape(cout, cin // 2, 2).transpose(0, 1)
    )
    assert torch.equal(
        pointwise_gemm.pack_input_grad(weight), as_bf16.reshape(cout // 2, 2, cin).transpose(1, 2)
    )


def test_takes_only_multiples_of_64_channels() -> None:
    assert pointwise_gemm.takes(64, 2048)
    assert not pointwise_gemm.takes(32, 64)
    assert not pointwise_gemm.takes(64, 96)


@pytest.mark.parametrize(
    ("weight", "match"),
    [
        (torch.zeros(64, 64, 1, 1, dtype=torch.float16), "float32 or bfloat16"),
        (torch.zeros(64, 64, 3, 3), r"\(C_out, C_in, 1, 1\)"),
        (torch.zeros(96, 64, 1, 1), "multiples of 64"),
    ],
)
def test_bad_weights_are_refused_by_name(weight, match) -> None:
    with pytest.raises(ValueError, match=f"weight: expected.*{match}|{match}"):
        pointwise_gemm.pack_forward(weight)


def test_bad_inputs_are_refused_by_name() -> None:
    packed = pointwise_gemm.pack_forward(torch.zeros(64, 128, 1, 1))
    with pytest.raises(ValueError, match="x: expected a 4-D bfloat16"):
        pointwise_gemm.matmul_channels(torch.zeros(1, 128, 2, 2), packed)
    with pytest.raises(ValueError, match=r"packed: expected \(32, C, 2\)"):
        pointwise_gemm.matmul_channels(_cl(torch.zeros(1, 64, 2, 2)), packed)


# (batch, in channels, out channels, height, width): an odd pixel count (a zero-padded last
# pair), fewer pixels than threads, a partial 6-row tile of output channels; with few pixels
# (at most 1,024) the threads split the outputs, over blocks of at most 256 pixels (also an odd
# count); with more, the pixels, likewise in blocks, an odd count at the end; no pixels.
WGRAD_SHAPES = [
    (1, 64, 6, 1, 1),
    (1, 64, 7, 1, 3),
    (2, 128, 64, 5, 7),
    (3, 64, 130, 7, 7),
    (2, 192, 96, 17, 19),
    (1, 64, 64, 27, 23),
    (1, 128, 70, 37, 31),
    (0, 64, 64, 3, 3),
]


@pytest.mark.parametrize("shape", WGRAD_SHAPES)
def test_weight_gradient_matches_float64(shape) -> None:
    n, cin, cout, h, w = shape
    g = torch.Generator().manual_seed(sum(shape) + 1)
    x = _cl(torch.randn(n, cin, h, w, generator=g))
    grad = _cl(torch.randn(n, cout, h, w, generator=g))
    # Independent reference: the sum over pixels of outer products, in float64.
    want = torch.einsum("nohw,nihw->oi", grad.double(), x.double())[:, :, None, None]
    got = pointwise_gemm.weight_grad(x, grad)
    assert got.shape == (cout, cin, 1, 1) and got.dtype == torch.float32
    if n == 0:
        assert torch.equal(got, torch.zeros_like(got))
        return
    # float32 sums of exact bf16 products: far tighter than a bf16 result
    assert rel_err(got, want) < 1e-5


@pytest.mark.parametrize("size", [9, 25])  # 162 pixels (outputs split), 1,250 (pixels split)
def test_weight_gradient_is_the_same_with_one_thread_or_two(size: int) -> None:
    x = _cl(torch.randn(2, 64, size, size, generator=torch.Generator().manual_seed(7)))
    grad = _cl(torch.randn(2, 64, size, size, generator=torch.Generator().manual_seed(8)))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = pointwise_gemm.weight_grad(x, grad)
    finally:
        torch.set_num_threads(threads)
    torch.testing.assert_close(pointwise_gemm.weight_grad(x, grad), one, rtol=1e-5, atol=1e-4)


def test_bad_weight_gradient_inputs_are_refused_by_name() -> None:
    x = _cl(torch.zeros(1, 64, 3, 3))
    with pytest.raises(ValueError, match="grad: expected a 4-D bfloat16"):
        pointwise_gemm.weight_grad(x, torch.zeros(1, 64, 3, 3))
    with pytest.raises(ValueError, match="x, grad: expected the same batch and map size"):
        pointwise_gemm.weight_grad(x, _cl(torch.zeros(1, 64, 2, 3)))
    with pytest.raises(ValueError, match="multiple of 64"):
        pointwise_gemm.weight_grad(_cl(torch.zeros(1, 32, 3, 3)), _cl(torch.zeros(1, 64, 3, 3)))
