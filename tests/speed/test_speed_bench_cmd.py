"""`resnext bench infer|train|data`: each runs end to end on a tiny model and writes its record."""

from __future__ import annotations

import argparse
import json
import tempfile
from collections import Counter
from pathlib import Path

import pytest
import torch

import resnext
from resnext.commands import bench_cmd
from resnext.errors import ConfigError, DataError
from resnext.speed import infer_bench, peers, pointwise_fp16, replay, train_bench
from resnext.speed.measure import (
    Timing,
    interleaved,
    matmul_probe,
    median_ratio,
    medians_by_phase,
    model_pairs,
    phase_lines,
    ratios,
    ratios_by_phase,
)


def _args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    bench_cmd.add_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(["bench", *argv, "--allocator", "none"])


def _record(out: Path) -> dict:
    files = sorted(out.glob("*.json"))
    assert len(files) == 1
    return json.loads(files[0].read_text())


def test_bench_infer_writes_results_with_provenance(tmp_path: Path) -> None:
    args = _args(
        ["infer", "--models", "resnext_tiny", "--variants", "eager,eager-fast-fp32",
         "--batch", "2", "--image-size", "32", "--rounds", "2", "--iters", "1",
         "--out", str(tmp_path)]
    )  # fmt: skip
    assert bench_cmd.run(args) == 0
    record = _record(tmp_path)
    rows = record["results"]["throughput"]
    assert set(rows) == {"resnext_tiny/eager", "resnext_tiny/eager-fast-fp32"}
    assert rows["resnext_tiny/eager-fast-fp32"]["max_rel_err"] < 1e-4
    # one probe rate per round, the same for every variant, and the per-round ratios by phase
    rates = rows["resnext_tiny/eager"]["probe_gflops"]
    assert len(rates) == 2 and all(g > 0 for g in rates)
    assert rows["resnext_tiny/eager-fast-fp32"]["probe_gflops"] == rates
    by_phase = record["results"]["by_phase"]
    assert by_phase["reference"] == "resnext_tiny/eager"
    assert by_phase["time_ratios"]["resnext_tiny/eager"]["all"] == 1.0
    assert record["config"]["batch"] == 2
    assert record["versions"]["torch"] and "git_commit" in record and "machine" in record


def test_bench_infer_times_batch_1_for_every_variant(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # ONNX Runtime where installed (OpenVINO, loaded into the test process, made a later training
    # test crash)
    temp_root = tmp_path / "tmp"
    temp_root.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp_root))
    variants = "eager,eager-fast-fp32" + (",ort-fp32" if peers.available("onnxruntime") else "")
    if replay.unavailable_reason() is None:
        variants += ",replay-fp32"
    args = _args(
        ["infer", "--models", "resnext_tiny", "--variants", variants, "--batch", "2",
         "--image-size", "32", "--rounds", "1", "--iters", "1", "--latency-rounds", "1",
         "--out", str(tmp_path)]
    )  # fmt: skip
    assert bench_cmd.run(args) == 0
    assert not any(p.name.startswith("resnext") for p in temp_root.iterdir())  # no ONNX files left
    results = _record(tmp_path)["results"]
    if "replay-fp32" in variants:  # which exit weight its choosers used, one of the two tried
        exit_ms = results["throughput"]["resnext_tiny/replay-fp32"]["replay_exit_ms"]
        assert exit_ms in (0.0, replay.TORCH_STEP_MS)
    latency = results["latency_batch1"]
    assert set(latency) == {f"resnext_tiny/{v}" for v in variants.split(",")}
    assert all(row["median_ms"] > 0 for row in latency.values())
    # one round: its probe rate is the median, so the round counts as a faster one
    assert all(len(row["probe_gflops"]) == 1 for row in latency.values())
    assert all(
        row["median_ms_by_phase"] == {"all": row["median_ms"], "faster": row["median_ms"]}
        for row in latency.values()
    )


@pytest.mark.skipif(
    pointwise_fp16.unavailable_reason() is not None,
    reason=f"fp16 kernel unavailable: {pointwise_fp16.unavailable_reason()}",
)
def test_the_fp16_variants_weigh_float16_products_and_the_fp32_ones_do_not() -> None:
    torch.manual_seed(0)
    model = resnext.create_model("resnext_tiny").eval()
    x = torch.randn(2, 3, 32, 32)
    weighed = {}
    for variant in ("eager-fast-fp16", "eager-fast-fp32"):
        fn, _ = infer_bench.build_runner(variant, model, x)
        weighed[variant] = [c.variant for c in fn.pointwise_choices if c.variant.startswith("fp16")]
        with torch.no_grad():
            error = (fn(x) - model(x)).abs().max() / model(x).abs().max()
        assert error < (1e-2 if variant.endswith("fp16") else 1e-4)
    assert weighed["eager-fast-fp16"] and not weighed["eager-fast-fp32"]


@pytest.mark.parametrize("share", [False, True])
def test_bench_infer_shares_one_timing_cache_per_model_when_asked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, share: bool
) -> None:
    caches: list[tuple[str, object]] = []
    original = infer_bench.optimize

    def recording(model, *args, **kwargs):  # type: ignore[no-untyped-def]
        caches.append((type(model).__name__ + str(model.fc.in_features), kwargs["timing_cache"]))
        return original(model, *args, **kwargs)

    monkeypatch.setattr(infer_bench, "optimize", recording)
    argv = ["infer", "--models", "resnext_tiny,resnext_tiny_in", "--variants", "eager-fast-fp32",
            "--batch", "2", "--image-size", "32", "--rounds", "1", "--iters", "1",
            "--latency-rounds", "1", "--out", str(tmp_path)]  # fmt: skip
    assert bench_cmd.run(_args([*argv, "--share-timings"] if share else argv)) == 0
    assert _record(tmp_path)["config"]["share_timings"] is share
    assert len(caches) == 4  # two models, each built for batch 2 and for batch 1
    if not share:
        assert all(cache is None for _, cache in caches)
        return
    first, second = caches[:2], caches[2:]
    assert first[0][1] is first[1][1] and second[0][1] is second[1][1]  # per model, one cache
    assert first[0][1] is not second[0][1] and first[0][1] is not None
    assert first[0][1].misses > 0  # the layers timed, their times kept there


def test_bench_train_runs_a_real_step(tmp_path: Path) -> None:
    args = _args(
        ["train", "--models", "resnext_tiny", "--variants",
         "eager-fp32,cl-bf16-ckpt,cl-bf16-fused-grouped-gemm", "--batch", "2", "--image-size", "32",
         "--rounds", "1", "--warmup-rounds", "1", "--out", str(tmp_path)]
    )  # fmt: skip
    assert bench_cmd.run(args) == 0
    record = _record(tmp_path)
    rows = record["results"]["throughput"]
    assert len(rows) == 3 and all(row["throughput"] > 0 for row in rows.values())
    assert all(len(row["probe_gflops"]) == 1 for row in rows.values())
    assert set(record["results"]["by_phase"]["time_ratios"]) == set(rows)
    assert record["config"]["warmup_rounds"] == 1


def test_bench_data_against_pillow(tmp_path: Path, imagenet_sample: Path) -> None:
    args = _args(
        ["data", "--root", str(imagenet_sample), "--limit", "3", "--rounds", "1",
         "--workers", "0", "1", "--out", str(tmp_path)]
    )  # fmt: skip
    assert bench_cmd.run(args) == 0
    results = _record(tmp_path)["results"]
    assert results["ratio_to_first"]["pillow-baseline"] == pytest.approx(1.0)
    assert {"resnext-planned", "resnext-planned-no-color"} <= set(results["ratio_to_first"])
    assert set(results["loader_images_per_s"]) == {"0", "1"}
    assert all(rate > 0 for rate in results["loader_images_per_s"].values())


def test_bad_inputs_are_project_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^--variants: unknown \['tensorrt'\]"):
        bench_cmd.run(_args(["infer", "--variants", "eager,tensorrt", "--out", str(tmp_path)]))
    with pytest.raises(ConfigError, match=r"^--warmup-rounds: expected an integer >= 0"):
        bench_cmd.run(_args(["train", "--warmup-rounds", "-1", "--out", str(tmp_path)]))
    with pytest.raises(DataError, match=r"no \.JPEG"):
        bench_cmd.run(_args(["data", "--root", str(tmp_path), "--out", str(tmp_path)]))
    assert not list(tmp_path.glob("*.json"))  # nothing half-written


class _Ran(Exception):
    """Raised by a benchmark's run in place of timing anything."""


def _no_timing(monkeypatch: pytest.MonkeyPatch) -> None:
    def ran(*args: object, **kwargs: object) -> None:
        raise _Ran

    monkeypatch.setattr(infer_bench, "run_infer_bench", ran)
    monkeypatch.setattr(train_bench, "run_train_bench", ran)


def test_an_out_that_is_a_file_is_refused_before_any_timing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the folder was made only when writing the record: minutes of timing, then a raw error
    _no_timing(monkeypatch)
    a_file = tmp_path / "a-file"
    a_file.write_text("kept")
    for out in (a_file, a_file / "below"):
        for bench in ("infer", "train"):
            with pytest.raises(ConfigError, match=rf"^--out {out}: not a folder"):
                bench_cmd.run(_args([bench, "--models", "resnext_tiny", "--out", str(out)]))
    assert a_file.read_text() == "kept"
    made = tmp_path / "new" / "results"
    with pytest.raises(_Ran):  # a missing folder is made, then the run starts
        bench_cmd.run(_args(["infer", "--models", "resnext_tiny", "--out", str(made)]))
    assert made.is_dir()


def test_an_allocator_named_but_not_installed_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # it ran on glibc's malloc, saying so only in the first line of its output
    _no_timing(monkeypatch)
    monkeypatch.setattr(bench_cmd, "loaded_allocator", lambda: None)
    monkeypatch.setattr(bench_cmd, "find_allocator", lambda choice="auto": None)
    args = _args(["infer", "--models", "resnext_tiny", "--out", str(tmp_path)])
    for choice in ("tcmalloc", "jemalloc"):
        args.allocator = choice
        with pytest.raises(ConfigError, match=rf"^--allocator {choice}: not installed"):
            bench_cmd.run(args)
    args.allocator = "auto"  # falls back to glibc, as documented
    monkeypatch.setattr(bench_cmd, "reexec_with_allocator", lambda choice: None)
    with pytest.raises(_Ran):
        bench_cmd.run(args)


def test_no_models_and_negative_latency_rounds_are_refused_naming_the_option(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # --models "" divided by zero after the run; --latency-rounds -2 failed after every build
    _no_timing(monkeypatch)
    small = ["--batch", "1", "--image-size", "32", "--out", str(tmp_path)]
    with pytest.raises(ConfigError, match=r"^--models: expected at least one name"):
        bench_cmd.run(_args(["infer", "--models", "", *small]))
    with pytest.raises(ConfigError, match=r"^--models: expected at least one name"):
        bench_cmd.run(_args(["train", "--models", " , ", *small]))
    with pytest.raises(ConfigError, match=r"^--latency-rounds: expected an integer >= 0, got -2"):
        bench_cmd.run(
            _args(["infer", "--models", "resnext_tiny", "--latency-rounds", "-2", *small])
        )
    with pytest.raises(ConfigError, match=r"^--image-size: expected an integer >= 1"):
        bench_cmd.run(
            _args(
                ["infer", "--models", "resnext_tiny", "--image-size", "0", "--out", str(tmp_path)]
            )
        )
    # the library's own check names its fields, and refuses before building anything
    with pytest.raises(ConfigError, match=r"^models: expected at least one name"):
        infer_bench.InferConfig(models=()).validate()
    with pytest.raises(ConfigError, match=r"^latency_rounds: expected an integer >= 0"):
        infer_bench.InferConfig(models=("resnext_tiny",), latency_rounds=-1).validate()
    assert not list(tmp_path.glob("*.json"))


def test_interleaved_median_and_ratios() -> None:
    calls: list[str] = []
    timings = interleaved(
        {name: (lambda name=name: calls.append(name), 4) for name in "abc"},
        rounds=6,
        iters=1,
        warmup=0,
    )
    # each round runs every variant once, starting one further on, the second three in reverse
    rounds = ["".join(calls[i : i + 3]) for i in range(0, 18, 3)]
    assert rounds == ["abc", "bca", "cab", "cba", "bac", "acb"]
    # so that within the rounds each variant runs right after each other one equally often
    after = Counter(r[i : i + 2] for r in rounds for i in range(2))
    assert after == dict.fromkeys(["ab", "bc", "ca", "cb", "ba", "ac"], 2)
    t = Timing(batch=10, seconds=[0.5, 0.1, 0.2])
    assert t.median_s == 0.2 and t.throughput == pytest.approx(50.0)
    fake = {"x": Timing(2, [1.0]), "y": Timing(2, [0.5])}
    assert ratios(fake, "x") == {"x": 1.0, "y": 2.0}
    assert set(timings) == set("abc") and all(len(t.seconds) == 6 for t in timings.values())


def test_median_ratio_pairs_the_rounds() -> None:
    # per round 2.0, 0.5, 3.0: median 2.0; the ratio of the medians (2 / 2) would be 1.0
    assert median_ratio([2.0, 1.0, 6.0], [1.0, 2.0, 2.0]) == 2.0
    assert median_ratio([3.0], [1.5]) == 2.0
    with pytest.raises(ValueError, match="top, bottom: expected the same rounds"):
        median_ratio([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="at least one"):
        median_ratio([], [])


def test_interleaved_runs_before_ahead_of_each_call_outside_its_time() -> None:
    import time

    calls: list[str] = []

    def before() -> None:
        calls.append("evict")
        time.sleep(0.05)

    timings = interleaved(
        {"a": (lambda: calls.append("a"), 1)}, rounds=2, iters=3, warmup=1, before=before
    )
    # the warm-up call unprepared, then each timed call after its own `before`
    assert calls == ["a"] + ["evict", "a"] * 6
    assert all(s < 0.025 for s in timings["a"].seconds)  # the 50 ms sleeps are not counted


def test_interleaved_probes_once_a_round_before_its_calls() -> None:
    calls: list[str] = []
    rates = iter([100.0, 300.0, 200.0])

    def probe() -> float:
        calls.append("probe")
        return next(rates)

    timings = interleaved(
        {v: (lambda v=v: calls.append(v), 1) for v in "ab"},
        rounds=3,
        iters=1,
        warmup=0,
        probe=probe,
    )
    assert calls == ["probe", "a", "b", "probe", "b", "a", "probe", "b", "a"]
    assert timings["a"].probe_gflops == timings["b"].probe_gflops == [100.0, 300.0, 200.0]
    assert timings["a"].as_dict()["probe_gflops"] == [100.0, 300.0, 200.0]
    assert "probe_gflops" not in Timing(1, [1.0]).as_dict()  # timed without a probe


def test_ratios_by_phase_splits_the_rounds_at_the_probes_median() -> None:
    # four rounds; the probe's median is 150: rounds 0 and 2 slower, 1 and 3 faster
    ref = Timing(1, [1.0, 2.0, 1.0, 2.0], probe_gflops=[100.0, 200.0, 120.0, 180.0])
    other = Timing(1, [1.2, 2.0, 1.4, 1.8], probe_gflops=ref.probe_gflops)
    got = ratios_by_phase({"ref": ref, "other": other}, "ref")
    assert got["cut_gflops"] == 150.0 and got["rounds"] == {"slower": 2, "faster": 2}
    # per round 1.2, 1.0, 1.4, 0.9: slower rounds 1.2 and 1.4, faster 1.0 and 0.9
    row = got["time_ratios"]["other"]
    assert row["all"] == pytest.approx(1.1)
    assert row["slower"] == pytest.approx(1.3) and row["faster"] == pytest.approx(0.95)
    assert got["time_ratios"]["ref"] == {"all": 1.0, "slower": 1.0, "faster": 1.0}
    lines = phase_lines(got)
    assert "150 GFLOP/s" in lines[0] and "slower 1.300" in lines[2] and "faster 0.950" in lines[2]
    # a pair's row: other ÷ ref per round is 1.2, 1.0, 1.4, 0.9, so ref ÷ other is its inverse
    paired = ratios_by_phase({"ref": ref, "other": other}, "ref", [("ref", "other")])
    assert paired["time_ratios"]["ref ÷ other"]["slower"] == pytest.approx((1 / 1.2 + 1 / 1.4) / 2)
    with pytest.raises(ValueError, match="ref: no probe rates"):
        ratios_by_phase({"ref": Timing(1, [1.0])}, "ref")


def test_medians_by_phase_gives_each_variants_median_in_either_half() -> None:
    # probe median 150: rounds 0 and 2 slower (0.004, 0.006 s), 1 and 3 faster (0.002, 0.001 s)
    a = Timing(1, [0.004, 0.002, 0.006, 0.001], probe_gflops=[100.0, 200.0, 120.0, 180.0])
    b = Timing(1, [0.010, 0.010, 0.020, 0.030], probe_gflops=a.probe_gflops)
    got = medians_by_phase({"a": a, "b": b})
    assert got["a"] == pytest.approx({"all": 3.0, "slower": 5.0, "faster": 1.5})
    assert got["b"] == pytest.approx({"all": 15.0, "slower": 15.0, "faster": 20.0})
    assert medians_by_phase({}) == {}


def test_model_pairs_pair_the_first_model_with_each_other_on_each_variant_timed() -> None:
    timed = {"x/a", "x/b", "r/a", "s/a", "s/b"}  # r/b not timed (a peer missing, say)
    assert model_pairs(["x", "r", "s"], ["a", "b"], timed) == [
        ("x/a", "r/a"),
        ("x/a", "s/a"),
        ("x/b", "s/b"),
    ]
    assert model_pairs(["x"], ["a", "b"], timed) == []


def test_matmul_probe_reports_a_rate() -> None:
    probe = matmul_probe(size=64)
    assert all(probe() > 0 for _ in range(3))


@pytest.mark.parametrize("bench", [infer_bench, train_bench])
def test_default_variants_run_no_bf16_where_bf16_is_not_faster(bench) -> None:
    for faster in (True, False):
        chosen = bench_cmd.default_variants(bench, faster)
        assert set(chosen) <= set(bench.VARIANTS)
        assert any("bf16" in v for v in chosen) == faster
    assert any("fp32" in v for v in bench_cmd.default_variants(bench, False))


def test_git_commit_comes_from_the_environment_where_set(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from resnext.speed.provenance import git_commit

    monkeypatch.delenv("RESNEXT_GIT_COMMIT", raising=False)
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))  # no repository above
    assert git_commit(tmp_path) is None
    monkeypatch.setenv("RESNEXT_GIT_COMMIT", "0123abc")
    assert git_commit(tmp_path) == "0123abc"
    repo = Path(__file__).resolve().parents[2]
    # inside a clone too: a copied tree may carry a .git that is not its own (the GPU machine's)
    assert git_commit(repo) == "0123abc"
    monkeypatch.delenv("RESNEXT_GIT_COMMIT")
    if (repo / ".git").exists():
        inside = git_commit(repo)
        assert inside is not None and inside.split("-")[0] != "0123abc"


def test_a_checkout_is_dirty_for_changed_tracked_files_only(tmp_path: Path) -> None:
    import shutil
    import subprocess

    from resnext.checkout import source_commit

    if shutil.which("git") is None:
        pytest.skip("git is not installed")

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "-c", "user.name=t", "-c", "user.email=t@t", *args],
            cwd=tmp_path, capture_output=True, text=True, check=True,
        ).stdout.strip()  # fmt: skip

    git("init", "-q")
    (tmp_path / "code.py").write_text("x = 1\n")
    git("add", "code.py")
    git("commit", "-qm", "one")
    head = git("rev-parse", "HEAD")
    (tmp_path / "results.json").write_text("{}")  # a new result file is not a code change
    assert source_commit(tmp_path) == (head, False)
    (tmp_path / "code.py").write_text("x = 2\n")
    assert source_commit(tmp_path) == (head, True)
