"""Where a replay's activations live: one arena, each tensor's memory reused once it is dead.

A recording (`resnext.speed.replay.capture`) keeps every tensor its forward made, so that the
recorded addresses stay ours: ResNeXt-50 at batch 16 would hold 315–540 MB of activations, each
layer writing memory no earlier layer warmed. `pack` gives each activation storage the interval
of steps that use it (a C call passing an address inside it, a torch step taking or returning a
tensor on it), places the storages in one arena so that two overlap in memory only if their
intervals do not, and rewrites the steps onto the arena: C addresses by their offset, torch
steps' tensors as views of it. The recording's own check (a fresh input replayed bit for bit
against the module) then runs on the packed steps.

Outputs `donated` to `pack` (functional torch steps' results, where the process keeps freed
memory for reuse) stay out of the arena: copying them in cost more than the arena saves
(`replay_steps.Donation`); `pack` lists, for each, the later steps that use it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import torch
from torch.utils._pytree import tree_flatten, tree_map

from resnext.speed.replay_steps import Call, Donation, TorchStep

ALIGN = 64  # bytes: a cache line, and at least every dtype's alignment


def _span(t: torch.Tensor) -> tuple[int, int]:
    storage = t.untyped_storage()
    return storage.data_ptr(), storage.nbytes()


def _tensors(step: TorchStep) -> list[torch.Tensor]:
    leaves = tree_flatten((step.args, step.kwargs))[0] + list(step.outs)
    return [t for t in leaves if isinstance(t, torch.Tensor) and t.layout == torch.strided]


def _holder(address: int, storages: dict[int, int]) -> int | None:
    """The storage (its base) an address points into, else one it points just past the end of
    (a kernel's end pointer), else None. Inside wins: where one storage ends exactly where
    another starts, the address is the later one's first byte."""
    for base, size in storages.items():  # few storages: a scan is enough
        if base <= address < base + size:
            return base
    for base, size in storages.items():
        if address == base + size:
            return base
    return None


def _intervals(
    steps: list[Call | TorchStep], owners: dict[int, int], storages: dict[int, int], last: set[int]
) -> dict[int, tuple[int, int]]:
    """Each of `storages`' (first, last) step that uses it (an address is its `owners`' one
    holding it); those in `last` live to the end."""
    used: dict[int, tuple[int, int]] = {}

    def touch(base: int, i: int) -> None:
        first, _ = used.get(base, (i, i))
        used[base] = (first, i)

    for i, step in enumerate(steps):
        if isinstance(step, Call):
            for j in step.pointers:
                base = _holder(step.args[j], owners)
                if base in storages:
                    touch(base, i)
        else:
            for t in _tensors(step):
                base = t.untyped_storage().data_ptr()
                if base in storages:
                    touch(base, i)
    for base in last:
        if base in used:
            used[base] = (used[base][0], len(steps))
        else:
            used[base] = (len(steps), len(steps))
    return used


def _offsets(sizes: dict[int, int], intervals: dict[int, tuple[int, int]]) -> tuple[dict, int]:
    """Arena offsets: largest first, each at the lowest aligned offset that overlaps no placed
    storage whose interval meets its own; and the arena's size."""
    placed: list[tuple[int, int, int, int]] = []  # offset, end, first, last
    offsets = {}
    for base in sorted(intervals, key=lambda b: (-sizes[b], b)):
        size = -(-sizes[base] // ALIGN) * ALIGN
        first, last = intervals[base]
        live = sorted((o, e) for o, e, f, la in placed if f <= last and first <= la)
        at = 0
        for o, e in live:
            if at + size <= o:
                break
            at = max(at, e)
        offsets[base] = at
        placed.append((at, at + size, first, last))
    return offsets, max((e for _, e, _, _ in placed), default=0)


def donatable(steps: list[Call | TorchStep], made: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """The outputs of functional torch steps that a `Donation` can hand on: each alone at the
    start of a storage the forward made, which every tensor on it reads in its dtype."""
    made_bases = {t.untyped_storage().data_ptr() for t in made}
    dtypes: dict[int, set[torch.dtype]] = {}
    for step in steps:
        if isinstance(step, TorchStep):
            for t in _tensors(step):
                dtypes.setdefault(t.untyped_storage().data_ptr(), set()).add(t.dtype)
    found, seen = [], set()
    for step in steps:
        if not isinstance(step, TorchStep) or step.writes:
            continue
        for t in step.outs:
            if t.layout != torch.strided:
                continue
            base = t.untyped_storage().data_ptr()
            if (
                base in made_bases
                and base not in seen
                and t.storage_offset() == 0
                and dtypes.get(base) == {t.dtype}
            ):
                found.append(t)
                seen.add(base)
    return found


def _donations(
    steps: list[Call | TorchStep],
    donated: Sequence[torch.Tensor],
    owners: dict[int, int],
    output: torch.Tensor,
) -> list[Donation]:
    """For each donated output, the C arguments and tensors of the steps after its producer that
    use its storage, and the last such step (`len(steps)` where the output is on it)."""
    bases = {t.untyped_storage().data_ptr(): t for t in donated}
    producers: dict[int, int] = {}
    slots: dict[int, list[tuple[int, int, int]]] = {b: [] for b in bases}
    views: dict[int, dict[int, torch.Tensor]] = {b: {} for b in bases}
    last: dict[int, int] = {}
    for i, step in enumerate(steps):
        if isinstance(step, Call):
            for j in step.pointers:
                base = _holder(step.args[j], owners)
                if base in bases and base in producers:
                    slots[base].append((i, j, step.args[j] - base))
                    last[base] = i
            continue
        for t in _tensors(step):
            base = t.untyped_storage().data_ptr()
            if base not in bases:
                continue
            if base not in producers and t is bases[base]:
                producers[base] = i
            if base in producers:
                views[base].setdefault(id(t), t)
                last[base] = i
    out_base = output.untyped_storage().data_ptr()
    if out_base in bases:
        views[out_base].setdefault(id(output), output)
        last[out_base] = len(steps)
    found = []
    for base, tensor in bases.items():
        producer = producers[base]
        on_it = [tensor, *(t for t in views[base].values() if t is not tensor)]
        geometry = tuple((t, t.storage_offset(), tuple(t.shape), tuple(t.stride())) for t in on_it)
        out = _out_index(steps[producer], tensor)
        found.append(Donation(producer, out, tuple(slots[base]), geometry, last[base]))
    return found


def _out_index(step: Call | TorchStep, tensor: torch.Tensor) -> int:
    assert isinstance(step, TorchStep)
    return next(k for k, t in enumerate(step.outs) if t is tensor)


def pack(
    steps: list[Call | TorchStep],
    activations: list[torch.Tensor],
    output: torch.Tensor,
    fixed: Sequence[torch.Tensor] = (),
    donated: Sequence[torch.Tensor] = (),
) -> tuple[list[Call | TorchStep], torch.Tensor, torch.Tensor, list[torch.Tensor], list[Donation]]:
    """`steps` rewritten so that the storages of `activations` (tensors the forward made; not
    its input or weights, which are `fixed`: they stay, and an address in them is theirs) that
    any step uses live in one arena, except those of `donated` (outputs from `donatable`):
    (steps, arena, `output` on the arena, the activations left where they are, which the steps
    never touch, and the donations)."""
    storages = dict(_span(t) for t in activations)
    storages = {base: size for base, size in storages.items() if size > 0}
    given = dict(_span(t) for t in donated)
    storages = {base: size for base, size in storages.items() if base not in given}
    owners = {**dict(_span(t) for t in fixed if t.layout == torch.strided), **given, **storages}
    out_base = output.untyped_storage().data_ptr()
    intervals = _intervals(steps, owners, storages, {out_base} & set(storages))
    offsets, total = _offsets(storages, intervals)
    arena = torch.empty(max(total, ALIGN), dtype=torch.uint8)
    arena_at = arena.data_ptr()

    def address(a: int) -> int:
        base = _holder(a, owners)
        return arena_at + offsets[base] + (a - base) if base in offsets else a

    views: dict[int, torch.Tensor] = {}

    def moved(t: object) -> object:
        if not isinstance(t, torch.Tensor) or t.layout != torch.strided:
            return t
        base = t.untyped_storage().data_ptr()
        if base not in offsets:
            return t
        if id(t) not in views:
            byte = offsets[base] + (t.data_ptr() - base)
            view = torch.empty(0, dtype=t.dtype)
            view.set_(arena.untyped_storage(), byte // t.element_size(), t.shape, t.stride())
            views[id(t)] = view
        return views[id(t)]

    packed: list[Call | TorchStep] = []
    for step in steps:
        if isinstance(step, Call):
            args = tuple(address(a) if j in step.pointers else a for j, a in enumerate(step.args))
            packed.append(replace(step, args=args))
        else:
            args, kwargs = tree_map(moved, (step.args, step.kwargs))
            outs = tuple(moved(t) for t in step.outs)
            packed.append(replace(step, args=args, kwargs=kwargs, outs=outs))
    new_output = moved(output)
    assert isinstance(new_output, torch.Tensor)
    left = [
        t
        for t in activations
        if t.untyped_storage().data_ptr() not in offsets
        and t.untyped_storage().data_ptr() not in given
    ]
    return packed, arena, new_output, left, _donations(packed, donated, owners, new_output)
