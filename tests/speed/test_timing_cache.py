"""The on-disk timing cache: stored times come back, bad files and entries are re-timed, and a
second `optimize` of the same model on this machine times nothing and chooses alike."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tensor_checks import rel_err

import resnext
from resnext.errors import ConfigError
from resnext.speed import timing_cache
from resnext.speed.fastpath import optimize
from resnext.speed.grouped_kernel import unavailable_reason
from resnext.speed.pointwise_fma import unavailable_reason as fma_unavailable_reason
from resnext.speed.timing_cache import TimingCache, cached


class Counter:
    """A `measure` that returns fixed times and counts its calls."""

    def __init__(self, times: list[float]) -> None:
        self.times, self.calls = times, 0

    def __call__(self) -> list[float]:
        self.calls += 1
        return list(self.times)


def test_times_come_back_in_a_new_process_object(tmp_path: Path) -> None:
    measure = Counter([3.5, 1.25])
    first = TimingCache(tmp_path)
    assert cached(first, "k", 2, measure) == [3.5, 1.25]
    first.save()
    second = TimingCache(tmp_path)
    assert cached(second, "k", 2, measure) == [3.5, 1.25]
    assert measure.calls == 1
    assert (second.hits, second.misses) == (1, 0)
    # without a cache every call measures
    assert cached(None, "k", 2, measure) == [3.5, 1.25]
    assert measure.calls == 2


def test_nothing_is_written_until_save_and_only_when_new(tmp_path: Path) -> None:
    cache = TimingCache(tmp_path)
    cached(cache, "k", 1, Counter([2.0]))
    assert not cache.path.exists()
    cache.save()
    stamp = cache.path.stat().st_mtime_ns
    again = TimingCache(tmp_path)
    cached(again, "k", 1, Counter([9.0]))  # a hit: nothing new
    again.save()
    assert cache.path.stat().st_mtime_ns == stamp


def test_corrupt_file_is_ignored_with_a_warning_and_replaced(tmp_path: Path) -> None:
    path = TimingCache(tmp_path).path
    path.write_text("{ not json")
    with pytest.warns(RuntimeWarning, match="not a timing cache of this context"):
        cache = TimingCache(tmp_path)
    measure = Counter([4.0, 5.0])
    assert cached(cache, "k", 2, measure) == [4.0, 5.0]
    assert measure.calls == 1
    cache.save()
    assert json.loads(path.read_text())["entries"] == {"k": [4.0, 5.0]}


def test_a_file_of_undecodable_bytes_is_ignored_with_a_warning_and_replaced(tmp_path: Path) -> None:
    path = TimingCache(tmp_path).path
    path.write_bytes(b"\xff\xfe\x00\x81garbage")  # not UTF-8
    with pytest.warns(RuntimeWarning, match="not a timing cache of this context"):
        cache = TimingCache(tmp_path)
    cached(cache, "k", 1, Counter([4.0]))
    cache.save()
    assert json.loads(path.read_text())["entries"] == {"k": [4.0]}


@pytest.mark.parametrize("bad", ["fast", [1.0, "2"], [1.0, -2.0], [float("nan"), 1.0], [], [True]])
def test_malformed_entries_are_measured_again(tmp_path: Path, bad: object) -> None:
    cache = TimingCache(tmp_path)
    document = {"context": cache.context, "entries": {"k": bad, "good": [1.0, 2.0]}}
    cache.path.write_text(json.dumps(document))
    reread = TimingCache(tmp_path)
    measure = Counter([6.0, 7.0])
    assert cached(reread, "k", 2, measure) == [6.0, 7.0]
    assert cached(reread, "good", 2, measure) == [1.0, 2.0]
    assert measure.calls == 1


def test_an_entry_with_another_count_of_ways_is_measured_again(tmp_path: Path) -> None:
    cache = TimingCache(tmp_path)
    cached(cache, "k", 2, Counter([1.0, 2.0]))
    measure = Counter([1.0, 2.0, 3.0])
    assert cached(cache, "k", 3, measure) == [1.0, 2.0, 3.0]
    assert measure.calls == 1


def test_a_measure_with_the_wrong_count_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="expected 3 times"):
        cached(TimingCache(tmp_path), "k", 3, Counter([1.0]))
    with pytest.raises(ValueError, match="finite positive"):
        TimingCache(tmp_path).store("k", [0.0])
    # a time that cannot be kept is still used, and measured again next time
    cache, measure = TimingCache(tmp_path), Counter([0.0, float("inf")])
    assert cached(cache, "k", 2, measure) == [0.0, float("inf")]
    assert cached(cache, "k", 2, measure) == [0.0, float("inf")]
    assert measure.calls == 2


def test_another_context_uses_another_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    here = TimingCache(tmp_path)
    cached(here, "k", 1, Counter([1.0]))
    here.save()
    monkeypatch.setattr(torch, "get_num_threads", lambda: 97)  # as if run with other threads
    elsewhere = TimingCache(tmp_path)
    assert elsewhere.path != here.path and elsewhere.context["threads"] == 97
    measure = Counter([8.0])
    assert cached(elsewhere, "k", 1, measure) == [8.0]
    assert measure.calls == 1


def test_a_changed_kernel_source_starts_a_new_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = TimingCache(tmp_path).path
    monkeypatch.setattr(timing_cache, "_speed_sources_digest", lambda: "another revision")
    assert TimingCache(tmp_path).path != before


def test_two_writers_keep_both_entries(tmp_path: Path) -> None:
    a, b = TimingCache(tmp_path), TimingCache(tmp_path)
    cached(a, "from a", 1, Counter([1.0]))
    cached(b, "from b", 1, Counter([2.0]))
    a.save()
    b.save()
    entries = json.loads(a.path.read_text())["entries"]
    assert entries == {"from a": [1.0], "from b": [2.0]}


def test_an_unwritable_folder_warns_and_keeps_going(tmp_path: Path) -> None:
    blocker = tmp_path / "a file"
    blocker.write_text("not a folder")
    with pytest.warns(RuntimeWarning, match="not read"):
        cache = TimingCache(blocker)
    cached(cache, "k", 1, Counter([1.0]))
    with pytest.warns(RuntimeWarning, match="not saved"):
        cache.save()
    assert blocker.read_text() == "not a folder"


def test_default_folder_follows_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RESNEXT_TIMING_CACHE", "/some/where")
    assert timing_cache.default_folder() == Path("/some/where")
    monkeypatch.delenv("RESNEXT_TIMING_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", "/xdg")
    assert timing_cache.default_folder() == Path("/xdg/resnext/timings")


def test_optimize_refuses_a_bad_timing_cache_argument() -> None:
    model = resnext.create_model("resnext29_4x16d")
    with pytest.raises(ConfigError, match="timing_cache"):
        optimize(model, backend="none", timing_cache=3.5)  # type: ignore[arg-type]


@pytest.mark.skipif(
    unavailable_reason() is not None and fma_unavailable_reason() is not None,
    reason="none of our float32 kernels runs on this CPU, so optimize times nothing here",
)
def test_second_optimize_times_nothing_and_chooses_alike(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = resnext.create_model("resnext29_4x16d").eval()
    x = torch.randn(2, 3, 32, 32)
    first = optimize(model, backend="none", example_input=x, timing_cache=tmp_path)
    assert first.timing_cache.misses > 0
    second = optimize(model, backend="none", example_input=x, timing_cache=tmp_path)
    assert second.timing_cache.misses == 0
    assert second.timing_cache.hits == first.timing_cache.hits + first.timing_cache.misses
    for kind in ("grouped_choices", "pointwise_choices", "conv_x3_choices", "stem_choices"):
        # times identical to the last bit: read back, not measured again
        assert getattr(second, kind) == getattr(first, kind), kind
    with torch.no_grad():
        expected = model(x)
        assert rel_err(second(x), expected) < 1e-4


@pytest.mark.skipif(
    unavailable_reason() is not None, reason="our grouped kernel does not run here: nothing timed"
)
def test_without_a_cache_twins_are_timed_once_and_nothing_is_written(tmp_path: Path) -> None:
    model = resnext.create_model("resnext29_4x16d").eval()
    x = torch.randn(2, 3, 32, 32)
    fast = optimize(model, backend="none", example_input=x)
    grouped = fast.grouped_choices
    # ResNeXt-29's stages have 3 blocks each; layers of one input shape are twins here
    by_shape: dict[tuple, set] = {}
    for choice in grouped:
        by_shape.setdefault(choice.input_shape, set()).add((choice.native_ms, choice.kernel_ms))
    assert len(grouped) == 9 and all(len(times) == 1 for times in by_shape.values())
    assert fast.timing_cache.hits >= 9 - len(by_shape) and fast.timing_cache.path is None
    assert not list(timing_cache.default_folder().glob("*"))  # conftest's folder stays empty
    with torch.no_grad():
        assert rel_err(fast(x), model(x)) < 1e-4
