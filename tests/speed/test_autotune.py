"""The per-shape implementation chooser: it keeps the fastest candidate, the reference on close
calls, and remembers its choice per op, shape and thread count."""

from __future__ import annotations

import pytest
import torch

from resnext.speed.autotune import Chooser


class FakeClock:
    """A clock that each candidate advances by its own made-up cost, so timings are exact."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _candidates(clock: FakeClock, costs: dict[str, float], calls: dict[str, int]) -> dict:
    def make(name: str):
        def fn():
            calls[name] = calls.get(name, 0) + 1
            clock.now += costs[name]
            return name

        return fn

    return {name: make(name) for name in costs}


def test_the_fastest_candidate_wins_and_is_remembered() -> None:
    clock, calls = FakeClock(), {}
    chooser = Chooser(clock=clock, warmup=1, repeats=2)
    costs = {"ref": 1.0, "fast": 0.5, "slow": 2.0}
    assert chooser.run("op", (1,), _candidates(clock, costs, calls)) == "fast"
    assert calls == {"ref": 3, "fast": 3, "slow": 3}  # one warm-up + two timed rounds each
    # The second call at the same key runs the winner alone.
    assert chooser.run("op", (1,), _candidates(clock, costs, calls)) == "fast"
    assert calls == {"ref": 3, "fast": 4, "slow": 3}
    (decision,) = chooser.decisions()
    assert decision.winner == "fast" and decision.op == "op" and decision.key == (1,)
    assert decision.ms == {"ref": 1000.0, "fast": 500.0, "slow": 2000.0}


def test_excluded_candidates_never_run_and_the_reference_cannot_be_excluded() -> None:
    clock, calls = FakeClock(), {}
    exclude = {("op", "fast"), ("op", "ref"), ("other", "slow")}
    chooser = Chooser(clock=clock, warmup=1, repeats=2, exclude=exclude)
    costs = {"ref": 1.0, "fast": 0.5, "slow": 0.8}
    assert chooser.run("op", (1,), _candidates(clock, costs, calls)) == "slow"
    assert "fast" not in calls and calls["ref"] == 3  # excluded for "op" only: never called
    assert chooser.run("other", (1,), _candidates(clock, costs, calls)) == "fast"
    assert set(chooser.decisions()[0].ms) == {"ref", "slow"}


def test_the_reference_stays_unless_beaten_by_the_margin() -> None:
    clock, calls = FakeClock(), {}
    chooser = Chooser(clock=clock, margin=0.05)
    assert chooser.run("op", ("a",), _candidates(clock, {"ref": 1.0, "b": 0.97}, calls)) == "ref"
    assert chooser.run("op", ("b",), _candidates(clock, {"ref": 1.0, "b": 0.94}, calls)) == "b"


def test_each_round_keeps_a_candidates_best_time() -> None:
    # The challenger's first timed round is slow (a burst of load): its best round decides.
    clock = FakeClock()
    times = iter([5.0, 5.0, 0.5])  # warm-up, then two timed rounds

    def ref():
        clock.now += 1.0
        return "ref"

    def jittery():
        clock.now += next(times)
        return "jittery"

    assert Chooser(clock=clock, warmup=1, repeats=2).run("op", (), {"ref": ref, "j": jittery}) == (
        "jittery"
    )


def test_keys_ops_and_thread_counts_are_decided_separately() -> None:
    clock, calls = FakeClock(), {}
    chooser = Chooser(clock=clock)
    chooser.run("op", (1,), _candidates(clock, {"ref": 1.0, "x": 0.1}, calls))
    chooser.run("op", (2,), _candidates(clock, {"ref": 0.1, "x": 1.0}, calls))
    chooser.run("other", (1,), _candidates(clock, {"ref": 0.1, "x": 1.0}, calls))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1 if threads > 1 else 2)
        chooser.run("op", (1,), _candidates(clock, {"ref": 0.1, "x": 1.0}, calls))
    finally:
        torch.set_num_threads(threads)
    assert [d.winner for d in chooser.decisions()] == ["x", "ref", "ref", "ref"]
    chooser.clear()
    assert chooser.decisions() == []


def test_a_single_candidate_is_run_untimed() -> None:
    clock, calls = FakeClock(), {}
    chooser = Chooser(clock=clock)
    assert chooser.run("op", (), _candidates(clock, {"only": 1.0}, calls)) == "only"
    assert calls == {"only": 1} and chooser.decisions() == []


def test_prefer_pins_a_path_without_timing() -> None:
    clock, calls = FakeClock(), {}
    chooser = Chooser(clock=clock)
    with chooser.prefer("missing", "slow"):
        costs = {"ref": 1.0, "slow": 9.0}
        assert chooser.run("op", (), _candidates(clock, costs, calls)) == "slow"
        # An op offering none of the preferred names runs its reference.
        assert chooser.run("op2", (), _candidates(clock, {"ref": 1.0, "x": 0.1}, calls)) == "ref"
    assert calls == {"slow": 1, "ref": 1} and chooser.decisions() == []
    assert chooser.run("op", (), _candidates(clock, {"ref": 1.0, "slow": 9.0}, calls)) == "ref"


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"margin": 1.0}, "margin"), ({"margin": -0.1}, "margin"), ({"repeats": 0}, "repeats")],
)
def test_bad_settings_are_refused_by_name(kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        Chooser(**kwargs)


def test_no_candidates_is_refused_by_op_name() -> None:
    with pytest.raises(ValueError, match=r"conv\.forward: no candidate"):
        Chooser().run("conv.forward", (), {})


def test_real_work_is_timed() -> None:
    # With the real clock, a candidate doing ~50x the work of the reference does not win.
    a = torch.randn(64, 64)
    big = torch.randn(400, 400)
    chooser = Chooser()
    result = chooser.run("mm", (), {"small": lambda: a @ a, "big": lambda: (big @ big) @ big})
    assert result.shape == (64, 64)
    (decision,) = chooser.decisions()
    assert decision.winner == "small" and decision.ms["big"] > decision.ms["small"]


def test_kept_timings_choose_in_a_new_chooser_without_timing(tmp_path) -> None:
    from resnext.speed.timing_cache import TimingCache

    clock, calls = FakeClock(), {}
    costs = {"ref": 1.0, "fast": 0.5}
    first = Chooser(clock=clock, warmup=1, repeats=2)
    with first.using(TimingCache(tmp_path)):
        assert first.run("op", (7,), _candidates(clock, costs, calls)) == "fast"
    assert calls == {"ref": 3, "fast": 3}
    # Another process: the kept times decide, and only the winner runs, once.
    calls.clear()
    second = Chooser(clock=clock, warmup=1, repeats=2)
    with second.using(TimingCache(tmp_path)):
        assert second.run("op", (7,), _candidates(clock, costs, calls)) == "fast"
        assert calls == {"fast": 1}
        (decision,) = second.decisions()
        assert decision.winner == "fast" and decision.ms == pytest.approx({"ref": 1e3, "fast": 5e2})
        assert decision.stored and decision.as_dict()["stored"] is True
        # another shape is timed as usual
        assert second.run("op", (8,), _candidates(clock, costs, calls)) == "fast"
        assert calls == {"fast": 4, "ref": 3}
        assert not second.decisions()[1].stored
    # outside the block nothing is read: a fresh chooser times again
    calls.clear()
    third = Chooser(clock=clock, warmup=1, repeats=2)
    assert third.run("op", (7,), _candidates(clock, costs, calls)) == "fast"
    assert calls == {"ref": 3, "fast": 3}


def test_kept_timings_keep_the_margin_rule(tmp_path) -> None:
    from resnext.speed.timing_cache import TimingCache

    clock, calls = FakeClock(), {}
    close = {"ref": 1.0, "fast": 0.97}  # within the 5 % margin: the reference stays
    first = Chooser(clock=clock, warmup=0, repeats=1)
    with first.using(TimingCache(tmp_path)):
        assert first.run("op", (1,), _candidates(clock, close, calls)) == "ref"
    second = Chooser(clock=clock, warmup=0, repeats=1)
    with second.using(TimingCache(tmp_path)):
        assert second.run("op", (1,), _candidates(clock, close, calls)) == "ref"
