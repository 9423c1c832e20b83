"""The steps a replay records (`resnext.speed.replay`): C calls of our kernels, torch operators."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils._pytree import tree_flatten


@dataclass(frozen=True)
class Call:
    """One recorded C call: the function's name and address, its arguments as 64-bit integers,
    and the int it returned (None for a function that returns nothing)."""

    name: str
    address: int
    args: tuple[int, ...]
    value: int | None
    pointers: tuple[int, ...] = ()  # which arguments are addresses


@dataclass(frozen=True)
class TorchStep:
    """One recorded torch operator that computes outside our kernels (a layer left to oneDNN, a
    cast, the classifier): called again on the same tensors, its new outputs copied into the
    ones it returned when recorded, which later steps read."""

    op: torch._ops.OpOverload
    args: tuple[object, ...]
    kwargs: dict[str, object]
    outs: tuple[torch.Tensor, ...]
    writes: bool  # the operator writes into an argument (in place or out=) and returns it

    def run(
        self,
        gives: dict[int, Donation] | None = None,
        args: object = None,
        slot_index: dict[tuple[int, int], int] | None = None,
    ) -> None:
        """Compute again; each output donated (`gives`, by output) is handed on through the
        replay loop's `args` (`Donation.give`), the others copied."""
        result = self.op(*self.args, **self.kwargs)
        if not self.writes:
            new = [t for t in tree_flatten(result)[0] if isinstance(t, torch.Tensor)]
            for k, (kept, value) in enumerate(zip(self.outs, new, strict=True)):
                if gives is not None and k in gives:
                    assert slot_index is not None
                    gives[k].give(value, args, slot_index)
                else:
                    kept.copy_(value)


@dataclass(frozen=True, eq=False)  # it holds tensors: compared by identity
class Donation:
    """A functional torch step's output left, on each run, where the operator puts it instead of
    copied into the replay's arena (`replay_memory.pack`): the steps after it are pointed at it
    (their C arguments rewritten, their tensors set onto its storage) and let go of it after the
    last of them. Copying ResNeXt-50's oneDNN outputs cost a float32 replay 26 ms of a 530 ms
    batch-16 forward on the Xeon without AMX (stop 54)."""

    step: int  # the producing step's index in the steps
    out: int  # which of its outputs
    slots: tuple[tuple[int, int, int], ...]  # (step index of a C call, argument, byte offset)
    views: tuple[tuple[torch.Tensor, int, tuple[int, ...], tuple[int, ...]], ...]
    last: int  # the index of the last step that uses it; len(steps) where it is the output

    def give(
        self, value: torch.Tensor, args: object, slot_index: dict[tuple[int, int], int]
    ) -> None:
        """Point the later steps at `value`, this run's output: `args` is the replay loop's
        argument array, `slot_index` maps (call step, argument) to a place in it."""
        producer = self.views[0]
        # a stride of a dimension of size 1 says nothing: operators differ there between calls
        strides = [s for s, n in zip(value.stride(), value.shape, strict=True) if n > 1]
        want = [s for s, n in zip(producer[3], producer[2], strict=True) if n > 1]
        if tuple(value.shape) != producer[2] or strides != want:
            raise RuntimeError(
                f"replay: a step's output is {tuple(value.shape)} strides {tuple(value.stride())},"
                f" recorded as {producer[2]} strides {producer[3]}"
            )
        storage = value.untyped_storage()
        base = storage.data_ptr() + value.storage_offset() * value.element_size()
        for step, arg, offset in self.slots:
            args[slot_index[step, arg]] = base + offset  # type: ignore[index]
        for tensor, offset, size, stride in self.views:
            tensor.set_(storage, value.storage_offset() + offset, size, stride)

    def release(self) -> None:
        """Let go of this run's output: its tensors hold no memory until the next run."""
        for tensor, _, _, _ in self.views:
            tensor.set_()
