"""The LD_PRELOAD re-exec helper: finds libraries, builds the environment, never loops."""

from __future__ import annotations

from pathlib import Path

import pytest

from resnext.errors import ConfigError
from resnext.speed import allocator
from resnext.speed.allocator import (
    GUARD_VAR,
    find_allocator,
    loaded_allocator,
    plan_reexec,
    reexec_with_allocator,
)


def test_find_allocator_prefers_tcmalloc(tmp_path: Path) -> None:
    (tmp_path / "libjemalloc.so.2").write_bytes(b"")
    assert find_allocator("auto", [tmp_path]) == tmp_path / "libjemalloc.so.2"
    (tmp_path / "libtcmalloc_minimal.so.4").write_bytes(b"")
    assert find_allocator("auto", [tmp_path]) == tmp_path / "libtcmalloc_minimal.so.4"
    assert find_allocator("jemalloc", [tmp_path]) == tmp_path / "libjemalloc.so.2"


def test_find_allocator_absent_and_bad_choice(tmp_path: Path) -> None:
    assert find_allocator("auto", [tmp_path]) is None
    with pytest.raises(ConfigError, match="allocator"):
        find_allocator("mimalloc", [tmp_path])


def test_loaded_allocator_reads_maps() -> None:
    line = "7f00-7f01 r-xp 0 08:01 1 /usr/lib/x86_64-linux-gnu/libjemalloc.so.2\n"
    assert loaded_allocator(line) == "jemalloc"
    assert loaded_allocator("7f00-7f01 r-xp 0 08:01 1 /usr/lib/libc.so.6\n") is None


def test_plan_sets_preload_and_guard() -> None:
    lib = Path("/x/libtcmalloc_minimal.so.4")
    env = plan_reexec({"LD_PRELOAD": "/y/other.so", "HOME": "/h"}, lib, None)
    assert env is not None
    assert env["LD_PRELOAD"] == "/x/libtcmalloc_minimal.so.4:/y/other.so"
    assert env[GUARD_VAR] == "1" and env["HOME"] == "/h"


def test_plan_refuses_when_guarded_disabled_loaded_or_missing() -> None:
    lib = Path("/x/libtcmalloc_minimal.so.4")
    assert plan_reexec({GUARD_VAR: "1"}, lib, None) is None
    assert plan_reexec({"RESNEXT_NO_PRELOAD": "1"}, lib, None) is None
    assert plan_reexec({}, lib, "jemalloc") is None
    assert plan_reexec({}, None, None) is None


def test_reexec_runs_once_then_guard_stops_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "libtcmalloc_minimal.so.4").write_bytes(b"")
    monkeypatch.setattr(allocator, "find_allocator", lambda c: find_allocator(c, [tmp_path]))
    monkeypatch.setattr(allocator, "loaded_allocator", lambda: None)
    monkeypatch.delenv(GUARD_VAR, raising=False)
    monkeypatch.delenv("RESNEXT_NO_PRELOAD", raising=False)
    calls: list[tuple[str, list[str], dict[str, str]]] = []

    def fake_execve(path: str, argv: list[str], env: dict[str, str]) -> None:
        calls.append((path, list(argv), dict(env)))

    reexec_with_allocator(execve=fake_execve, argv=["python", "-m", "resnext.cli", "bench"])
    assert len(calls) == 1
    _, argv, env = calls[0]
    assert argv[1:] == ["-m", "resnext.cli", "bench"]
    assert env["LD_PRELOAD"].startswith(str(tmp_path))
    # The re-executed process sees the guard and does not exec again.
    monkeypatch.setenv(GUARD_VAR, env[GUARD_VAR])
    reexec_with_allocator(execve=fake_execve, argv=["python", "x"])
    assert len(calls) == 1
    reexec_with_allocator("none", execve=fake_execve, argv=["python", "x"])
    assert len(calls) == 1


def test_thp_mode_is_the_bracketed_word(tmp_path: Path) -> None:
    setting = tmp_path / "enabled"
    for text, mode in [
        ("always [madvise] never\n", "madvise"),
        ("[always] madvise never\n", "always"),
        ("always madvise [never]\n", "never"),
        ("no brackets\n", None),
    ]:
        setting.write_text(text)
        assert allocator.thp_mode(setting) == mode
    assert allocator.thp_mode(tmp_path / "absent") is None


def test_huge_pages_are_asked_for_only_where_the_kernel_gives_them_and_no_one_said_no(
    tmp_path: Path,
) -> None:
    setting = tmp_path / "enabled"
    setting.write_text("always [madvise] never\n")
    env: dict[str, str] = {}
    assert allocator.request_huge_pages(env, setting) and env == {"THP_MEM_ALLOC_ENABLE": "1"}
    setting.write_text("always madvise [never]\n")
    env = {}
    assert not allocator.request_huge_pages(env, setting) and env == {}
    assert not allocator.request_huge_pages(env, tmp_path / "absent") and env == {}
    setting.write_text("[always] madvise never\n")
    env = {"THP_MEM_ALLOC_ENABLE": "0"}  # the user's word stands
    assert not allocator.request_huge_pages(env, setting) and env == {"THP_MEM_ALLOC_ENABLE": "0"}
    env = {"THP_MEM_ALLOC_ENABLE": "1"}
    assert allocator.request_huge_pages(env, setting)


def test_vm_flags_are_those_of_the_mapping_holding_the_address(tmp_path: Path) -> None:
    smaps = tmp_path / "smaps"
    smaps.write_text(
        "1000-2000 rw-p 00000000 00:00 0\n"
        "Size:                  4 kB\n"
        "VmFlags: rd wr mr mw me ac sd\n"
        "3000-5000 rw-p 00000000 00:00 0 [heap]\n"
        "AnonHugePages:         0 kB\n"
        "VmFlags: rd wr mr mw me ac sd hg\n"
    )
    assert allocator.vm_flags(0x1800, smaps)[-1] == "sd"
    assert allocator.vm_flags(0x3000, smaps)[-1] == "hg"
    assert allocator.vm_flags(0x2800, smaps) == [] and allocator.vm_flags(0x5000, smaps) == []
    assert allocator.vm_flags(0x1800, tmp_path / "absent") == []


@pytest.mark.parametrize("asked", [True, False])
def test_a_process_asking_before_its_first_tensor_gets_huge_pages(asked: bool) -> None:
    import os
    import subprocess
    import sys

    if allocator.thp_mode() not in ("always", "madvise"):
        pytest.skip(f"transparent huge pages not offered here ({allocator.thp_mode()})")
    env = {**os.environ, "THP_MEM_ALLOC_ENABLE": "1" if asked else "0"}
    code = "from resnext.speed.allocator import huge_pages_in_use as h; print(h())"
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    assert done.stdout.strip() == str(asked)


def test_a_replayed_console_prediction_asks_for_huge_pages_and_nothing_else_does(
    monkeypatch,
) -> None:
    import os
    import sys

    from resnext.cli import build_parser, main, wants_huge_pages

    parser = build_parser()
    assert wants_huge_pages(
        parser.parse_args(["predict", "a.jpg", "--optimize", "fp32", "--replay"])
    )
    assert wants_huge_pages(
        parser.parse_args(["eval", "--data", "d", "--optimize", "fp32", "--replay"])
    )
    assert not wants_huge_pages(parser.parse_args(["predict", "a.jpg", "--optimize", "fp32"]))
    assert not wants_huge_pages(parser.parse_args(["list"]))
    # a console run that does not replay leaves the switch alone
    monkeypatch.delenv("THP_MEM_ALLOC_ENABLE", raising=False)
    monkeypatch.setattr(sys, "argv", ["resnext", "list", "resnext_tiny"])
    assert main() == 0 and "THP_MEM_ALLOC_ENABLE" not in os.environ
