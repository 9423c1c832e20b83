"""scripts/fuzz_kernels.py: each kind of case runs and passes here, and a wrong kernel is reported."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "fuzz_kernels.py"


@pytest.fixture
def fuzz() -> ModuleType:
    spec = importlib.util.spec_from_file_location("fuzz_kernels", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("what", ["optimize", "train"])
def test_a_case_passes_here_and_leaves_the_process_as_it_was(
    fuzz: ModuleType, what: str, capsys
) -> None:
    from resnext.speed import autotune, grouped_swap, timing_cache

    threads, chooser = torch.get_num_threads(), autotune.CHOOSER
    assert fuzz.main([what, "--cases", "1", "--seed", "3"]) == 0
    assert f"{what}: 1 cases, 0 failed" in capsys.readouterr().out
    # the drawn timings and choosers, and the thread count, are the process's own again
    assert grouped_swap.cached is timing_cache.cached and autotune.CHOOSER is chooser
    assert torch.get_num_threads() == threads


def test_crop_cases_pass_on_real_jpegs(fuzz: ModuleType, imagenet_sample: Path, capsys) -> None:
    assert fuzz.main(["crop", "--cases", "20", "--root", str(imagenet_sample)]) == 0
    assert "crop: 20 cases, 0 failed" in capsys.readouterr().out


def test_a_fast_path_computing_something_else_fails_the_run(
    fuzz: ModuleType, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    import resnext

    real = resnext.optimize

    def off_by_a_little(model, *args, **kwargs):
        fast = real(model, *args, **kwargs)
        return lambda x: fast(x) * 1.1  # 10 % of the output: over every precision's bound

    monkeypatch.setattr(resnext, "optimize", off_by_a_little)
    assert fuzz.main(["optimize", "--cases", "1"]) == 1
    out = capsys.readouterr().out
    assert "FAILED" in out and "output" in out and "optimize: 1 cases, 1 failed" in out


def test_a_replay_that_cannot_record_fails_the_run(
    fuzz: ModuleType, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    from resnext.speed import replay

    if replay.unavailable_reason() is not None:
        pytest.skip(f"no replay here: {replay.unavailable_reason()}")

    def refused(*args, **kwargs):
        raise replay.ReplayUnavailable("refused for this test")

    monkeypatch.setattr(replay, "capture", refused)
    assert fuzz.main(["optimize", "--cases", "4", "--seed", "1"]) == 1
    out = capsys.readouterr().out
    assert "backend replay: optimize: replay recording failed" in out


def test_bad_arguments_are_named(fuzz: ModuleType, tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match=r"--root: no \.jpg or \.jpeg files under"):
        fuzz.main(["crop", "--root", str(tmp_path)])
    with pytest.raises(SystemExit):
        fuzz.main(["optimize", "--cases", "0"])


def _two_codes_up(y: torch.Tensor) -> torch.Tensor:
    """A quint8 map with every code two higher (saturating): a kernel gone wrong."""
    codes = (y.int_repr().int() + 2).clamp(0, 255).to(torch.uint8)
    return torch._make_per_tensor_quantized_tensor(codes, y.q_scale(), y.q_zero_point())


def test_int8_cases_pass_here_and_a_kernel_two_codes_off_fails(
    fuzz: ModuleType, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    from resnext.speed import add_int8, grouped_int8

    if grouped_int8.unavailable_reason() is not None:
        pytest.skip(
            f"the int8 grouped kernel does not run here: {grouped_int8.unavailable_reason()}"
        )
    threads = torch.get_num_threads()
    assert fuzz.main(["int8", "--cases", "12", "--seed", "5"]) == 0
    assert "int8: 12 cases, 0 failed" in capsys.readouterr().out
    assert torch.get_num_threads() == threads
    real = grouped_int8.GroupedInt8.__call__

    def two_codes_up(self, x, scale, zero_point):
        return _two_codes_up(real(self, x, scale, zero_point))

    monkeypatch.setattr(grouped_int8.GroupedInt8, "__call__", two_codes_up)
    assert fuzz.main(["int8", "--cases", "2"]) == 1
    out = capsys.readouterr().out
    assert "codes off" in out and "int8: 2 cases, 2 failed" in out
    # and the add kernel, checked in each case after the convolution where it runs (AVX-512 or AVX2)
    monkeypatch.setattr(grouped_int8.GroupedInt8, "__call__", real)
    real_add = add_int8.add_relu

    def add_two_codes_up(a, b, scale, zero_point, relu=True):
        return _two_codes_up(real_add(a, b, scale, zero_point, relu))

    monkeypatch.setattr(add_int8, "add_relu", add_two_codes_up)
    if add_int8.unavailable_reason() is None:
        assert fuzz.main(["int8", "--cases", "2"]) == 1
        out = capsys.readouterr().out
        assert "add of" in out and "int8: 2 cases, 2 failed" in out
    else:  # not called where it cannot run
        assert fuzz.main(["int8", "--cases", "2"]) == 0
