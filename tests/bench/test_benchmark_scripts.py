"""Every benchmark script starts and describes its options; the shared options are defined once."""

from __future__ import annotations

import dataclasses
import runpy
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
SCRIPTS = sorted(p.name for p in BENCHMARKS.glob("bench_*.py") if p.name != "bench_args.py")


@pytest.fixture
def bench_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(BENCHMARKS))  # as `python benchmarks/<script>` has it


def _run_script(script: str, argv: list[str], monkeypatch: pytest.MonkeyPatch) -> int:
    monkeypatch.setattr(sys, "argv", [str(BENCHMARKS / script), *argv])
    with pytest.raises(SystemExit) as stop:
        runpy.run_path(str(BENCHMARKS / script), run_name="__main__")
    return int(stop.value.code or 0)


@pytest.mark.parametrize("script", SCRIPTS)
def test_each_script_answers_help(
    script: str, bench_path: None, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    assert _run_script(script, ["--help"], monkeypatch) == 0
    assert "usage:" in capsys.readouterr().out


def test_the_shared_parser_has_each_option_asked_for_and_writes_beside_the_scripts(
    bench_path: None,
) -> None:
    import bench_args

    parser = bench_args.parser("First line.\nMore.", batch=8, dtypes="fp32")
    assert parser.description == "First line."
    args = parser.parse_args([])
    assert (args.batch, args.dtypes) == (8, "fp32")
    assert args.out == BENCHMARKS / "results"
    assert not hasattr(args, "rounds") and not hasattr(args, "models")
    args = parser.parse_args(["--batch", "3", "--out", "elsewhere"])
    assert args.batch == 3 and args.out == Path("elsewhere")
    with pytest.raises(SystemExit):
        parser.parse_args(["--rounds", "2"])  # not asked for: refused


def test_the_grouped_kernel_ab_refuses_a_missing_revision(
    bench_path: None, monkeypatch: pytest.MonkeyPatch, capsys, tmp_path: Path
) -> None:
    from resnext.speed import grouped_kernel

    if grouped_kernel.unavailable_reason() is not None:
        pytest.skip(f"grouped kernel unavailable: {grouped_kernel.unavailable_reason()}")
    missing = tmp_path / "old.c"
    argv = ["--against", str(missing), "--out", str(tmp_path)]
    assert _run_script("bench_grouped_ab.py", argv, monkeypatch) == 1
    assert f"--against {missing}: no such file" in capsys.readouterr().out
    assert not list(tmp_path.iterdir())  # nothing written


def test_the_grouped_kernel_ab_times_every_layer_of_resnext50_both_ways(
    bench_path: None, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import json

    from resnext.speed import grouped_kernel

    if grouped_kernel.unavailable_reason() is not None:
        pytest.skip(f"grouped kernel unavailable: {grouped_kernel.unavailable_reason()}")
    argv = ["--against", str(grouped_kernel.ISA.source), "--batch", "1", "--rounds", "1"]
    assert _run_script("bench_grouped_ab.py", [*argv, "--out", str(tmp_path)], monkeypatch) == 0
    (path,) = tmp_path.glob("bench-grouped-ab-*.json")
    layers = json.loads(path.read_text())["results"]["layers"]
    # ResNeXt-50 32x4d has 16 grouped 3x3s (3, 4, 6, 3 blocks), in 7 distinct shapes
    assert sum(row["layers"] for row in layers) == 16 and len(layers) == 7
    assert all(set(row["median_ms"]) == {"ours", "against"} for row in layers)


@pytest.mark.parametrize("calls", ["x", "0", "3,-1"])
def test_the_predictor_batch_benchmark_refuses_bad_call_sizes(
    calls: str, bench_path: None, monkeypatch: pytest.MonkeyPatch, capsys, tmp_path: Path
) -> None:
    argv = ["--calls", calls, "--out", str(tmp_path)]
    assert _run_script("bench_predict_batches.py", argv, monkeypatch) == 1
    assert f"--calls {calls!r}: expected" in capsys.readouterr().out
    assert not list(tmp_path.iterdir())  # nothing written


def _kernel_source(kernel: str) -> Path:
    """This CPU's source of `kernel`, or a skip where it cannot run here."""
    import torch

    from resnext.speed import grouped_kernel, grouped_split, pointwise_fma, pointwise_gemm

    if kernel == "pointwise_fma":
        reason = pointwise_fma.unavailable_reason()
        source = pointwise_fma.active_build().source if reason is None else Path()
    elif kernel == "pointwise_fp16":
        from resnext.speed import pointwise_fp16

        reason, source = pointwise_fp16.unavailable_reason(), pointwise_fp16.SOURCE
    elif kernel == "pointwise_bf16":
        reason, source = pointwise_gemm.unavailable_reason(), pointwise_gemm.SOURCE
    elif kernel == "grouped_bf16":
        reason, source = (
            grouped_kernel.unavailable_reason(torch.bfloat16),
            grouped_kernel.ISA.source,
        )
        if reason is None and not grouped_kernel.ISA.bf16:
            reason = "this CPU's build has no bf16 pair kernels"
    elif kernel == "grouped_split":
        reason, source = grouped_split.unavailable_reason(), grouped_kernel.ISA.source
    elif kernel == "grouped_wgrad_bf16":
        from resnext.speed import grouped_wgrad

        reason = grouped_wgrad.unavailable_reason(torch.bfloat16)
        if reason is None and not grouped_wgrad.wide_takes(torch.bfloat16):
            reason = "this CPU's build has no bf16 pair weight gradient"
        source = grouped_wgrad.BUILDS[grouped_kernel.ISA.name].source
    elif kernel == "pointwise_wgrad_amx":
        from resnext.speed import pointwise_wgrad_amx

        reason, source = pointwise_wgrad_amx.unavailable_reason(), pointwise_wgrad_amx.SOURCE
    else:
        reason, source = grouped_kernel.unavailable_reason(), grouped_kernel.ISA.source
    if reason is not None:
        pytest.skip(f"{kernel} kernel unavailable: {reason}")
    return source


@pytest.mark.parametrize(
    ("script", "expected"),
    [
        ("bench_pointwise_train.py", "pointwise_gemm.c source"),
        ("bench_pointwise_bf16.py", "pointwise_gemm.c source"),
        ("bench_pointwise_fp16.py", "pointwise_fp16.c source"),
        ("bench_fused_bn.py", "bn_act source"),
    ],
)
def test_the_layer_benches_refuse_a_missing_other_source_before_running(
    script: str, expected: str, bench_path: None, monkeypatch: pytest.MonkeyPatch, capsys, tmp_path
) -> None:
    missing = tmp_path / "old.c"
    argv = ["--against", str(missing), "--out", str(tmp_path / "out")]
    assert _run_script(script, argv, monkeypatch) == 1
    out = capsys.readouterr().out
    assert f"--against {missing}: no such file" in out and expected in out
    assert not (tmp_path / "out").exists()  # nothing written


def test_the_batch_norm_bench_builds_another_source_with_our_headers(tmp_path: Path) -> None:
    from resnext.speed import bn_kernel

    if bn_kernel.unavailable_reason() is not None:
        pytest.skip(f"fused batch norm unavailable: {bn_kernel.unavailable_reason()}")
    # a copy elsewhere includes the headers by name: built from ours, not silently replaced by
    # torch's batch norm (which the fused module falls back to when its build fails)
    copy = tmp_path / "copy.c"
    copy.write_text(bn_kernel.SOURCE.read_text())
    against = dataclasses.replace(bn_kernel.BUILD, name="copy", source=copy)
    assert bn_kernel._library_problem(against) is None


@pytest.mark.parametrize("cold", [True, False])
def test_the_batch_norm_bench_empties_the_caches_before_each_timed_call_when_cold(
    cold: bool, bench_path: None, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import contextlib
    import json

    from resnext.speed import bn_kernel, measure

    if bn_kernel.unavailable_reason() is not None:
        pytest.skip(f"fused batch norm unavailable: {bn_kernel.unavailable_reason()}")
    evictions = []

    @contextlib.contextmanager
    def counting_evictor():  # type: ignore[no-untyped-def]
        yield lambda: evictions.append(1)

    monkeypatch.setattr(measure, "cache_evictor", counting_evictor)
    out = tmp_path / "out"
    argv = ["--models", "resnext_tiny", "--batch", "2", "--image-size", "32", "--rounds", "2"]
    assert _run_script("bench_fused_bn.py", [*argv, "--out", str(out), *(["--cold"] * cold)],
                       monkeypatch) == 0  # fmt: skip
    data = json.loads(next(out.glob("bench-fused-bn-*.json")).read_text())
    layers = data["results"]["models"]["resnext_tiny"]["layers"]
    assert data["config"]["cold"] is cold and layers
    # 2 rounds x 2 ways (torch, ours) x each distinct layer; the untimed warm-up calls none
    assert len(evictions) == (2 * 2 * len(layers) if cold else 0)


def test_the_grouped_ab_times_the_bf16_pair_kernels_of_another_source(
    bench_path: None, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import json

    source = _kernel_source("grouped_bf16")
    copy = tmp_path / "copy.c"  # elsewhere: its headers come from the package
    copy.write_text(source.read_text())
    out = tmp_path / "out"
    argv = ["--against", str(copy), "--dtype", "bf16", "--batch", "1", "--rounds", "1"]
    assert _run_script("bench_grouped_ab.py", [*argv, "--out", str(out)], monkeypatch) == 0
    (path,) = out.glob("bench-grouped-ab-*.json")
    data = json.loads(path.read_text())
    assert data["config"]["kernels"] == "pairs"
    # every one of ResNeXt-50's grouped shapes, each checked against conv2d before timing
    assert [(r["channels"], r["stride"]) for r in data["results"]["layers"]] == [
        (128, 1), (256, 2), (256, 1), (512, 2), (512, 1), (1024, 2), (1024, 1)
    ]  # fmt: skip


def test_the_grouped_ab_runs_the_split_kernels_cold_where_they_take_the_layer(
    bench_path: None, monkeypatch: pytest.MonkeyPatch, capsys, tmp_path: Path
) -> None:
    import json

    from resnext.speed import grouped_split

    source = _kernel_source("grouped_bf16")
    if grouped_split.unavailable_reason() is not None:
        pytest.skip(f"split kernels unavailable: {grouped_split.unavailable_reason()}")
    argv = ["--against", str(source), "--batch", "1", "--rounds", "1", "--split", "--cold"]
    assert _run_script("bench_grouped_ab.py", [*argv, "--out", str(tmp_path)], monkeypatch) == 1
    assert "--split: the split-order kernels are bf16 only" in capsys.readouterr().out
    assert not list(tmp_path.iterdir())  # nothing written
    argv += ["--dtype", "bf16"]
    assert _run_script("bench_grouped_ab.py", [*argv, "--out", str(tmp_path)], monkeypatch) == 0
    (path,) = tmp_path.glob("bench-grouped-ab-*.json")
    data = json.loads(path.read_text())
    assert data["config"]["cold"] is True
    # ResNeXt-50 32x4d: 4 channels per group at 128, 8 at 256; wider groups stay on the pairs
    kernels = [(r["channels"], r["kernel"]) for r in data["results"]["layers"]]
    assert kernels == [
        (128, "split"), (256, "split"), (256, "split"), (512, "pairs or widening"),
        (512, "pairs or widening"), (1024, "pairs or widening"), (1024, "pairs or widening"),
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("script", "kernel"),
    [
        ("bench_fused_bn.py", "bn"),
        ("bench_pointwise_bf16.py", "pointwise_bf16"),
        ("bench_pointwise_fp16.py", "pointwise_fp16"),
        ("bench_pointwise_train.py", "pointwise_bf16"),
        ("bench_grouped_ab.py", "grouped"),
    ],
)
def test_the_layer_benches_refuse_an_other_source_that_does_not_build(
    script: str, kernel: str, bench_path: None, monkeypatch: pytest.MonkeyPatch, capsys, tmp_path
) -> None:
    if kernel == "bn":
        from resnext.speed import bn_kernel

        if bn_kernel.unavailable_reason() is not None:
            pytest.skip(f"fused batch norm unavailable: {bn_kernel.unavailable_reason()}")
    else:
        _kernel_source(kernel)
    broken = tmp_path / "broken.c"
    broken.write_text("this is not C\n")
    argv = ["--against", str(broken), "--out", str(tmp_path / "out")]
    assert _run_script(script, argv, monkeypatch) == 1
    assert f"--against {broken}: compiling broken.c failed" in capsys.readouterr().out
    assert not (tmp_path / "out").exists()  # refused before timing anything


def _layer_profile_results(
    models: str, size: int, rounds: int, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> dict:
    """bench_infer_layers.py on `models` (batch 2, float32): its JSON record's results."""
    import json

    out = tmp_path / "out"
    argv = ["--models", models, "--batch", "2", "--image-size", str(size), "--rounds", str(rounds),
            "--dtype", "fp32", "--out", str(out)]  # fmt: skip
    assert _run_script("bench_infer_layers.py", argv, monkeypatch) == 0
    (path,) = out.glob("bench-infer-layers-*.json")
    return json.loads(path.read_text())["results"]


def test_the_layer_profile_sums_every_layer_into_its_kind(
    bench_path: None, monkeypatch: pytest.MonkeyPatch, capsys, tmp_path: Path
) -> None:
    results = _layer_profile_results(
        "resnext_tiny_in,resnext_tiny_in", 64, 1, monkeypatch, tmp_path
    )
    row = results["resnext_tiny_in"]
    kinds = row["kinds_ms"]
    # a tiny ImageNet-layout ResNeXt: a stem, 1×1s and grouped 3×3s, no dense 3×3
    assert kinds["stem"] > 0 and kinds["1x1"] > 0 and kinds["grouped 3x3"] > 0
    assert kinds["dense 3x3"] == 0
    assert sum(kinds.values()) == pytest.approx(row["batch_ms"])
    assert {layer["kind"] for layer in row["layers"]} <= {"1x1", "grouped 3x3", "stem", "other"}
    assert "ms a batch" in capsys.readouterr().out


def test_the_layer_profile_times_two_models_in_turns_and_their_ratio_per_round(
    bench_path: None, monkeypatch: pytest.MonkeyPatch, capsys, tmp_path: Path
) -> None:
    import statistics

    results = _layer_profile_results("resnext_tiny_in,resnext_tiny", 32, 3, monkeypatch, tmp_path)
    first, second = results["resnext_tiny_in"], results["resnext_tiny"]
    assert len(first["rounds_ms"]) == len(second["rounds_ms"]) == 3
    assert first["batch_ms"] == pytest.approx(statistics.median(first["rounds_ms"]))
    ratios = [a / b for a, b in zip(first["rounds_ms"], second["rounds_ms"], strict=True)]
    ratio = results["time_ratio_per_round"]["resnext_tiny_in / resnext_tiny"]
    assert ratio == pytest.approx(statistics.median(ratios))
    assert f"resnext_tiny_in ÷ resnext_tiny, batch time per round (median): {ratio:.3f}" in (
        capsys.readouterr().out
    )


def test_the_layer_profile_refuses_a_batch_of_nothing(
    bench_path: None, monkeypatch: pytest.MonkeyPatch, capsys, tmp_path: Path
) -> None:
    argv = ["--batch", "0", "--out", str(tmp_path / "out")]
    assert _run_script("bench_infer_layers.py", argv, monkeypatch) == 1
    assert "--rounds and --batch: expected at least 1" in capsys.readouterr().out
    assert not (tmp_path / "out").exists()


# the scripts whose --models comes from the shared parser
MODEL_SCRIPTS = [s for s in SCRIPTS if "models=" in (BENCHMARKS / s).read_text()]


def test_the_scripts_with_models_are_the_ones_expected() -> None:
    # guards the text match above: a script losing the shared --models would drop out silently
    assert len(MODEL_SCRIPTS) >= 14
    assert {"bench_infer_layers.py", "bench_network_ab.py", "bench_gpu_ops.py"} <= set(
        MODEL_SCRIPTS
    )


@pytest.mark.parametrize("script", MODEL_SCRIPTS)
def test_each_script_refuses_an_unknown_model_before_it_starts(
    script: str, bench_path: None, monkeypatch: pytest.MonkeyPatch, capsys, tmp_path: Path
) -> None:
    argv = ["--models", "resnet50,nope", "--out", str(tmp_path / "out")]
    assert _run_script(script, argv, monkeypatch) == 2
    assert "argument --models: unknown ['nope']" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_the_network_ab_refuses_a_missing_source(
    bench_path: None, monkeypatch: pytest.MonkeyPatch, capsys, tmp_path: Path
) -> None:
    missing = tmp_path / "old.c"
    argv = ["--kernel", "grouped", "--against", str(missing), "--out", str(tmp_path)]
    assert _run_script("bench_network_ab.py", argv, monkeypatch) == 1
    assert f"--against {missing}: no such file" in capsys.readouterr().out
    assert not list(tmp_path.iterdir())  # nothing written


def test_the_network_ab_refuses_an_image_too_small_for_the_network(
    bench_path: None, monkeypatch: pytest.MonkeyPatch, capsys, tmp_path: Path
) -> None:
    source = tmp_path / "old.c"
    source.write_text("/* never built: refused first */\n")
    argv = ["--kernel", "grouped", "--against", str(source), "--image-size", "16"]
    assert (
        _run_script("bench_network_ab.py", [*argv, "--out", str(tmp_path / "out")], monkeypatch)
        == 1
    )
    assert "--image-size: expected at least 32" in capsys.readouterr().out
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("kernel", "step", "message"),
    [
        ("grouped_split", "train", "grouped_split is an inference kernel"),
        ("grouped_wgrad_bf16", "infer", "grouped_wgrad_bf16 is a training kernel"),
    ],
)
def test_the_network_ab_refuses_a_step_that_does_not_run_the_kernel(
    kernel: str,
    step: str,
    message: str,
    bench_path: None,
    monkeypatch: pytest.MonkeyPatch,
    capsys,
    tmp_path: Path,
) -> None:
    source = tmp_path / "same.c"
    source.write_text("/* not compiled: refused before */\n")
    argv = ["--kernel", kernel, "--step", step, "--against", str(source)]
    assert (
        _run_script("bench_network_ab.py", [*argv, "--out", str(tmp_path / "o")], monkeypatch) == 1
    )
    assert message in capsys.readouterr().out
    assert not (tmp_path / "o").exists()


# A source computing otherwise: every FMA subtracting, or each product (and weight gradient)
# tile leaving out the second half of its inputs.
WRONGS = {
    "pointwise_fma": [("fmadd_ps(", "fnmadd_ps(")],
    "grouped": [("fmadd_ps(", "fnmadd_ps(")],
    "pointwise_bf16": [("2 * NR, kp, MR);", "2 * NR, kp / 2, MR);")],  # its tile: below
    # resnext_tiny's grouped layers are small enough that the widening kernels win them in bf16
    "grouped_bf16": [("fmadd_ps(", "fnmadd_ps(")],
    "grouped_split": [],  # the source as it is; its header is the wrong one (below)
    # every pair product on the even channels' operand
    "grouped_wgrad_bf16": [("(__m512bh)v, (__m512bh)xv[p][kw]);", "(__m512bh)v, (__m512bh)xv[0][kw]);")],
    # every block summing the first half of its chunk's rows
    "pointwise_wgrad_amx": [("for (int s = 0; s < kc / 32; ++s)", "for (int s = 0; s < kc / 64; ++s)")],
    "pointwise_fp16": [("_mm512_fmadd_ph(", "_mm512_fnmadd_ph(")],
}  # fmt: skip
# a header beside the other source, which it includes by name before ours: every dot product of
# the split kernels on the group's first input pair
WRONG_HEADERS = {
    "grouped_split": ("grouped3x3_split.h", "v[p][q], w)", "v[p][0], w)"),
    # the inference tile over half the reduction
    "pointwise_bf16": (
        "pointwise_tile.h",
        "dot_pairs(acc, arow, 2, b, b_step, K / 2, mr)",
        "dot_pairs(acc, arow, 2, b, b_step, K / 4, mr)",
    ),
}
# resnext_tiny has no grouped 3×3 the split kernels take (16 groups of 4 or 8 channels and up)
AB_MODELS = {"grouped_split": "resnext50_32x4d"}


@pytest.mark.parametrize(
    ("kernel", "step"),
    [
        ("pointwise_fma", "infer"),
        ("pointwise_bf16", "infer"),
        ("pointwise_bf16", "train"),
        ("grouped", "infer"),
        ("grouped", "train"),
        ("grouped_bf16", "infer"),
        ("grouped_split", "infer"),
        ("grouped_wgrad_bf16", "train"),
        ("pointwise_wgrad_amx", "train"),
        ("pointwise_fp16", "infer"),
        ("pointwise_fp16", "train"),
    ],
)
def test_the_network_ab_runs_the_other_source_and_refuses_one_that_computes_otherwise(
    kernel: str, step: str, bench_path: None, monkeypatch: pytest.MonkeyPatch, capsys, tmp_path
) -> None:
    import json

    source = _kernel_source(kernel)
    text = source.read_text()
    (tmp_path / "wrong").mkdir()
    (tmp_path / "same").mkdir()
    wrong = tmp_path / "wrong" / "wrong.c"
    changed = text
    for before, after in WRONGS[kernel]:
        assert before in changed
        changed = changed.replace(before, after)
    wrong.write_text(changed)
    if kernel in WRONG_HEADERS:
        name, before, after = WRONG_HEADERS[kernel]
        header = (source.parent / name).read_text()
        assert before in header
        (wrong.parent / name).write_text(header.replace(before, after))
    else:
        assert wrong.read_text() != text
    same = tmp_path / "same" / "same.c"
    same.write_text(text)
    out = tmp_path / "out"
    # resnext_tiny: groups of 4 and 8 channels, which every build of the grouped kernel takes,
    # and 1×1s of 64 and 128 outputs, which the bf16 kernel takes
    model = AB_MODELS.get(kernel, "resnext_tiny")
    argv = ["--kernel", kernel, "--models", model, "--batch", "2", "--rounds", "1"]
    if model == "resnext50_32x4d":  # stages at 16² to 2², which the split kernels still take
        argv += ["--image-size", "64"]
    argv += ["--step", step, "--backend", "none", "--out", str(out)]
    assert _run_script("bench_network_ab.py", [*argv, "--against", str(wrong)], monkeypatch) == 1
    refused = capsys.readouterr().out
    assert "against: " in refused and ("output off" in refused or "step differs" in refused)
    assert not out.exists()  # nothing written
    assert _run_script("bench_network_ab.py", [*argv, "--against", str(same)], monkeypatch) == 0
    (path,) = out.glob("bench-network-ab-*.json")
    row = json.loads(path.read_text())["results"][model]
    assert set(row["median_ms"]) == {"ours", "against"}
    assert len(row["ms"]["ours"]) == len(row["ms"]["against"]) == len(row["probe_gflops"]) == 1
    ratio = row["ms"]["against"][0] / row["ms"]["ours"][0]  # one round: its ratio is the median
    assert row["by_phase"]["time_ratios"]["against"]["all"] == pytest.approx(ratio)


def test_the_network_ab_offers_no_amx_grouped_kernel_while_it_builds(
    bench_path: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With a vector grouped source under test, the inference builds are offered neither AMX
    grouped kernel: on a CPU with AMX either could take the layers the source should run."""
    import contextlib

    import torch

    import bench_network_ab
    from resnext.speed import grouped_swap

    _kernel_source("grouped_bf16")
    offered: list[tuple[str, ...]] = []
    real = grouped_swap.runnable_variants

    def spy(conv, dtype):  # a pass-through spy
        offered.append(real(conv, dtype))
        return offered[-1]

    monkeypatch.setattr(grouped_swap, "runnable_variants", spy)
    torch.manual_seed(0)
    # groups of 4 and 8 channels at stride 1, which both AMX grouped kernels take
    model = torch.nn.Sequential(
        torch.nn.Conv2d(32, 32, 3, 1, 1, groups=8), torch.nn.Conv2d(32, 32, 3, 1, 1, groups=4)
    ).eval()
    x = torch.randn(2, 32, 12, 12).contiguous(memory_format=torch.channels_last)
    use = lambda build: contextlib.nullcontext()  # noqa: E731 (this checkout's build both times)
    bench_network_ab.inference_calls(model, x, "grouped_bf16", "none", use)
    assert len(offered) == 4 and all("widening" in v for v in offered)  # 2 layers, 2 builds
    assert not any({"amx", "quads"} & set(v) for v in offered), offered


def test_the_network_ab_refuses_a_source_that_does_not_compile(
    bench_path: None, monkeypatch: pytest.MonkeyPatch, capsys, tmp_path: Path
) -> None:
    _kernel_source("pointwise_fma")
    broken = tmp_path / "broken.c"
    broken.write_text("this is not C\n")
    argv = ["--kernel", "pointwise_fma", "--against", str(broken), "--out", str(tmp_path / "o")]
    assert _run_script("bench_network_ab.py", argv, monkeypatch) == 1
    assert f"--against {broken}: compiling broken.c failed" in capsys.readouterr().out
    assert not (tmp_path / "o").exists()


def test_the_projection_reads_a_gpu_result_and_refuses_one_without_the_row(
    bench_path: None, monkeypatch: pytest.MonkeyPatch, capsys, tmp_path: Path
) -> None:
    import json

    gpu = tmp_path / "bench-gpu.json"
    row = {"throughput": 2000.0, "batch": 64}
    gpu.write_text(json.dumps({"results": {"throughput": {"resnet50/train-ours-fast": row}},
                               "machine": {"gpus": ["test"]}, "git_commit": "abc"}))  # fmt: skip
    out = tmp_path / "out"
    argv = ["--gpu-json", str(gpu), "--variant", "resnet50/train-ours-fast", "--devices", "4",
            "--link-gb-per-s", "100", "--loader-rate", "500", "--out", str(out)]  # fmt: skip
    assert _run_script("bench_projection.py", argv, monkeypatch) == 0
    (path,) = out.glob("bench-projection-*.json")
    (p,) = json.loads(path.read_text())["results"]["projections"]
    # ResNet-50: 25,557,032 parameters (torchvision's count); 90 × 1,281,167 images at 8,000 img/s
    assert p["compute_hours"] == pytest.approx(115_305_030 / 8000 / 3600)
    assert p["allreduce_mb_per_device"] == pytest.approx(2 * 3 / 4 * 25_557_032 * 4 / 1e6)
    assert p["loader_cores_per_device"] == pytest.approx(4.0)
    missing = ["--gpu-json", str(gpu), "--out", str(out)]  # the default variant is not in it
    assert _run_script("bench_projection.py", missing, monkeypatch) == 1
    assert "expected a bench-gpu result with a training row" in capsys.readouterr().out
    written = set(out.iterdir())
    for bad, message in (
        (["--devices", "eight"], "expected comma-separated numbers"),
        (["--devices", "0", "--link-gb-per-s", "1"], "devices: expected a value > 0, got 0"),
    ):
        args = ["--gpu-json", str(gpu), "--variant", "resnet50/train-ours-fast", *bad]
        assert _run_script("bench_projection.py", [*args, "--out", str(out)], monkeypatch) == 1
        assert message in capsys.readouterr().out
    assert set(out.iterdir()) == written  # nothing more written


def test_the_gpu_groups_benchmark_runs_on_the_cpu_and_checks_its_merged_networks(
    bench_path: None, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import json

    out = tmp_path / "out"
    argv = ["--device", "cpu", "--batch", "2", "--image-size", "32", "--rounds", "1",
            "--iters", "1", "--parts", "layers,eager", "--out", str(out)]  # fmt: skip
    assert _run_script("bench_gpu_groups.py", argv, monkeypatch) == 0
    for bad in (["--device", "bogus"], ["--parts", "fly"]):  # refused by the parser (status 2)
        assert _run_script("bench_gpu_groups.py", [*bad, "--out", str(out)], monkeypatch) == 2
    (path,) = out.glob("bench-gpu-groups-*.json")  # rewritten after each part, one file left
    results = json.loads(path.read_text())["results"]
    for task in ("infer", "train"):
        layers = results[f"layers_{task}"]
        assert len(layers["chosen"]) == 16  # ResNeXt-50's grouped 3×3s
        assert (
            sum(layers["count"].values()) == 16 and sum(layers["resnet50_3x3_count"].values()) == 16
        )
    assert max(results["parity"].values()) < 1e-4  # the merged networks are the plain one
    assert set(results["eager"]) == {f"{t}-{n}" for t, n in [
        ("infer", "resnext50"), ("infer", "resnext50-widened"), ("infer", "resnet50"),
        ("train", "resnext50"), ("train", "resnext50-merged"), ("train", "resnet50")]}  # fmt: skip


def test_the_gpu_ops_breakdown_runs_on_the_cpu(
    bench_path: None, monkeypatch: pytest.MonkeyPatch, capsys, tmp_path: Path
) -> None:
    import json

    out = tmp_path / "out"
    argv = ["--device", "cpu", "--models", "resnext_tiny,resnet29_1x45d", "--batch", "2",
            "--image-size", "16", "--steps", "1", "--out", str(out)]  # fmt: skip
    assert _run_script("bench_gpu_ops.py", argv, monkeypatch) == 0
    (path,) = out.glob("bench-gpu-ops-*.json")
    results = json.loads(path.read_text())["results"]
    assert set(results) == {"train", "infer"}
    for task in ("train", "infer"):
        assert results[task]["resnext_tiny"]["conv 3x3 grouped"] > 0
        assert "conv 3x3 grouped" not in results[task]["resnet29_1x45d"]  # C = 1: no groups
    for bad, message in (
        (["--tasks", "fly"], "--tasks: expected some of"),
        (["--device", "bogus"], "--device: expected cuda, cuda:N or cpu"),
    ):
        assert _run_script("bench_gpu_ops.py", [*bad, "--out", str(out)], monkeypatch) == 1
        assert message in capsys.readouterr().out
    assert len(list(out.iterdir())) == 1  # nothing more written


def test_the_wide_group_bench_takes_the_layers_only_its_kernels_run(
    bench_path: None, monkeypatch: pytest.MonkeyPatch, capsys, tmp_path: Path
) -> None:
    import json

    import torch

    from resnext.speed import grouped_amx, grouped_wgrad

    out = tmp_path / "out"
    argv = ["--models", "resnext29_4x16d", "--batch", "2", "--image-size", "16",
            "--rounds", "1", "--out", str(out)]  # fmt: skip
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    taken = [name for name, dtype in dtypes.items() if grouped_wgrad.wide_takes(dtype)]
    for name in dtypes:
        code = _run_script("bench_grouped_wide.py", [*argv, "--dtype", name], monkeypatch)
        if name not in taken:
            assert code == 1
            said = capsys.readouterr().out
            # the build takes no wide groups in this dtype, or (AVX2-only) no bf16 at all
            assert f"--dtype {name}: this CPU's build" in said or "cannot run here" in said
            continue
        assert code == 0
        (path,) = out.glob("bench-grouped-wide-*.json")
        row = json.loads(path.read_text())["results"]["models"]["resnext29_4x16d"]
        # ResNeXt-29 4×16d: 3 stages of 3 blocks, 16, 32 and 64 channels per group: every grouped
        # layer taken with the wide kernels; without them none, except by the AMX tile kernels,
        # which take every width in bf16 where the CPU has AMX
        amx = name == "bf16" and grouped_amx.unavailable_reason() is None
        assert row["grouped_layers_taken"] == {"with": 9, "without": 9 if amx else 0}
        path.unlink()
    if not taken:
        pytest.skip("this CPU's build takes wide groups in no dtype")


def test_the_bf16_1x1_bench_times_a_strided_shortcut_in_place_and_gathered(
    bench_path: None, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import json

    _kernel_source("pointwise_bf16")
    out = tmp_path / "out"
    argv = ["--models", "resnext_tiny", "--batch", "1", "--rounds", "1", "--out", str(out)]
    assert _run_script("bench_pointwise_bf16.py", argv, monkeypatch) == 0
    (path,) = out.glob("bench-pointwise-bf16-*.json")
    results = json.loads(path.read_text())["results"]
    # resnext_tiny's one 1×1 of channels in 64s is its stride-2 projection: the old way (pixels
    # gathered first) timed beside ours and oneDNN's, and left out of the model's total
    assert set(results["layers"]) == {"64->128 112x112 s2 +relu"}
    assert set(results["layers"]["64->128 112x112 s2 +relu"]) == {"onednn", "ours", "gathered"}
    assert set(results["totals"]["resnext_tiny"]) == {"onednn", "ours"}


def test_the_fp16_1x1_bench_times_both_builds_of_the_same_kernel_alike(
    bench_path: None, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import json

    import torch

    import resnext
    from resnext.speed import pointwise_fp16

    source = _kernel_source("pointwise_fp16")
    copy = tmp_path / "copy.c"  # elsewhere: its header found by name, as another revision's
    copy.write_text(source.read_text())
    out = tmp_path / "out"
    argv = ["--models", "resnext_tiny", "--batch", "1", "--rounds", "1", "--out", str(out)]
    assert _run_script("bench_pointwise_fp16.py", [*argv, "--against", str(copy)], monkeypatch) == 0
    (path,) = out.glob("bench-pointwise-fp16-*.json")
    results = json.loads(path.read_text())["results"]
    # resnext_tiny's 1×1s with outputs in 32s, each with a residual add or a ReLU
    tiny = resnext.create_model("resnext_tiny")
    expected = sum(
        isinstance(m, torch.nn.Conv2d)
        and m.kernel_size == (1, 1)
        and pointwise_fp16.takes(m.out_channels)
        for m in tiny.modules()
    )
    assert 0 < len(results["layers"]) <= expected
    for row in results["layers"].values():
        assert set(row) == {"onednn", "ours", "against"}
        assert all(r["median_ms"] > 0 for r in row.values())
    assert set(results["totals"]["resnext_tiny"]) == {"onednn", "ours", "against"}
    # the same source built twice computes the same values to the bit
    assert set(results["against_difference"]) == set(results["layers"])
    assert all(d == 0.0 for d in results["against_difference"].values())


@pytest.mark.parametrize("bad", ["0.05", "0.05,x", "0.05,0.05", "0,1", "-0.1,0"])
def test_the_train_kernel_bench_refuses_margins_it_cannot_compare(
    bad: str, bench_path: None, monkeypatch: pytest.MonkeyPatch, capsys, tmp_path: Path
) -> None:
    argv = ["--margins", bad, "--out", str(tmp_path)]
    assert _run_script("bench_train_kernels.py", argv, monkeypatch) == 2
    assert "--margins" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())  # refused before any step ran


@pytest.mark.parametrize("bad", ["wgrad", "none,none", "none,all,x", ""])
def test_the_train_kernel_bench_refuses_arms_it_does_not_have(
    bad: str, bench_path: None, monkeypatch: pytest.MonkeyPatch, capsys, tmp_path: Path
) -> None:
    argv = ["--arms", bad, "--out", str(tmp_path)]
    assert _run_script("bench_train_kernels.py", argv, monkeypatch) == 2
    assert "--arms" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_the_train_kernel_bench_refuses_arms_and_margins_together(
    bench_path: None, monkeypatch: pytest.MonkeyPatch, capsys, tmp_path: Path
) -> None:
    argv = ["--arms", "none,all", "--margins", "0.05,0", "--out", str(tmp_path)]
    assert _run_script("bench_train_kernels.py", argv, monkeypatch) == 2
    assert "not allowed with argument --arms" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def _train_kernels_record(
    options: list[str], rounds: int, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> dict:
    """bench_train_kernels.py on resnext_tiny_in (batch 2, 32²) with `options`: its JSON record."""
    import json

    argv = ["--models", "resnext_tiny_in", "--batch", "2", "--image-size", "32", "--rounds",
            str(rounds), *options, "--out", str(tmp_path)]  # fmt: skip
    assert _run_script("bench_train_kernels.py", argv, monkeypatch) == 0
    (record,) = tmp_path.glob("bench-train-kernels-*.json")
    return json.loads(record.read_text())


def test_the_train_kernel_bench_leaves_the_stride2_phases_out_of_the_none_arm(
    bench_path: None, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import torch

    from resnext.speed import grouped_kernel

    data = _train_kernels_record(["--arms", "all,none"], 1, monkeypatch, tmp_path)
    arms = data["results"]["resnext_tiny_in"]
    assert list(arms) == ["all", "none"] and list(data["config"]["arms"]) == ["all", "none"]

    def timed(arm: str) -> set[str]:
        return {
            name
            for d in arms[arm]["choices"]
            if d["op"] == "grouped3x3.input_grad" and d["key"][2] == "2"
            for name in d["ms"]
        }

    # left with oneDNN alone, the none arm times nothing there
    assert not timed("none") & {"ours-phases", "ours-pairs-phases", "ours-amx-phases"}
    if grouped_kernel.unavailable_reason(torch.bfloat16) is None:
        assert "ours-phases" in timed("all")


def test_the_train_kernel_bench_times_one_arm_per_chooser_margin(
    bench_path: None, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    data = _train_kernels_record(["--margins", "0.05,0"], 2, monkeypatch, tmp_path)
    arms = data["results"]["resnext_tiny_in"]
    assert list(arms) == ["margin=0.05", "margin=0"]
    assert arms["margin=0.05"]["median_over_first"] == 1.0
    for arm in arms.values():
        assert len(arm["rounds_ms"]) == 2 and all(ms > 0 for ms in arm["rounds_ms"])


def test_the_tile_load_bench_times_four_rates_per_round_or_names_what_it_needs(
    bench_path: None, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys
) -> None:
    import json

    from resnext.speed import peak

    argv = ["--rounds", "3", "--seconds", "0.01", "--out", str(tmp_path)]
    # fewer than 3 rounds cannot give a correlation: refused by the parser (status 2), naming it
    assert _run_script("bench_tile_loads.py", ["--rounds", "2"], monkeypatch) == 2
    assert "--rounds: expected >= 3, got 2" in capsys.readouterr().err
    assert _run_script("bench_tile_loads.py", ["--seconds", "0"], monkeypatch) == 2
    assert "--seconds: expected > 0" in capsys.readouterr().err
    if peak.amx_unavailable_reason() is not None:
        assert _run_script("bench_tile_loads.py", argv, monkeypatch) == 1
        assert "needs AMX-BF16" in capsys.readouterr().out
        return
    assert _run_script("bench_tile_loads.py", argv, monkeypatch) == 0
    (path,) = tmp_path.glob("bench-tile-loads-*.json")
    results = json.loads(path.read_text())["results"]
    rounds = results["rounds"]
    assert set(rounds) == {"register", "loaded", "matmul", "conv1x1"}
    assert all(len(v) == 3 and min(v) > 0 for v in rounds.values())
    share = results["loaded_over_register"]["per_round"]
    assert share == [a / b for a, b in zip(rounds["loaded"], rounds["register"], strict=True)]
    assert set(results["correlation"]) == {
        "matmul~register", "matmul~loaded", "conv1x1~register", "conv1x1~loaded"
    }  # fmt: skip


def test_the_unfused_stem_bench_times_both_stems_on_both_eager_paths(
    bench_path: None, monkeypatch: pytest.MonkeyPatch, capsys, tmp_path: Path
) -> None:
    import json

    from resnext.speed import maxpool
    from resnext.speed.replay import unavailable_reason

    if maxpool.unavailable_reason() is not None or unavailable_reason() is not None:
        pytest.skip("needs the max-pool kernel and the replay")
    out = tmp_path / "out"
    argv = ["--models", "resnext_tiny_in", "--batch", "1", "--image-size", "64", "--rounds", "2"]
    assert _run_script("bench_stem_apart.py", [*argv, "--out", str(out)], monkeypatch) == 0
    (path,) = out.glob("bench-stem-apart-*.json")
    row = json.loads(path.read_text())["results"]["resnext_tiny_in"]
    ways = ("none before", "none now", "replay before", "replay now")
    assert all(row["network img/s"][way] > 0 for way in ways)
    assert row["network img/s"]["none: now ÷ before, time"] > 0
    assert row["stem ms"]["now ÷ before, time"] > 0
    assert "replay: before" in capsys.readouterr().out


def test_the_unfused_stem_bench_refuses_an_unknown_backend(
    bench_path: None, monkeypatch: pytest.MonkeyPatch, capsys, tmp_path: Path
) -> None:
    argv = ["--backends", "none,jit", "--out", str(tmp_path / "out")]
    assert _run_script("bench_stem_apart.py", argv, monkeypatch) == 2
    assert "--backends: expected none and/or replay, got ['jit']" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_the_huge_page_bench_runs_pairs_of_processes_each_way(
    bench_path: None, monkeypatch: pytest.MonkeyPatch, capsys, tmp_path: Path
) -> None:
    import json

    from resnext.speed.allocator import thp_mode

    out = tmp_path / "out"
    argv = ["--models", "resnext_tiny_in", "--batches", "1", "--image-size", "32"]
    argv += ["--backend", "none", "--pairs", "1", "--calls", "2", "--out", str(out)]
    assert _run_script("bench_huge_pages.py", argv, monkeypatch) == 0
    (path,) = out.glob("bench-huge-pages-*.json")
    row = json.loads(path.read_text())["results"]["resnext_tiny_in"]
    assert len(row["with huge pages"]) == len(row["without"]) == 1
    assert row["batch1: with ÷ without, time"] > 0
    offered = thp_mode() in ("always", "madvise")
    assert row["huge pages in use, with / without"] == [offered, False]
    assert "with ÷ without" in capsys.readouterr().out


def test_the_huge_page_bench_refuses_a_bad_count(
    bench_path: None, monkeypatch: pytest.MonkeyPatch, capsys, tmp_path: Path
) -> None:
    argv = ["--pairs", "0", "--out", str(tmp_path / "out")]
    assert _run_script("bench_huge_pages.py", argv, monkeypatch) == 2
    assert "--batches, --pairs, --calls: expected at least 1" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "script",
    ["bench_stem.py", "bench_replay_donation.py", "bench_huge_pages.py", "bench_pointwise_mkl.py"],
)
def test_a_batch_list_that_is_not_integers_is_refused_by_name(
    script: str, bench_path: None, monkeypatch: pytest.MonkeyPatch, capsys, tmp_path: Path
) -> None:
    import bench_args

    assert bench_args.int_list("1,16") == [1, 16]
    argv = ["--batches", "1,x", "--out", str(tmp_path / "out")]
    assert _run_script(script, argv, monkeypatch) == 2
    err = capsys.readouterr().err
    assert "argument --batches: expected comma-separated integers, got '1,x'" in err
    assert not (tmp_path / "out").exists()


def test_the_mkl_bench_times_both_builds_on_each_backend(
    bench_path: None, monkeypatch: pytest.MonkeyPatch, capsys, tmp_path: Path
) -> None:
    import json

    from resnext.speed import pointwise_mkl
    from resnext.speed.replay import unavailable_reason

    if pointwise_mkl.unavailable_reason() is not None or unavailable_reason() is not None:
        pytest.skip("needs the MKL 1×1 kernel and the replay")
    out = tmp_path / "out"
    argv = ["--models", "resnext_tiny_in", "--batches", "1", "--image-size", "32"]
    argv += ["--backends", "none,replay", "--rounds", "1", "--out", str(out)]
    assert _run_script("bench_pointwise_mkl.py", argv, monkeypatch) == 0
    (path,) = out.glob("bench-pointwise-mkl-*.json")
    results = json.loads(path.read_text())["results"]
    assert set(results) == {"resnext_tiny_in/batch1/none", "resnext_tiny_in/batch1/replay"}
    for row in results.values():
        assert row["mkl auto"] > 0 and row["mkl off"] > 0 and row["auto ÷ off, time"] > 0
        assert 0 <= row["1x1s on mkl"] <= row["1x1s weighed"] > 0
        assert (row["packed MB"] > 0) == (row["1x1s on mkl"] > 0)
    assert "1×1s on MKL" in capsys.readouterr().out


def test_the_mkl_bench_refuses_an_unknown_backend(
    bench_path: None, monkeypatch: pytest.MonkeyPatch, capsys, tmp_path: Path
) -> None:
    argv = ["--backends", "replay,fast", "--out", str(tmp_path / "out")]
    assert _run_script("bench_pointwise_mkl.py", argv, monkeypatch) == 2
    assert "argument --backends: unknown ['fast']" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_the_weight_gradient_bench_times_float16_products_where_they_run(
    bench_path: None, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import json

    from resnext.speed import pointwise_fp16

    if pointwise_fp16.unavailable_reason() is not None:
        pytest.skip(f"fp16 kernel unavailable: {pointwise_fp16.unavailable_reason()}")
    # another source of the kernel: a copy (the same arithmetic), and one summing runs of 32
    source = pointwise_fp16.SOURCE.read_text()
    (tmp_path / "same").mkdir()
    (tmp_path / "runs32").mkdir()
    same, runs32 = tmp_path / "same" / "k.c", tmp_path / "runs32" / "k.c"
    same.write_text(source)
    assert "RUN = 64," in source
    runs32.write_text(source.replace("RUN = 64,", "RUN = 32,"))
    argv = ["--models", "resnext_tiny", "--batch", "2", "--image-size", "32", "--rounds", "1",
            "--dtypes", "fp32"]  # fmt: skip
    missing = tmp_path / "missing.c"
    assert (
        _run_script(
            "bench_pointwise_train.py", [*argv, "--against-fp16", str(missing)], monkeypatch
        )
        == 1
    )
    assert not (tmp_path / "out").exists()  # refused before timing anything
    differences = {}
    for other in (same, runs32):
        out = tmp_path / "out" / other.parent.name
        run = [*argv, "--against-fp16", str(other), "--out", str(out)]
        assert _run_script("bench_pointwise_train.py", run, monkeypatch) == 0
        (record,) = out.glob("bench-pointwise-train-*.json")
        layers = json.loads(record.read_text())["results"]["weight_grad"]
        with_fp16 = {key for key, row in layers.items() if "fp16_ms" in row}
        # the kernel's weight gradient takes input channels in multiples of 32 (key: fp32/cin-cout/…)
        assert with_fp16 == {k for k in layers if int(k.split("/")[1].split("-")[0]) % 32 == 0}
        assert with_fp16 and len(with_fp16) < len(layers)  # both kinds of layer in resnext_tiny
        for key in with_fp16:
            row = layers[key]
            best = min(row["onednn_ms"], row["gemm_ms"])
            assert row["best_other_over_fp16"] == pytest.approx(best / row["fp16_ms"])
            assert row["fp16_against_over_fp16"] == pytest.approx(
                row["fp16_against_ms"] / row["fp16_ms"]
            )
        differences[other.parent.name] = [layers[k]["fp16_against_difference"] for k in with_fp16]
    assert differences["same"] == [0.0] * len(differences["same"])
    assert max(differences["runs32"]) > 0  # other runs, other roundings: seen


# a build of the int8 grouped kernel's entry point that writes the output zero point everywhere
ZERO_POINT_GROUPED_INT8 = """
#include <string.h>
int grouped3x3_u8s8(const unsigned char *x, const signed char *wp, const float *m,
                    const float *b, unsigned char *y, int N, int H, int W, int C, int cpg,
                    int s, int zx, int zy, int relu, int threads) {
  memset(y, zy, (long)N * ((H - 1) / s + 1) * ((W - 1) / s + 1) * C);
  return 0;
}
"""


def test_the_int8_bench_times_another_build_only_where_it_gives_the_same_codes(
    bench_path: None, monkeypatch: pytest.MonkeyPatch, capsys, tmp_path
) -> None:
    from resnext.speed import grouped_int8

    reason = grouped_int8.unavailable_reason()
    if reason is not None:
        pytest.skip(f"our int8 grouped kernel does not run here: {reason}")
    import bench_int8_kernels

    same = tmp_path / "same.c"
    same.write_text(grouped_int8.active().source.read_text())
    rows = bench_int8_kernels.layer_rows(1, 1, same)
    assert len(rows) == len(bench_int8_kernels.LAYERS)
    assert all("against-grouped" in row and row["against-grouped"] > 0 for row in rows.values())
    wrong = tmp_path / "wrong.c"
    wrong.write_text(ZERO_POINT_GROUPED_INT8)
    out = tmp_path / "out"
    argv = ["--batch", "1", "--rounds", "1", "--against", str(wrong), "--out", str(out)]
    assert _run_script("bench_int8_kernels.py", argv, monkeypatch) == 1
    assert "against: refused: " in capsys.readouterr().out
    assert not out.exists()  # nothing written
    unrelated = tmp_path / "unrelated.c"
    unrelated.write_text("int unrelated(void) { return 0; }\n")
    argv[-3] = str(unrelated)
    assert _run_script("bench_int8_kernels.py", argv, monkeypatch) == 1
    assert "unrelated.c defines no grouped3x3_u8s8" in capsys.readouterr().out
    argv[-3] = str(tmp_path / "absent.c")
    assert _run_script("bench_int8_kernels.py", argv, monkeypatch) == 2
    assert "--against: " in capsys.readouterr().err and not out.exists()


def test_the_repeat_bench_runs_fresh_processes_in_alternating_order(
    bench_path: None, monkeypatch: pytest.MonkeyPatch, capsys, tmp_path: Path
) -> None:
    import json

    pair = "eager,eager-fast-fp32"
    argv = ["--pair", pair, "--runs", "2", "--models", "resnext_tiny", "--batch", "2"]
    argv += ["--image-size", "32", "--rounds", "1", "--latency-rounds", "1", "--out", str(tmp_path)]
    assert _run_script("bench_infer_repeat.py", argv, monkeypatch) == 0
    [summary_file] = tmp_path.glob("bench-infer-repeat-*.json")
    data = json.loads(summary_file.read_text())
    assert data["config"]["pair"] == pair.split(",")
    runs = data["results"]["runs"]
    assert len(runs) == 2
    orders = []
    for run, name in zip(runs, data["results"]["run_files"], strict=True):
        raw = json.loads((tmp_path / name).read_text())
        orders.append(raw["config"]["variants"])
        assert raw["config"]["share_timings"] is True
        # one round each: the run's ratio is the two variants' own times divided
        a, b = (raw["results"]["throughput"][f"resnext_tiny/{v}"] for v in pair.split(","))
        assert run["resnext_tiny"]["batch"] == pytest.approx(a["median_ms"] / b["median_ms"])
        a1, b1 = (raw["results"]["latency_batch1"][f"resnext_tiny/{v}"] for v in pair.split(","))
        assert run["resnext_tiny"]["batch1"] == pytest.approx(a1["median_ms"] / b1["median_ms"])
    assert orders == [pair.split(","), pair.split(",")[::-1]]  # the order swapped every other run
    row = data["results"]["summary"]["resnext_tiny"]["batch"]
    assert row["min"] <= row["median"] <= row["max"] and len(row["ratios"]) == 2
    assert "eager faster in" in capsys.readouterr().out


@pytest.mark.parametrize("pair", ["eager", "eager,eager", "eager,no-such-variant"])
def test_the_repeat_bench_refuses_a_pair_that_is_not_two_variants(
    pair: str, bench_path: None, monkeypatch: pytest.MonkeyPatch, capsys, tmp_path: Path
) -> None:
    argv = ["--pair", pair, "--out", str(tmp_path / "o")]
    assert _run_script("bench_infer_repeat.py", argv, monkeypatch) == 2  # argparse's usage error
    assert "expected two different variants" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--runs", "1"], "--runs 1, --rounds 5, --latency-rounds 15: expected at least 2 runs"),
        # the first run's own bench refuses the model: reported by run, no summary written
        (["--image-size", "0"], "run 1 of 2: bench_infer.py"),
    ],
)
def test_the_repeat_bench_refuses_what_it_cannot_run(
    extra: list[str],
    message: str,
    bench_path: None,
    monkeypatch: pytest.MonkeyPatch,
    capsys,
    tmp_path,
) -> None:
    argv = ["--pair", "eager,eager-fast-fp32", "--runs", "2", "--models", "resnext_tiny"]
    argv += [*extra, "--out", str(tmp_path / "o")]
    assert _run_script("bench_infer_repeat.py", argv, monkeypatch) == 1
    assert message in capsys.readouterr().out
    assert not list((tmp_path / "o").glob("bench-infer-repeat-*.json"))
