"""Tar extraction refuses escapes, special files and bombs, and leaves nothing partial."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest

from resnext.errors import DataError, UnsafeFileError
from resnext.io.safe_tar import safe_extract


def _add_file(tar: tarfile.TarFile, name: str, data: bytes = b"hello") -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _add_link(tar: tarfile.TarFile, name: str, target: str, kind: bytes = tarfile.SYMTYPE) -> None:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = target
    tar.addfile(info)


def _archive(tmp_path: Path, build, mode: str = "w:gz") -> Path:
    path = tmp_path / "in" / "a.tar.gz"
    path.parent.mkdir(exist_ok=True)
    with tarfile.open(path, mode) as tar:
        build(tar)
    return path


def _assert_nothing_left(tmp_path: Path, target: Path) -> None:
    assert not target.exists()
    leftovers = [p.name for p in target.parent.iterdir() if p.name.startswith(".")]
    assert leftovers == []
    assert not (tmp_path / "evil.txt").exists()
    assert not (tmp_path / "out" / "evil.txt").exists()


def test_good_archive_extracts(tmp_path: Path) -> None:
    def build(tar: tarfile.TarFile) -> None:
        _add_file(tar, "pkg/a.txt", b"A")
        _add_file(tar, "./pkg/sub/b.txt", b"BB")
        _add_link(tar, "pkg/link", "a.txt")
        _add_link(tar, "pkg/hard", "pkg/a.txt", tarfile.LNKTYPE)

    target = tmp_path / "out" / "x"
    safe_extract(_archive(tmp_path, build), target)
    assert (target / "pkg" / "a.txt").read_bytes() == b"A"
    assert (target / "pkg" / "sub" / "b.txt").read_bytes() == b"BB"
    assert (target / "pkg" / "link").read_bytes() == b"A"
    assert (target / "pkg" / "hard").read_bytes() == b"A"


@pytest.mark.parametrize(
    "build, why",
    [
        (lambda t: _add_file(t, "../evil.txt"), "'..'"),
        (lambda t: _add_file(t, "ok/../../evil.txt"), "'..'"),
        (lambda t: _add_file(t, "/tmp/evil.txt"), "absolute"),
        (lambda t: _add_link(t, "lnk", "../../evil.txt"), "outside"),
        (lambda t: _add_link(t, "lnk", "/etc/passwd"), "absolute"),
        (lambda t: _add_link(t, "hard", "../evil.txt", tarfile.LNKTYPE), "outside"),
    ],
)
def test_escaping_members_refused(tmp_path: Path, build, why: str) -> None:
    def full(tar: tarfile.TarFile) -> None:
        _add_file(tar, "first.txt")  # a good member first: it must not survive the refusal
        build(tar)

    target = tmp_path / "out" / "x"
    target.parent.mkdir()
    with pytest.raises(UnsafeFileError) as info:
        safe_extract(_archive(tmp_path, full), target)
    assert why in str(info.value)
    _assert_nothing_left(tmp_path, target)


def test_write_through_symlink_refused(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()

    def build(tar: tarfile.TarFile) -> None:
        _add_link(tar, "dir", str(outside))
        _add_file(tar, "dir/evil.txt")

    target = tmp_path / "out" / "x"
    with pytest.raises(UnsafeFileError):
        safe_extract(_archive(tmp_path, build), target)
    assert list(outside.iterdir()) == []
    _assert_nothing_left(tmp_path, target)


@pytest.mark.parametrize(
    "members",
    [
        # Textually 'd/..' is the link's own folder; through d -> '.' it is the folder above.
        [("sym", "d", "."), ("sym", "x", "d/..")],
        [("sym", "d", "."), ("sym", "x", "d/.."), ("dir", "x/CREATED", "")],
        # 'a' is missing when x is checked; the later a -> '.' makes x lead to the folder above.
        [("sym", "x", "a/../b"), ("sym", "a", ".")],
        [("sym", "x", "a/../b"), ("sym", "a", "."), ("dir", "x/CREATED", "")],
        [("sym", "x", "a/../b"), ("sym", "a", "."), ("file", "x/evil.txt", "")],
    ],
)
def test_links_resolved_through_earlier_links_are_refused(tmp_path: Path, members: list) -> None:
    def build(tar: tarfile.TarFile) -> None:
        for kind, name, arg in members:
            if kind == "sym":
                _add_link(tar, name, arg)
            elif kind == "dir":
                info = tarfile.TarInfo(name)
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            else:
                _add_file(tar, name)

    target = tmp_path / "out" / "x"
    target.parent.mkdir()
    with pytest.raises(UnsafeFileError, match=r"outside|leaves the target"):
        safe_extract(_archive(tmp_path, build), target)
    _assert_nothing_left(tmp_path, target)
    assert list(target.parent.iterdir()) == []  # no CREATED, b or evil.txt beside the target


def test_link_through_an_earlier_link_inside_extracts(tmp_path: Path) -> None:
    def build(tar: tarfile.TarFile) -> None:
        _add_file(tar, "pkg/a.txt", b"A")
        _add_link(tar, "d", "pkg")
        _add_link(tar, "x", "d/../pkg/a.txt")

    target = tmp_path / "out" / "x"
    safe_extract(_archive(tmp_path, build), target)
    assert (target / "x").read_bytes() == b"A"


def test_device_and_fifo_refused(tmp_path: Path) -> None:
    for kind in (tarfile.CHRTYPE, tarfile.FIFOTYPE):

        def build(tar: tarfile.TarFile, kind: bytes = kind) -> None:
            info = tarfile.TarInfo("dev")
            info.type = kind
            tar.addfile(info)

        target = tmp_path / "out" / "x"
        with pytest.raises(UnsafeFileError, match="special file"):
            safe_extract(_archive(tmp_path, build), target)
        _assert_nothing_left(tmp_path, target)


def test_tar_bomb_limits(tmp_path: Path) -> None:
    def many(tar: tarfile.TarFile) -> None:
        for i in range(20):
            _add_file(tar, f"f{i}.txt")

    target = tmp_path / "out" / "x"
    with pytest.raises(UnsafeFileError, match="more than 10 members"):
        safe_extract(_archive(tmp_path, many), target, max_members=10)
    _assert_nothing_left(tmp_path, target)

    def big(tar: tarfile.TarFile) -> None:
        _add_file(tar, "zeros.bin", bytes(1_000_000))  # compresses to ~1 kB: a small bomb

    path = _archive(tmp_path, big)
    assert path.stat().st_size < 10_000
    with pytest.raises(UnsafeFileError, match="exceeds 100000 bytes"):
        safe_extract(path, target, max_total_bytes=100_000)
    _assert_nothing_left(tmp_path, target)


def test_corrupt_archive_and_existing_target(tmp_path: Path) -> None:
    bad = tmp_path / "bad.tar.gz"
    bad.write_bytes(b"\x1f\x8b\x08\x00garbage" * 10)
    with pytest.raises(DataError, match=r"bad\.tar\.gz"):
        safe_extract(bad, tmp_path / "t")
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("mine")
    good = _archive(tmp_path, lambda t: _add_file(t, "a.txt"))
    with pytest.raises(DataError, match="already exists"):
        safe_extract(good, full)
    assert (full / "keep.txt").read_text() == "mine"
