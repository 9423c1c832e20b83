"""Replaying recorded kernel calls (`optimize(..., backend="replay")`, `resnext.speed.replay`)."""

from __future__ import annotations

import ctypes
import time

import pytest
import torch
from grouped_timing import time_grouped_ways
from registry_models import (
    randomize_bn,
    registry_model_and_input,
)
from tensor_checks import rel_err
from torch import nn

import resnext
from resnext.errors import ConfigError
from resnext.speed import (
    allocator,
    fastpath,
    head,
    kernel_passes,
    replay,
    replay_memory,
)
from resnext.speed.capability import bf16_supported
from resnext.speed.fastpath import optimize
from resnext.speed.grouped_kernel import unavailable_reason as grouped_unavailable
from resnext.speed.prepacked import PrepackedConv
from resnext.speed.replay import Call, Plan, Recorded, Replayed, ReplayUnavailable
from resnext.speed.replay_steps import Donation

pytestmark = pytest.mark.skipif(
    replay.unavailable_reason() is not None, reason=f"no replay here: {replay.unavailable_reason()}"
)
KERNEL = "on" if grouped_unavailable() is None else "off"


def _model() -> nn.Module:
    torch.manual_seed(0)
    model = resnext.create_model("resnext_tiny").eval()
    randomize_bn(model)
    return model


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_replay_computes_the_eager_fast_paths_function_bit_for_bit(dtype: str) -> None:
    if dtype == "bf16" and not bf16_supported():
        pytest.skip("this CPU has no native bf16")
    model = _model()
    x = torch.randn(2, 3, 32, 32)
    fast = optimize(model, dtype, backend="replay", example_input=x, grouped_kernel=KERNEL)
    assert isinstance(fast, Replayed)
    eager = fast.module  # the eager fast path it records
    (recorded,) = fast.recordings.values()
    # the grouped layers our kernels took are in the recorded C calls, the rest in torch steps
    left = [m for m in eager.modules() if isinstance(m, nn.Conv2d | PrepackedConv)]
    left = [m for m in left if m.groups > 1]
    steps = recorded.plan.torch_steps
    # where each operator takes its groups
    groups_at = {
        "aten.convolution.default": 8,
        "mkldnn._convolution_pointwise.default": 6,
        "mkldnn._convolution_pointwise.binary": 7,
        "mkldnn._convolution_pointwise_.binary": 7,
    }
    grouped = [s for s in steps if str(s.op) in groups_at and s.args[groups_at[str(s.op)]] > 1]
    assert all("conv" not in str(s.op) or str(s.op) in groups_at for s in steps)
    assert len(grouped) == len(left)
    if KERNEL == "on":
        assert len(left) < 3 and recorded.plan.calls
    if head.unavailable_reason() is None:  # the classifier in C too: no torch step after it
        assert [c.name for c in recorded.plan.calls[-2:]] == ["head_pool", "head_linear"]
        assert not any("addmm" in str(s.op) or "mean" in str(s.op) for s in steps)
    outs = []
    for _ in range(3):
        fresh = torch.randn(2, 3, 32, 32)
        with torch.no_grad():
            got, want = fast(fresh), eager(fresh)
            plain = model(fresh)
        assert torch.equal(got, want)
        assert rel_err(got, plain) < (1e-4 if dtype == "fp32" else 3e-2)
        outs.append(got)
    # a profile replays the same steps, each timed, in order
    profile = recorded.plan.profile()
    names = [name for name, _ in profile]
    assert len(profile) == len(recorded.plan.calls) + len(recorded.plan.torch_steps)
    torch_ops = {str(step.op) for step in recorded.plan.torch_steps}
    assert [c.name for c in recorded.plan.calls] == [n for n in names if n not in torch_ops]
    assert all(ms >= 0 for _, ms in profile)
    # each call returns its own tensor: a later replay does not overwrite an earlier output
    assert not torch.equal(outs[0], outs[1])
    assert outs[0].data_ptr() != outs[1].data_ptr()


@pytest.mark.parametrize("new_shapes", ["compile", "eager"])
def test_an_input_unlike_the_recorded_ones_is_recorded_or_runs_eager_as_asked(
    new_shapes: str,
) -> None:
    model = _model()
    x = torch.randn(2, 3, 32, 32)
    fast = optimize(
        model,
        "fp32",
        backend="replay",
        example_input=x,
        grouped_kernel=KERNEL,
        new_shapes=new_shapes,
    )
    assert len(fast.recordings) == 1
    for other in (torch.randn(1, 3, 32, 32), x.contiguous(memory_format=torch.channels_last)):
        with torch.no_grad():
            assert torch.equal(fast(other), fast.module(other))
    assert len(fast.recordings) == (3 if new_shapes == "compile" else 1)


def test_replay_of_torch_operators_alone() -> None:
    # A module without our kernels replays as torch steps, refreshing every output it computes
    # (a functional one by copy, an in-place one by running again) on the same tensors.
    torch.manual_seed(1)
    module = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(inplace=True), nn.AdaptiveAvgPool2d(1))
    module.eval()
    recorded = Recorded(module, torch.randn(1, 3, 9, 9))
    ops = [str(step.op) for step in recorded.plan.torch_steps]
    assert ops[0].startswith("aten.convolution") and "aten.relu_.default" in ops
    assert recorded.plan.calls == ()
    for _ in range(2):
        x = torch.randn(1, 3, 9, 9)
        with torch.no_grad():
            assert torch.equal(recorded(x), module(x))


class _Untracked(nn.Module):
    """Computes through numpy, which no torch operator sees: a replay would keep its value."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(x.numpy() * 2.0)


def test_a_value_computed_outside_the_recording_is_refused() -> None:
    with pytest.raises(ReplayUnavailable, match="does not reproduce the module's output"):
        Recorded(_Untracked(), torch.randn(1, 4))


class _StrayPointer(nn.Module):
    """Calls a C function of ours on a buffer it lets go: replaying would write freed memory."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lib = replay._library()
        scratch = ctypes.create_string_buffer(64)  # memory outside torch's
        p = ctypes.addressof(scratch)
        assert lib.replay_run(p, p, p, p, 0, None) == 0  # runs no call: n = 0
        return x * 2


class _CallsMaxArgs(nn.Module):
    """Calls one of our C functions."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert replay._library().replay_max_args() > 0
        return x * 2


class _CallsMaxArgsAfterAPause(_CallsMaxArgs):
    """Lets other threads run (sleeping frees the interpreter) before its call."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        time.sleep(0.05)
        return super().forward(x)


def test_memory_the_capture_does_not_keep_is_refused_by_name() -> None:
    with pytest.raises(ReplayUnavailable, match="replay_run got memory the capture does not keep"):
        Recorded(_StrayPointer(), torch.randn(2, 2))


def test_a_function_without_declared_argument_types_is_refused_by_name(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    Recorded(_CallsMaxArgs(), torch.randn(2, 2))  # declared: recorded
    monkeypatch.setattr(replay._library().replay_max_args, "argtypes", None)
    with pytest.raises(ReplayUnavailable, match="replay_max_args has no declared argument types"):
        Recorded(_CallsMaxArgs(), torch.randn(2, 2))


def test_a_call_whose_value_changes_stops_the_replay_by_name() -> None:
    lib = replay._library()
    address = ctypes.cast(lib.replay_max_args, ctypes.c_void_p).value
    width = lib.replay_max_args()
    Plan([Call("replay_max_args", address, (), width)], []).run()  # as recorded: fine
    plan = Plan([Call("replay_max_args", address, (), width + 1)], [])
    with pytest.raises(RuntimeError, match=r"replay_max_args \(call 1\) returned another value"):
        plan.run()


def test_too_many_arguments_for_the_loop_are_refused() -> None:
    width = replay._library().replay_max_args()
    with pytest.raises(ReplayUnavailable, match=f"takes {width + 1} arguments"):
        Plan([Call("f", 1, (0,) * (width + 1), 0)], [])


def test_bad_arguments() -> None:
    with pytest.raises(ConfigError, match="new_shapes: expected one of"):
        Replayed(nn.Identity(), new_shapes="later")
    with pytest.raises(ConfigError, match="backend: expected one of"):
        optimize(_model(), backend="replay-ish")


# Handing oneDNN's outputs on is checked on one network of each kind (stems, SE, avg-down,
# pre-activation, no residual); copying them, the other way, on every registry network.
HANDED_ON_KINDS = (
    "resnext_tiny",
    "resnext_tiny_in",
    "resnext50_32x4d",
    "seresnext50_32x4d",
    "resnext50d_32x4d",
    "resnext29_8x64d_preact",
    "resnet50_noresidual",
)
REPLAY_CASES = [(name, False) for name in resnext.list_models()] + [
    (name, True) for name in HANDED_ON_KINDS
]


@pytest.mark.parametrize(
    "name, handed_on",
    REPLAY_CASES,
    ids=[f"{name}-{'handed-on' if on else 'copied'}" for name, on in REPLAY_CASES],
)
def test_replay_same_function_every_registry_model(
    name: str, handed_on: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    # both ways of refreshing oneDNN's outputs, whichever this process's allocator would pick
    monkeypatch.setattr(replay, "freed_memory_kept", lambda: handed_on)
    torch.manual_seed(4)
    model, x = registry_model_and_input(name)
    fast = optimize(model, "fp32", backend="replay", example_input=x, grouped_kernel=KERNEL)
    assert isinstance(fast, Replayed)
    (recorded,) = fast.recordings.values()
    functional = any(not step.writes for step in recorded.plan.torch_steps)
    assert bool(recorded.plan.donations) == (handed_on and functional)
    fresh = torch.randn_like(x)
    with torch.no_grad():
        got = fast(fresh)
        assert torch.equal(got, fast.module(fresh))
        assert rel_err(got, model(fresh)) < 1e-4


def test_arena_offsets_share_memory_only_between_storages_never_alive_together() -> None:
    # by hand: A (100 bytes) lives over steps 0-1, B (100) over 1-2, C (50) over 2-3. Largest
    # first: A at 0 (128 bytes, aligned), B meets A at step 1 so goes above it at 128, C meets
    # only B and takes A's place at 0: 256 bytes where 300 were kept apart.
    sizes = {1: 100, 2: 100, 3: 50}
    offsets, total = replay_memory._offsets(sizes, {1: (0, 1), 2: (1, 2), 3: (2, 3)})
    assert offsets == {1: 0, 2: 128, 3: 0} and total == 256


def test_an_address_belongs_to_the_storage_it_points_into_before_one_it_ends() -> None:
    # A at 100 (50 bytes) ends where B at 150 (30 bytes) starts: 150 is B's first byte, 180
    # points just past B (an end pointer), 120 is inside A, 99 and 181 are no one's
    storages = {100: 50, 150: 30}
    got = [replay_memory._holder(a, storages) for a in (150, 180, 120, 99, 181)]
    assert got == [150, 150, 100, None, None]


def test_a_recording_keeps_its_activations_in_one_arena_smaller_than_them_all() -> None:
    model = _model()
    x = torch.randn(4, 3, 32, 32)
    fast = optimize(model, "fp32", backend="replay", example_input=x, grouped_kernel=KERNEL)
    recorded = Recorded(fast.module, x, donate=False)  # no output handed on: all in the arena
    arena = next(t for t in recorded.plan._keep if t.dtype == torch.uint8)
    # every activation the recording used lives in the arena: the output too
    start, end = arena.data_ptr(), arena.data_ptr() + arena.numel()
    assert start <= recorded.output.data_ptr() < end
    for call in recorded.plan.calls:
        for j in call.pointers:
            address = call.args[j]
            if address == 0:  # NULL: no such argument (a residual, say)
                continue
            inside_arena = start <= address <= end
            kept = any(
                t.untyped_storage().data_ptr()
                <= address
                <= t.untyped_storage().data_ptr() + t.untyped_storage().nbytes()
                for t in recorded.plan._keep
                if t.layout == torch.strided  # not oneDNN's packed weights
            )
            assert inside_arena or kept
    # the activations the forward makes, each in its own memory, against the arena
    watch = replay._Watch([])
    with torch.no_grad(), watch:
        fast.module(x)
    strided = [t for t in replay.module_tensors(fast.module) if t.layout == torch.strided]
    weights = {t.untyped_storage().data_ptr() for t in strided}
    storages = {
        t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
        for t in watch.kept
        if t.untyped_storage().data_ptr() not in weights
    }
    assert arena.numel() < 0.7 * sum(storages.values())


def test_a_copy_records_again_on_its_own_memory() -> None:
    import copy

    model = _model()
    x = torch.randn(2, 3, 32, 32)
    fast = optimize(model, "fp32", backend="replay", example_input=x, new_shapes="eager")
    for twin in (copy.deepcopy(fast), copy.deepcopy(fast)):
        assert twin.recordings == {}
        fresh = torch.randn(2, 3, 32, 32)
        with torch.no_grad():
            assert torch.equal(twin(fresh), fast(fresh))
        (recorded,) = twin.recordings.values()  # recorded again, though new_shapes is 'eager'
        (original,) = fast.recordings.values()
        assert recorded.input.data_ptr() != original.input.data_ptr()


def test_another_threads_kernel_calls_are_not_recorded() -> None:
    import threading

    lib = replay._library()
    stop = threading.Event()

    def busy() -> None:  # calls one of our functions over and over while a recording runs
        while not stop.is_set():
            lib.replay_max_args()

    other = threading.Thread(target=busy)
    other.start()
    try:
        recorded = Recorded(_CallsMaxArgsAfterAPause(), torch.randn(2, 2))
    finally:
        stop.set()
        other.join()
    assert [c.name for c in recorded.plan.calls] == ["replay_max_args"]


def test_the_grouped_choosers_weigh_leaving_the_loop_only_for_a_replay(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    asked: dict[str, list[float]] = {"split": [], "grouped": []}
    for name, key in (("split_group_channels", "split"), ("swap_grouped_convs", "grouped")):
        original = getattr(kernel_passes, name)

        def recording(*args, _original=original, _key=key, **kwargs):  # type: ignore[no-untyped-def]
            asked[_key].append(kwargs["native_extra_ms"])
            return _original(*args, **kwargs)

        monkeypatch.setattr(kernel_passes, name, recording)
    x = torch.randn(1, 3, 32, 32)
    # a replay runs its choosers with both weights unless given one
    for backend, weight in (("none", None), ("replay", None), ("replay", 0.05)):
        optimize(
            _model(),
            "fp32",
            backend=backend,
            example_input=x,
            grouped_kernel=KERNEL,
            replay_exit_ms=weight,
        )
    assert asked == {key: [0.0, replay.TORCH_STEP_MS, 0.0, 0.05] for key in asked}


@pytest.mark.skipif(KERNEL == "off", reason="needs our grouped kernel")
@pytest.mark.parametrize(
    ("kernel_ms", "other_faster", "exit_ms", "chosen"),
    [
        # oneDNN 1.0 ms: the kernel wins only with the exit weighed; the faster replay is kept
        (1.1, True, 0.0, "native"),
        (1.1, False, replay.TORCH_STEP_MS, "kernel"),
        (0.5, None, replay.TORCH_STEP_MS, "kernel"),  # both weights choose alike: one build
    ],
)
def test_a_replay_keeps_the_faster_of_its_builds_by_either_exit_weight(
    monkeypatch: pytest.MonkeyPatch,
    kernel_ms: float,
    other_faster: bool | None,
    exit_ms: float,
    chosen: str,
) -> None:
    time_grouped_ways(monkeypatch, 1.0, kernel_ms)
    raced: list[tuple[nn.Module, nn.Module]] = []

    def race(challenger, incumbent, shape):  # type: ignore[no-untyped-def]
        raced.append((challenger, incumbent))
        assert isinstance(challenger, Replayed) and isinstance(incumbent, Replayed)
        return other_faster

    monkeypatch.setattr(fastpath, "replays_faster", race)
    model = _model()
    x = torch.randn(2, 3, 32, 32)
    fast = optimize(model, "fp32", backend="replay", example_input=x, split_groups="off")
    assert len(raced) == (0 if other_faster is None else 1)
    assert isinstance(fast, Replayed) and fast.replay_exit_ms == exit_ms
    assert fast.module.replay_exit_ms == exit_ms
    assert {c.chosen.split("+")[0] for c in fast.grouped_choices} == {chosen}
    kept = [m for m in fast.module.modules() if type(m).__name__ == "FastGroupedConv3x3"]
    assert bool(kept) == (chosen == "kernel")  # the build it reports is the one it runs
    with torch.no_grad():
        assert rel_err(fast(x), model(x)) < 1e-5


@pytest.mark.skipif(KERNEL == "off", reason="needs our grouped kernel")
def test_a_second_build_that_cannot_be_recorded_leaves_the_first(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # the two weights choose differently (oneDNN 1.0 ms, ours 1.1); the second recording fails
    time_grouped_ways(monkeypatch, 1.0, 1.1)
    built = fastpath._replayed
    calls = []

    def second_fails(eager, shapes, new_shapes):  # type: ignore[no-untyped-def]
        calls.append(eager)
        if len(calls) == 2:
            raise ReplayUnavailable("made to fail")
        return built(eager, shapes, new_shapes)

    monkeypatch.setattr(fastpath, "_replayed", second_fails)
    monkeypatch.setattr(fastpath, "replays_faster", lambda *a: pytest.fail("nothing to race"))
    model = _model()
    x = torch.randn(2, 3, 32, 32)
    with pytest.warns(RuntimeWarning, match="recording failed for the replay built without"):
        fast = optimize(model, "fp32", backend="replay", example_input=x, split_groups="off")
    assert len(calls) == 2
    assert isinstance(fast, Replayed) and fast.replay_exit_ms == replay.TORCH_STEP_MS
    with torch.no_grad():
        assert rel_err(fast(x), model(x)) < 1e-5


@pytest.mark.parametrize("weight", [-0.1, float("inf"), "0.2", True])
def test_a_bad_exit_weight_is_refused_by_name(weight: object) -> None:
    with pytest.raises(ConfigError, match="replay_exit_ms: expected None or a finite number"):
        optimize(_model(), "fp32", backend="replay", replay_exit_ms=weight)  # type: ignore[arg-type]


def _arena(recorded: Recorded) -> torch.Tensor:
    return next(t for t in recorded.plan._keep if t.dtype == torch.uint8)


def test_functional_outputs_are_handed_on_where_freed_memory_is_kept() -> None:
    model = _model()
    x = torch.randn(4, 3, 32, 32)
    eager = optimize(model, "fp32", backend="none", example_input=x, grouped_kernel=KERNEL)
    copied = Recorded(eager, x, donate=False)
    given = Recorded(eager, x, donate=True)
    assert copied.plan.donations == ()
    # the oneDNN convolutions without a residual to write over, and torch's other functional
    # operators, hand their outputs on: one donation each
    functional = [s for s in given.plan.torch_steps if not s.writes]
    assert len(given.plan.donations) == len(functional) > 0
    if KERNEL == "on":  # a 1×1's output read by our grouped kernel: a C argument rewritten
        assert any(d.slots for d in given.plan.donations)
    # ... and take no room in the arena (which is as large as its busiest step: no larger)
    arena = _arena(given)
    assert arena.numel() <= _arena(copied).numel()
    # every C argument the recording made points into the arena or the fixed memory, or is one
    # a donation rewrites on each run
    start, end = arena.data_ptr(), arena.data_ptr() + arena.numel()
    fixed = [t for t in given.plan._keep if t.layout == torch.strided and t is not arena]
    outside = 0
    for call in given.plan.calls:
        for j in call.pointers:
            address = call.args[j]
            held = any(
                t.untyped_storage().data_ptr()
                <= address
                <= t.untyped_storage().data_ptr() + t.untyped_storage().nbytes()
                for t in fixed
            )
            outside += address != 0 and not start <= address <= end and not held
    assert outside == sum(len(d.slots) for d in given.plan.donations)
    for _ in range(3):
        fresh = torch.randn_like(x)
        with torch.no_grad():
            want = eager(fresh)
            assert torch.equal(given(fresh), want) and torch.equal(copied(fresh), want)
        # each output is let go of after the last step that reads it; the module's own (the
        # classifier's, on this path) is held until the next call
        steps = len(given.plan.calls) + len(given.plan.torch_steps)
        for donation in given.plan.donations:
            held = donation.views[0][0].untyped_storage().nbytes()
            assert (held > 0) == (donation.last == steps)


def test_a_donation_points_the_later_steps_at_each_new_output_and_lets_go() -> None:
    recorded = torch.zeros(2, 3)
    later_view = recorded[1]  # a later step's tensor on the same memory
    donation = Donation(
        0, 0, ((5, 1, 12),), ((recorded, 0, (2, 3), (3, 1)), (later_view, 3, (3,), (1,))), 1
    )
    args = (ctypes.c_long * 4)()
    new = torch.arange(6.0).reshape(2, 3)
    donation.give(new, args, {(5, 1): 2})
    # the C argument now points 12 bytes into the new output, the tensors onto its memory
    assert args[2] == new.data_ptr() + 12 and args[0] == args[1] == args[3] == 0
    assert recorded.data_ptr() == new.data_ptr() and torch.equal(recorded, new)
    assert torch.equal(later_view, new[1])
    donation.release()
    assert recorded.numel() == later_view.numel() == 0
    assert new.untyped_storage().nbytes() == 24  # the output itself is untouched
    with pytest.raises(
        RuntimeError, match=r"output is \(3, 2\) strides \(2, 1\), recorded as \(2, 3\)"
    ):
        donation.give(torch.zeros(3, 2), args, {(5, 1): 2})
    # strides of dimensions of size 1 are no difference
    one = torch.zeros(2, 1)
    Donation(0, 0, (), ((one, 0, (2, 1), (1, 7)),), 1).give(torch.ones(2, 1), args, {})
    assert torch.equal(one, torch.ones(2, 1))


def test_an_output_handed_on_as_the_modules_own_stays_until_the_next_call() -> None:
    torch.manual_seed(2)
    module = nn.Sequential(nn.Conv2d(3, 8, 3)).eval()  # its output is a functional operator's
    recorded = Recorded(module, torch.randn(1, 3, 9, 9), donate=True)
    (donation,) = recorded.plan.donations
    assert donation.last == len(recorded.plan.calls) + len(recorded.plan.torch_steps)
    outs = []
    for _ in range(2):
        x = torch.randn(1, 3, 9, 9)
        with torch.no_grad():
            outs.append(recorded(x))
            assert torch.equal(outs[-1], module(x))
    assert not torch.equal(outs[0], outs[1])


def test_freed_memory_counts_as_kept_with_a_keeping_allocator(monkeypatch) -> None:
    monkeypatch.setattr(allocator, "_KEEPING", False)
    monkeypatch.setattr(allocator, "loaded_allocator", lambda: None)
    assert not allocator.freed_memory_kept()
    monkeypatch.setattr(allocator, "loaded_allocator", lambda: "tcmalloc")
    assert allocator.freed_memory_kept()
    monkeypatch.setattr(allocator, "loaded_allocator", lambda: None)
    assert allocator.keep_freed_memory() and allocator.freed_memory_kept()
