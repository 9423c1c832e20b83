"""`set_grad_checkpointing`: stages recomputed in backward give the plain network's loss,
gradients and batch-norm statistics (they trade memory for one more forward, nothing else)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import resnext


@pytest.mark.parametrize("preact", [False, True], ids=["post-activation", "pre-activation"])
def test_checkpointed_stages_train_as_the_plain_network(preact: bool) -> None:
    torch.manual_seed(0)
    spec = resnext.ModelSpec(
        depths=(1, 2, 1), cardinality=2, base_width=4, stem="cifar", preact=preact,
        block_form="c", num_classes=5,
    )  # fmt: skip
    plain = resnext.build_model(spec).train()
    if preact:
        assert plain.final_bn is not None  # the path after the stages is exercised
    ckpt = copy.deepcopy(plain)
    ckpt.set_grad_checkpointing()
    x, y = torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 4])
    for _ in range(2):  # two steps: the statistics are updated once per forward, both times
        loss_plain = nn.functional.cross_entropy(plain(x), y)
        loss_ckpt = nn.functional.cross_entropy(ckpt(x), y)
        loss_plain.backward()
        loss_ckpt.backward()
        assert torch.allclose(loss_plain, loss_ckpt, rtol=1e-6, atol=1e-7)
    _assert_same_state(plain, ckpt, rtol=1e-5, atol=1e-7)
    assert int(dict(ckpt.named_buffers())["layer1.0.bn1.num_batches_tracked"]) == 2


def _assert_same_state(plain: nn.Module, other: nn.Module, rtol: float, atol: float) -> None:
    """The same parameter gradients and buffers (batch-norm statistics and counts)."""
    grads = dict(other.named_parameters())
    for name, p in plain.named_parameters():
        assert torch.allclose(p.grad, grads[name].grad, rtol=rtol, atol=atol), name
    buffers = dict(other.named_buffers())
    for name, b in plain.named_buffers():
        assert torch.allclose(b.double(), buffers[name].double(), rtol=rtol, atol=atol), name


def test_checkpointing_keeps_fewer_activations() -> None:
    """Saved for backward: the plain network keeps every layer's activations; the checkpointed
    one keeps the block inputs (their recomputation runs inside backward)."""
    torch.manual_seed(0)
    model = resnext.create_model("resnext_tiny").train()
    x = torch.randn(8, 3, 32, 32)

    def saved_bytes(enable: bool) -> int:
        model.set_grad_checkpointing(enable)
        total = 0

        def pack(t: torch.Tensor) -> torch.Tensor:
            nonlocal total
            total += t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(x).sum()
        return total

    plain, ckpt = saved_bytes(False), saved_bytes(True)
    assert ckpt < plain / 3


def test_no_recomputation_without_gradients(monkeypatch: pytest.MonkeyPatch) -> None:
    # Under no_grad nothing is saved for a backward, so a checkpointed stage must run plainly:
    # the checkpoint wrapper is not called at all, and the output is the plain network's.
    from resnext.models import network

    calls: list[int] = []

    def spy(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        return block(x)

    monkeypatch.setattr(network, "checkpointed", spy)
    model = resnext.create_model("resnext_tiny").eval()
    model.set_grad_checkpointing()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = model(x)
    assert calls == []
    model(x.requires_grad_())  # with gradients on, the same model goes through the wrapper
    assert calls
    model.set_grad_checkpointing(False)
    with torch.no_grad():
        assert torch.equal(out, model(x))


def test_compiled_checkpointed_stages_train_as_the_plain_network() -> None:
    # Under torch.compile the recomputation is the compiler's: the buffers must still be
    # updated once per step, and the gradients must not change. The reference is the plain
    # network compiled too: compiled and eager batch norms differ by up to ~1 % in these
    # gradients on one thread (4 images, 4×4 maps), which is the compiler's, not checkpointing's.
    torch.manual_seed(0)
    plain = resnext.create_model("resnext_tiny").train()
    ckpt = copy.deepcopy(plain)
    ckpt.set_grad_checkpointing()
    compiled_plain, compiled = torch.compile(plain), torch.compile(ckpt)
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    for _ in range(2):
        nn.functional.cross_entropy(compiled_plain(x), y).backward()
        nn.functional.cross_entropy(compiled(x), y).backward()
    _assert_same_state(plain, ckpt, rtol=1e-4, atol=1e-6)
