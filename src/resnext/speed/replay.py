"""A fast-path forward replayed without Python: our kernels' C calls recorded once, made again.

At batch 1 the fast path's time is partly Python: each of ResNeXt-50's ~50 kernel calls costs
~20 µs of operator dispatch, argument checks, output allocation and ctypes, and the compiled
graph adds its wrapper and guards. `capture` runs a module once while recording each C call of
our libraries (function, integer and pointer arguments, return value) and each torch operator
that computes outside them, keeping every tensor they touch; `Plan.run` then makes the C calls
again from a C loop (`kernels/replay.c`) and the torch operators from Python, on the same
memory, which `replay_memory` lays out in one arena. `Replayed` is the module `optimize(...,
backend="replay")` returns: it copies each input into the recorded input's memory, replays,
and returns a copy of the output.

A recording is refused (`ReplayUnavailable`, saying why) where replaying could compute something
else: a kernel given memory the recording does not keep, an argument that is not an integer or
pointer, a function without declared argument types, or a replay that does not reproduce the
module's output bit for bit on a fresh input.
"""

from __future__ import annotations

import ctypes
import functools
import platform
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from resnext import native
from resnext.speed import replay_memory
from resnext.speed.allocator import freed_memory_kept
from resnext.speed.operators import NAMESPACE
from resnext.speed.replay_steps import Call, Donation, TorchStep
from resnext.speed.shapes import check_new_shapes, input_key

SOURCE = Path(__file__).with_name("kernels") / "replay.c"
# What a torch operator costs a replay beyond its own time, for the choosers to weigh: the first
# operator after our kernels runs Python and torch's dispatch on caches they have filled (measured
# on the Xeon at batch 1: a 64-value add took 119 µs there, a pooling 282 against 47 µs when run
# again at once), and a functional one's output is copied into the recorded tensor.
TORCH_STEP_MS = 0.2
FLAGS = ("-O2",)
# ctypes argument types a recorded call may have: each travels as one 64-bit integer
_INTEGER_TYPES = (
    ctypes.c_void_p,
    ctypes.c_int,
    ctypes.c_uint,
    ctypes.c_long,
    ctypes.c_ulong,
    ctypes.c_longlong,
    ctypes.c_ulonglong,
)
# torch operators that only allocate memory or describe it again (no values computed)
_PASSIVE = frozenset(
    {
        "aten::empty.memory_format",
        "aten::empty_strided",
        "aten::empty_like",
        "aten::new_empty",
        "aten::new_empty_strided",
        "aten::detach",
        "aten::alias",
        "aten::lift_fresh",
        "aten::resize_",
        "aten::as_strided_",
    }
)


_RECORDING = threading.Lock()


class ReplayUnavailable(RuntimeError):
    """A forward cannot be recorded for replay here, with why."""


@functools.lru_cache(maxsize=1)
def _library() -> ctypes.CDLL:
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        raise native.NativeUnavailable(
            f"replaying kernel calls needs x86-64 Linux, this is {platform.system()} "
            f"{platform.machine()}"
        )
    lib = native.load(SOURCE, FLAGS)
    lib.replay_run.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int, ctypes.c_void_p]
    lib.replay_run.restype = ctypes.c_int
    lib.replay_max_args.argtypes = []
    lib.replay_max_args.restype = ctypes.c_int
    return lib


@functools.lru_cache(maxsize=1)
def unavailable_reason() -> str | None:
    """None if calls can be replayed here, else why not (one line; decided once per process)."""
    return native.problem(_library)


class Plan:
    """Recorded steps, ready to be made again in the order they were recorded: each run of
    consecutive C calls in one call of the C loop, each torch operator from Python."""

    def __init__(
        self,
        steps: list[Call | TorchStep],
        keep: list[torch.Tensor],
        donations: Sequence[Donation] = (),
    ) -> None:
        lib = _library()
        width = lib.replay_max_args()
        calls = [s for s in steps if isinstance(s, Call)]
        n = len(calls)
        self.donations = tuple(donations)
        self.calls = tuple(calls)
        self.torch_steps = tuple(s for s in steps if isinstance(s, TorchStep))
        self._keep = keep  # the memory the steps read and write
        self._fns = (ctypes.c_void_p * n)(*(c.address for c in calls))
        self._args = (ctypes.c_long * (n * width))()
        for i, call in enumerate(calls):
            if len(call.args) > width:
                raise ReplayUnavailable(
                    f"{call.name} takes {len(call.args)} arguments; the replay loop passes {width}"
                )
            for j, value in enumerate(call.args):
                self._args[i * width + j] = value
        self._returns = (ctypes.c_uint8 * n)(*(c.value is not None for c in calls))
        self._expect = (ctypes.c_int * n)(*(c.value or 0 for c in calls))
        # the program: (first call, calls) for a run of C calls, or a torch step
        self._program: list[tuple[int, int] | TorchStep] = []
        entry_of, slot_index = [], {}  # each step's program entry; (C step, argument) → place
        i = 0
        for k, step in enumerate(steps):
            if isinstance(step, TorchStep):
                self._program.append(step)
                entry_of.append(len(self._program) - 1)
                continue
            slot_index.update({(k, j): i * width + j for j in range(len(step.args))})
            last = self._program[-1] if self._program else None
            if isinstance(last, tuple):
                self._program[-1] = (last[0], last[1] + 1)
            else:
                self._program.append((i, 1))
            entry_of.append(len(self._program) - 1)
            i += 1
        self._slot_index = slot_index
        # after which program entry each donation is given, and let go of
        self._gives: dict[int, dict[int, Donation]] = {}
        self._releases: dict[int, list[Donation]] = {}
        for donation in self.donations:
            self._gives.setdefault(entry_of[donation.step], {})[donation.out] = donation
            if donation.last < len(steps):
                self._releases.setdefault(entry_of[donation.last], []).append(donation)
        self._runs = {
            first: (
                ctypes.addressof(self._fns) + first * ctypes.sizeof(ctypes.c_void_p),
                ctypes.addressof(self._args) + first * width * ctypes.sizeof(ctypes.c_long),
                ctypes.addressof(self._returns) + first,
                ctypes.addressof(self._expect) + first * ctypes.sizeof(ctypes.c_int),
            )
            for first, _ in (p for p in self._program if isinstance(p, tuple))
        }

    def run(self) -> None:
        """Make every step again; a RuntimeError naming the first C call whose value differs
        from the recording (nothing after it is run)."""
        self._run(None)

    def profile(self) -> list[tuple[str, float]]:
        """Make every step again, timing each: (C function or torch operator, ms), in order.
        The C calls are timed inside the loop, so their times are those of the real sequence."""
        ms = (ctypes.c_double * max(len(self.calls), 1))()
        return self._run(ms)

    def _run(self, ms: ctypes.Array | None) -> list[tuple[str, float]]:
        replay_run = _library().replay_run
        times: list[tuple[str, float]] = []
        for entry, step in enumerate(self._program):
            if isinstance(step, TorchStep):
                start = time.perf_counter()
                step.run(self._gives.get(entry), self._args, self._slot_index)
                if ms is not None:
                    times.append((str(step.op), (time.perf_counter() - start) * 1e3))
            else:
                first, count = step
                at = None if ms is None else ctypes.addressof(ms) + first * ctypes.sizeof(ms._type_)
                failed = replay_run(*self._runs[first], count, at)
                if failed:
                    call = self.calls[first + failed - 1]
                    raise RuntimeError(
                        f"replay: {call.name} (call {first + failed}) returned another value "
                        "than when recorded"
                    )
                if ms is not None:
                    times += [(self.calls[i].name, ms[i]) for i in range(first, first + count)]
            for donation in self._releases.get(entry, ()):
                donation.release()
        return times


def _signed64(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


def _as_integer(arg: object, kind: type) -> int:
    if arg is None:
        return 0
    if isinstance(arg, bool) or not isinstance(arg, int):
        raise ReplayUnavailable(
            f"an argument of type {type(arg).__name__} where {kind.__name__} was expected"
        )
    return _signed64(arg & ((1 << 64) - 1))


class _Recording:
    """While entered, every function of our loaded libraries appends its calls to `steps` (then
    calls on)."""

    def __init__(self, steps: list[Call | TorchStep]) -> None:
        self.steps = steps
        self.problems: list[str] = []
        self._patched: list[tuple[ctypes.CDLL, str, object]] = []
        self._names: list[tuple[ctypes.CDLL, frozenset[str]]] = []
        self._thread = threading.get_ident()  # other threads' calls are not this forward's

    def __enter__(self) -> _Recording:
        for lib in native.loaded():
            for name, fn in list(vars(lib).items()):
                if isinstance(fn, ctypes._CFuncPtr):
                    setattr(lib, name, self._wrap(name, fn))
                    self._patched.append((lib, name, fn))
            self._names.append((lib, frozenset(vars(lib))))
        return self

    def __exit__(self, *exc: object) -> None:
        for lib, name, fn in self._patched:
            setattr(lib, name, fn)
        # a function first looked up during the recording was called unrecorded
        for lib, before in self._names:
            for name in set(vars(lib)) - before:
                if isinstance(vars(lib)[name], ctypes._CFuncPtr):
                    self.problems.append(f"{name} was called without being recorded")

    def _wrap(self, name: str, fn: ctypes._CFuncPtr) -> Callable[..., object]:
        def recorded(*args: object) -> object:
            value = fn(*args)
            if threading.get_ident() == self._thread:
                self._record(name, fn, args, value)
            return value

        return recorded

    def _record(
        self, name: str, fn: ctypes._CFuncPtr, args: tuple[object, ...], value: object
    ) -> None:
        kinds = fn.argtypes
        if kinds is None or len(kinds) != len(args):
            self.problems.append(f"{name} has no declared argument types")
            return
        if fn.restype not in (ctypes.c_int, None):
            self.problems.append(f"{name} returns {fn.restype.__name__}, not int")
            return
        try:
            ints = []
            for arg, kind in zip(args, kinds, strict=True):
                if not issubclass(kind, _INTEGER_TYPES):
                    raise ReplayUnavailable(f"an argument of type {kind.__name__}")
                ints.append(_as_integer(arg, kind))
        except ReplayUnavailable as exc:
            self.problems.append(f"{name}: {exc}")
            return
        address = ctypes.cast(fn, ctypes.c_void_p).value
        assert address is not None
        pointers = tuple(j for j, kind in enumerate(kinds) if kind is ctypes.c_void_p)
        self.steps.append(Call(name, address, tuple(ints), value if fn.restype else None, pointers))


class _Watch(TorchDispatchMode):
    """Keeps every tensor torch operators return, and appends those that compute outside our
    kernels to `steps` as TorchSteps (our operators' C calls are recorded by _Recording)."""

    def __init__(self, steps: list[Call | TorchStep]) -> None:
        super().__init__()
        self.steps = steps
        self.kept: list[torch.Tensor] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        outs = tuple(t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor))
        self.kept.extend(outs)
        name = func.name()
        if not (name.startswith(f"{NAMESPACE}::") or name in _PASSIVE or func.is_view):
            writes = func._schema.is_mutable
            self.steps.append(TorchStep(func, tuple(args), dict(kwargs), outs, writes))
        return out


def module_tensors(module: nn.Module) -> list[torch.Tensor]:
    """Every tensor `module` and its submodules hold: parameters, buffers and plain attributes
    (packed weights)."""
    found = []
    for m in module.modules():
        for value in [*m._parameters.values(), *m._buffers.values(), *vars(m).values()]:
            if isinstance(value, torch.Tensor):
                found.append(value)
            elif isinstance(value, (list, tuple)):
                found.extend(v for v in value if isinstance(v, torch.Tensor))
    return found


def _spans(tensors: list[torch.Tensor]) -> list[tuple[int, int]]:
    spans = []
    for t in tensors:
        if t.layout != torch.strided:  # oneDNN's packed weights: no address a kernel of ours gets
            continue
        storage = t.untyped_storage()
        start = storage.data_ptr()
        spans.append((start, start + storage.nbytes()))
    return sorted(spans)


def _inside(address: int, spans: list[tuple[int, int]]) -> bool:
    return any(a <= address <= b for a, b in spans)


def capture(
    module: nn.Module, x: torch.Tensor, donate: bool | None = None
) -> tuple[Plan, torch.Tensor]:
    """Run ``module(x)`` once without gradients, recording its steps: the plan that repeats them
    on `x`'s memory (refill `x` first) and the output they write. A ReplayUnavailable says why
    the forward cannot be replayed. `donate`: hand functional torch operators' outputs on
    (`replay_steps.Donation`) rather than copy them; by default where this process keeps freed
    memory (`allocator.freed_memory_kept`)."""
    if donate is None:
        donate = freed_memory_kept()
    reason = unavailable_reason()
    if reason is not None:
        raise ReplayUnavailable(reason)
    steps: list[Call | TorchStep] = []
    watch = _Watch(steps)
    # one recording at a time: each wraps the libraries' functions for its own thread
    with _RECORDING, torch.no_grad(), _Recording(steps) as recording, watch:
        out = module(x)
    problems = list(recording.problems)
    if not isinstance(out, torch.Tensor):
        problems.append(f"the module returned a {type(out).__name__}, not a tensor")
    weights = module_tensors(module)
    spans = _spans([x, *watch.kept, *weights])
    strays = sorted(
        {
            step.name
            for step in steps
            if isinstance(step, Call)
            for j in step.pointers
            if step.args[j] and not _inside(step.args[j], spans)
        }
    )
    if strays:
        problems.append(f"{', '.join(strays)} got memory the capture does not keep")
    if problems:
        raise ReplayUnavailable("; ".join(problems))
    fixed = {t.untyped_storage().data_ptr() for t in [x, *weights] if t.layout == torch.strided}
    made = [
        t
        for t in watch.kept
        if t.layout == torch.strided and t.untyped_storage().data_ptr() not in fixed
    ]
    # where freed memory is kept for reuse, a functional operator's new output costs no page
    # faults: hand it on rather than copy it into the arena
    donated = replay_memory.donatable(steps, made) if donate else []
    steps, arena, out, left, donations = replay_memory.pack(
        steps, made, out, [x, *weights], donated
    )
    return Plan(steps, [x, arena, out, *weights, *left], donations), out


def recording_key(x: torch.Tensor) -> tuple[object, ...]:
    """What a recording is bound to: the input as a compiled graph tells inputs apart
    (`shapes.input_key`), and the threads the kernels were told to use."""
    return (*input_key(x), torch.get_num_threads())


class Recorded:
    """One capture of a module on one kind of input: its input's memory, plan and output."""

    def __init__(
        self, module: nn.Module, example: torch.Tensor, donate: bool | None = None
    ) -> None:
        if example.device.type != "cpu":
            raise ReplayUnavailable(f"example: expected a CPU tensor, got one on {example.device}")
        self.input = example.detach().clone()
        self.plan, self.output = capture(module, self.input, donate)
        self.check(module, torch.randn_like(self.input))

    def check(self, module: nn.Module, x: torch.Tensor) -> None:
        """A ReplayUnavailable unless replaying on `x` gives the module's own output bit for bit
        (a value computed outside the recorded steps would have stayed as recorded)."""
        with torch.no_grad():
            want = module(x)
        got = self(x)
        if not torch.equal(want, got):
            raise ReplayUnavailable(
                "the replay does not reproduce the module's output on a fresh input (largest "
                f"difference {(want.float() - got.float()).abs().max().item():.3g})"
            )

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.input.copy_(x)
        self.plan.run()
        return self.output.clone()


class Replayed(nn.Module):
    """A module run by replaying its recorded steps (`capture`), one recording per kind of input
    (`recording_key`): made in `build`, and for an input unlike every one so far when it comes
    (`new_shapes` 'compile', ~2 forwards' time) or never ('eager': such inputs run on the module
    itself, the same function). Where an input cannot be recorded (`ReplayUnavailable`) it runs
    on the module with a warning, once. Everything runs without gradients; outputs are new
    tensors; calls are serialised, since a recording reuses its memory; a copy records afresh.
    """

    def __init__(self, module: nn.Module, new_shapes: str = "compile") -> None:
        super().__init__()
        check_new_shapes(new_shapes)
        self.module = module
        self.new_shapes = new_shapes
        self.recordings: dict[tuple[object, ...], Recorded | None] = {}
        self._stale: set[tuple[object, ...]] = set()  # recorded by the module this was copied from
        self._lock = threading.Lock()

    def __getstate__(self) -> dict[str, object]:
        # A recording's addresses belong to this object's memory: a copy (copy.deepcopy) records
        # again, when an input of each kind recorded here first comes.
        state = self.__dict__.copy()
        state["_stale"] = self._stale | {k for k, r in self.recordings.items() if r is not None}
        state["recordings"] = {}
        del state["_lock"]
        return state

    def __setstate__(self, state: dict[str, object]) -> None:
        super().__setstate__(state)
        self._lock = threading.Lock()

    def build(self, x: torch.Tensor) -> torch.Tensor:
        """Record for inputs like `x` (if not yet) and run it; a ReplayUnavailable says why not."""
        with self._lock:
            key = recording_key(x)
            if self.recordings.get(key) is None:
                self.recordings[key] = Recorded(self.module, x)
            return self.recordings[key](x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"input: expected a torch.Tensor, got {type(x).__name__}")
        key = recording_key(x)
        if key not in self.recordings and (self.new_shapes == "compile" or key in self._stale):
            try:
                return self.build(x)
            except ReplayUnavailable as exc:
                warnings.warn(
                    f"replay: inputs like {tuple(x.shape)} {x.dtype} run without it ({exc})",
                    RuntimeWarning,
                    stacklevel=2,
                )
                self.recordings[key] = None
        recorded = self.recordings.get(key)
        if recorded is None:
            with torch.no_grad():
                return self.module(x)
        with self._lock:
            return recorded(x)
