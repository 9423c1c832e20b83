"""Building the C parts on first use: cached by hash, and every failure a reason, never a crash."""

from __future__ import annotations

import ctypes
import hashlib
from pathlib import Path

import pytest

from resnext import native


def _source(tmp_path: Path, body: str = "int answer(void) { return 42; }\n") -> Path:
    path = tmp_path / "tiny.c"
    path.write_text(body)
    return path


def test_build_caches_by_source_and_loads(tmp_path: Path) -> None:
    if native.problem(native.compiler) is not None:
        pytest.skip(f"no C compiler: {native.problem(native.compiler)}")
    import ctypes

    out = tmp_path / "cache"
    first = native.build(_source(tmp_path), ("-O2",), out_dir=out)
    assert ctypes.CDLL(str(first)).answer() == 42
    stamp = first.stat().st_mtime_ns
    assert native.build(_source(tmp_path), ("-O2",), out_dir=out) == first
    assert first.stat().st_mtime_ns == stamp  # not rebuilt
    # no temporary left behind: the library and the record of its size and digest
    assert sorted(p.name for p in out.iterdir()) == [first.name, first.name + ".sum"]
    changed = native.build(
        _source(tmp_path, "int answer(void) { return 7; }\n"), ("-O2",), out_dir=out
    )
    assert changed != first and ctypes.CDLL(str(changed)).answer() == 7


def _needs_compiler() -> None:
    if native.problem(native.compiler) is not None:
        pytest.skip(f"no C compiler: {native.problem(native.compiler)}")


def test_a_truncated_library_in_the_cache_is_built_again(tmp_path: Path) -> None:
    # a cut-short library (full disk, interrupted copy) would be loaded as built: dlopen maps
    # past its end and the process dies of SIGBUS at the first touch
    _needs_compiler()
    out = tmp_path / "cache"
    first = native.build(_source(tmp_path), ("-O2",), out_dir=out)
    whole = first.read_bytes()
    first.write_bytes(whole[:3000])
    again = native.build(_source(tmp_path), ("-O2",), out_dir=out)
    assert again == first and again.stat().st_size == len(whole)
    assert ctypes.CDLL(str(again)).answer() == 42


@pytest.mark.parametrize("record", ["missing", "matching"])
def test_a_garbage_library_in_the_cache_is_built_again_and_loaded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, record: str
) -> None:
    # garbage with no record (a cache from before records, or a copied-in file) fails the check;
    # garbage whose record matches it (both overwritten) fails dlopen: either is rebuilt once,
    # never left to disable the kernel in every later process
    _needs_compiler()
    monkeypatch.setenv("RESNEXT_KERNEL_CACHE", str(tmp_path / "cache"))
    library = native.build(_source(tmp_path), ("-O2",))
    sidecar = library.with_name(library.name + ".sum")
    garbage = b"garbage\n"
    library.write_bytes(garbage)
    if record == "missing":
        sidecar.unlink()
    else:
        sidecar.write_text(f"{len(garbage)} {hashlib.sha256(garbage).hexdigest()}\n")
    assert native.load(_source(tmp_path), ("-O2",)).answer() == 42
    assert library.read_bytes()[:4] == b"\x7fELF"


def test_a_library_that_cannot_be_loaded_is_a_reason(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # a library that fails dlopen even when freshly built (here: a needed symbol nowhere)
    _needs_compiler()
    monkeypatch.setenv("RESNEXT_KERNEL_CACHE", str(tmp_path / "cache"))
    body = "extern int nowhere_xyz(void);\nint answer(void) { return nowhere_xyz(); }\n"
    flags = ("-O2", "-Wl,-z,now", "-Wl,--unresolved-symbols=ignore-all")
    with pytest.raises(native.NativeUnavailable, match=r"loading tiny-.*\.so failed"):
        native.load(_source(tmp_path, body), flags)


def test_failures_are_reasons(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    if native.problem(native.compiler) is None:
        with pytest.raises(native.NativeUnavailable, match="a-file"):
            native.build(_source(tmp_path), ("-O2",), out_dir=blocker / "cache")
        with pytest.raises(native.NativeUnavailable, match=r"compiling tiny\.c failed"):
            native.build(_source(tmp_path, "this is not C"), ("-O2",), out_dir=tmp_path / "c2")
        assert list((tmp_path / "c2").iterdir()) == []  # no half-written library left
    monkeypatch.setenv("CC", "no-such-cc-xyz")
    reason = native.problem(lambda: native.build(_source(tmp_path), ("-O2",), out_dir=tmp_path))
    assert reason is not None and "no-such-cc-xyz" in reason


def test_a_changed_local_header_rebuilds(tmp_path: Path) -> None:
    if native.problem(native.compiler) is not None:
        pytest.skip(f"no C compiler: {native.problem(native.compiler)}")
    import ctypes

    header = tmp_path / "value.h"
    header.write_text("#define VALUE 3\n")
    source = _source(tmp_path, '#include "value.h"\nint answer(void) { return VALUE; }\n')
    assert native.local_headers(source) == [header]
    out = tmp_path / "cache"
    first = native.build(source, ("-O2",), out_dir=out)
    assert ctypes.CDLL(str(first)).answer() == 3
    header.write_text("#define VALUE 5\n")
    second = native.build(source, ("-O2",), out_dir=out)
    assert second != first and ctypes.CDLL(str(second)).answer() == 5


def test_a_header_included_by_a_header_rebuilds_too(tmp_path: Path) -> None:
    if native.problem(native.compiler) is not None:
        pytest.skip(f"no C compiler: {native.problem(native.compiler)}")
    import ctypes

    inner, outer = tmp_path / "inner.h", tmp_path / "outer.h"
    inner.write_text("#define VALUE 3\n")
    outer.write_text(
        '#ifndef OUTER\n#define OUTER\n#include "inner.h"\n#include "outer.h"\n'
        "#define TWICE (2 * VALUE)\n#endif\n"
    )
    source = _source(
        tmp_path, '#include "outer.h"\n#include "inner.h"\nint answer(void) { return TWICE; }\n'
    )
    assert native.local_headers(source) == [outer, inner]  # each once, however often included
    out = tmp_path / "cache"
    first = native.build(source, ("-O2",), out_dir=out)
    assert ctypes.CDLL(str(first)).answer() == 6
    inner.write_text("#define VALUE 5\n")
    second = native.build(source, ("-O2",), out_dir=out)
    assert second != first and ctypes.CDLL(str(second)).answer() == 10


def test_a_header_found_through_an_include_folder_rebuilds_too(tmp_path: Path) -> None:
    # another revision's source copied elsewhere, built with -I on the package's kernels: its
    # shared headers are ours, and a changed one must not leave it on a stale cached library
    if native.problem(native.compiler) is not None:
        pytest.skip(f"no C compiler: {native.problem(native.compiler)}")
    import ctypes

    shared = tmp_path / "kernels"
    shared.mkdir()
    header = shared / "value.h"
    header.write_text("#define VALUE 3\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    source = _source(elsewhere, '#include "value.h"\nint answer(void) { return VALUE; }\n')
    flags = ("-O2", f"-I{shared}")
    assert native.local_headers(source) == []
    assert native.local_headers(source, [shared]) == [header]
    out = tmp_path / "cache"
    first = native.build(source, flags, out_dir=out)
    assert ctypes.CDLL(str(first)).answer() == 3
    header.write_text("#define VALUE 5\n")
    second = native.build(source, flags, out_dir=out)
    assert second != first and ctypes.CDLL(str(second)).answer() == 5


def test_load_checks_the_cpu_before_building(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("RESNEXT_KERNEL_CACHE", str(tmp_path / "cache"))
    with pytest.raises(native.NativeUnavailable, match=r"this CPU lacks \['no-such-flag'\]"):
        native.load(_source(tmp_path), ("-O2",), cpu_needs=frozenset({"no-such-flag"}))
    assert not (tmp_path / "cache").exists()  # refused before compiling anything
    if native.problem(native.compiler) is not None:
        pytest.skip(f"no C compiler: {native.problem(native.compiler)}")
    assert native.load(_source(tmp_path), ("-O2",)).answer() == 42


def test_every_kernel_source_and_header_ships_with_the_package() -> None:
    # A kernel is compiled from the installed package on first use: a .c or .h file that the
    # package data globs miss builds in a checkout and fails after `pip install`.
    import fnmatch

    import tomllib

    root = Path(__file__).resolve().parents[2]
    globs = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"][
        "package-data"
    ]["resnext"]
    package = root / "src" / "resnext"
    kernels = [p for p in package.glob("**/kernels/*") if p.suffix in (".c", ".h")]
    assert len(kernels) >= 10
    for path in kernels:
        rel = path.relative_to(package).as_posix()
        assert any(fnmatch.fnmatch(rel, g) for g in globs), f"{rel} is not package data"
    for source in (p for p in kernels if p.suffix == ".c"):
        for header in native.local_headers(source):
            assert header in kernels, f"{source.name} includes {header.name}, not shipped"


def test_a_build_compiles_another_revisions_copy_with_its_shared_headers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if native.problem(native.compiler) is not None:
        pytest.skip(f"no C compiler: {native.problem(native.compiler)}")
    monkeypatch.setenv("RESNEXT_KERNEL_CACHE", str(tmp_path / "cache"))
    ours = tmp_path / "kernels"
    ours.mkdir()
    (ours / "value.h").write_text("#define VALUE 5\n")
    body = '#include "value.h"\nint answer(void) { return VALUE; }\n'
    (ours / "k.c").write_text(body)
    other = tmp_path / "elsewhere"
    other.mkdir()
    (other / "k.c").write_text(body.replace("VALUE;", "VALUE + 1;"))  # its header is ours
    build = native.Build("plain", ours / "k.c", ("-O2",), frozenset(), headers=ours)
    assert build.load().answer() == 5
    assert build.load(other / "k.c").answer() == 6
    without = native.Build("plain", ours / "k.c", ("-O2",), frozenset())
    with pytest.raises(native.NativeUnavailable, match=r"compiling k\.c failed"):
        without.load(other / "k.c")


def test_first_that_runs_takes_the_first_and_names_each_reason(tmp_path: Path) -> None:
    builds = [
        native.Build(name, tmp_path / f"{name}.c", (), frozenset())
        for name in ("wide", "narrow", "plain")
    ]
    fails = {"wide": "this CPU lacks ['wide_flag']", "narrow": "compiling narrow.c failed"}
    asked: list[str] = []

    def why_not(build: native.Build) -> str | None:
        asked.append(build.name)
        return fails.get(build.name)

    assert native.first_that_runs(builds, why_not) is builds[2]
    assert asked == ["wide", "narrow", "plain"]  # in order, each once
    with pytest.raises(native.NativeUnavailable) as caught:
        native.first_that_runs(builds[:2], why_not)
    assert str(caught.value) == (
        "wide: this CPU lacks ['wide_flag']; narrow: compiling narrow.c failed"
    )


def test_builds_load_each_once_and_use_the_first_that_runs(tmp_path: Path) -> None:
    if native.problem(native.compiler) is not None:
        pytest.skip(f"no C compiler: {native.problem(native.compiler)}")
    (tmp_path / "k.c").write_text("int answer(void) { return 7; }\n")
    wide = native.Build("wide", tmp_path / "k.c", ("-O2",), frozenset({"no_such_cpu_flag"}))
    plain = native.Build("plain", tmp_path / "k.c", ("-O2",), frozenset())
    other = native.Build("other", tmp_path / "k.c", ("-O1",), frozenset())
    loads: list[str] = []

    def load(build: native.Build) -> ctypes.CDLL:
        loads.append(build.name)
        return build.load()

    choice = native.Builds([wide, plain, other], load)
    assert choice.active() is plain
    assert choice.problem(wide) == "this CPU lacks ['no_such_cpu_flag']"
    assert choice.runnable() == [plain, other]
    assert loads == ["wide", "plain", "other"]  # each checked once, however often asked
    lib = choice.library(plain)
    assert lib.answer() == 7
    assert choice.library(plain) is lib and choice.active() is plain
    assert loads == ["wide", "plain", "other"]  # the checked library is the one handed out
    with pytest.raises(native.NativeUnavailable, match="no_such_cpu_flag"):
        choice.library(wide)  # a build that fails says why whenever it is asked for
    with pytest.raises(native.NativeUnavailable, match="wide: this CPU lacks"):
        native.Builds([wide], load).active()
