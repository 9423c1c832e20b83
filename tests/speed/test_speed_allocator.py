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
