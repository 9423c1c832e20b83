"""The `resnext list` and `resnext info` commands."""

from __future__ import annotations

import json

import pytest

from resnext.cli import main


def test_list_prints_params_and_flops(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["list", "resnext50_32x4d"]) == 0
    out = capsys.readouterr().out
    assert "25,028,904" in out and "4.23" in out and "multiply-adds" in out


def test_list_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["list", "resnext29_*", "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    by_name = {r["name"]: r for r in rows}
    assert by_name["resnext29_8x64d"]["template"] == "8x64d"


def test_info_table_and_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info", "resnext50_32x4d"]) == 0
    out = capsys.readouterr().out
    assert "3x3,128,C=32" in out and "56x56" in out
    assert main(["info", "resnext50_32x4d", "--json", "--input-size", "320"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["input_size"] == 320
    assert info["stages"][0]["output_size"] == [80, 80]
    # FLOPs scale with the pixel count: (320/224)^2 of the 224 value, up to the fc layer.
    assert abs(info["gflops"] / 4.2305 - (320 / 224) ** 2) < 0.01


def test_unknown_model_exit_code_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info", "resnext50_32x5d"]) == 2
    assert "resnext50_32x4d" in capsys.readouterr().err


def test_list_without_a_match_exits_1_in_both_forms(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["list", "zzz*"]) == 1
    assert "no model matches 'zzz*'" in capsys.readouterr().out
    assert main(["list", "zzz*", "--json"]) == 1
    captured = capsys.readouterr()
    assert captured.out == "" and "no model matches 'zzz*'" in captured.err


@pytest.mark.parametrize(
    "argv, option",
    [
        (["demo", "--epochs", "0"], "--epochs"),
        (["demo", "--epochs", "-2"], "--epochs"),
        (["info", "resnext_tiny", "--input-size", "0"], "--input-size"),
        (["info", "resnext_tiny", "--input-size", "two"], "--input-size"),
    ],
)
def test_counts_and_sizes_below_1_are_usage_errors_exit_2(
    capsys: pytest.CaptureFixture[str], argv: list[str], option: str
) -> None:
    # docs/reliability.md: bad invocations exit 2 (a SystemExit with a message exits 1)
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert f"error: argument {option}: expected a whole number >= 1, got" in err


def test_info_names_the_stem_width_of_the_network(capsys: pytest.CaptureFixture[str]) -> None:
    # resnext_tiny_in's 7x7 stem has 16 filters (its registry spec), not ResNet-50's 64
    assert main(["info", "resnext_tiny_in", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["stem"].startswith("7x7, 16, stride 2")


def test_list_weights_shows_the_tags_with_their_published_top1(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["list", "resnext101_64x4d", "--weights", "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    # torchvision's meta (zoo-facts TV/r): IMAGENET1K_V1, the DEFAULT, 83.246 % at 224.
    tv = next(r for r in rows if r["tag"] == "resnext101_64x4d.tv_in1k")
    assert tv["top1"] == 83.246 and tv["eval_size"] == 224 and tv["default"] is True
    assert sum(r["default"] for r in rows) == 1 and len(rows) == 4
    assert main(["list", "*.fb_t7_in1k", "--weights"]) == 0
    table = capsys.readouterr().out
    assert table.count(".fb_t7_in1k") == 3 and " no " in table  # the Lua files: no hash
    assert main(["list", "resnext29*", "--weights"]) == 1  # no CIFAR checkpoints published
