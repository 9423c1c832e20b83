"""`resnext.io.atomic`: a file is replaced whole or not at all, under the user's permissions."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from resnext.io.atomic import replacing, write_bytes, write_text


def test_a_failed_write_keeps_the_old_file_and_leaves_nothing_beside_it(tmp_path: Path) -> None:
    path = tmp_path / "result.json"
    path.write_text("old")
    with pytest.raises(RuntimeError, match="disk full"), replacing(path) as tmp:
        tmp.write_text("half of the new")
        raise RuntimeError("disk full")
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["result.json"]


def test_a_write_replaces_the_file_through_a_fresh_name_with_its_suffix(tmp_path: Path) -> None:
    path = tmp_path / "curves.png"
    with replacing(path) as first, replacing(tmp_path / "curves.png") as second:
        # writers that pick a format by the suffix (savefig, torch.export.save) need it kept;
        # two writers of one target must not share a temporary file
        assert first.suffix == ".png" and first.parent == tmp_path and first != second
        first.write_bytes(b"one")
        second.write_bytes(b"two")
    assert path.read_bytes() == b"one"  # the outer block ended last
    write_bytes(path, b"three", fsync=True)
    assert path.read_bytes() == b"three"
    assert [p.name for p in tmp_path.iterdir()] == ["curves.png"]


def test_new_files_follow_the_umask(tmp_path: Path) -> None:
    # a temporary file made private (mkstemp's 0600) would leave results unreadable to others
    old = os.umask(0o022)
    try:
        write_text(tmp_path / "config.json", "{}\n")
    finally:
        os.umask(old)
    assert (tmp_path / "config.json").stat().st_mode & 0o777 == 0o644


def test_text_keeps_the_newlines_asked_for(tmp_path: Path) -> None:
    write_text(tmp_path / "per_class.csv", "a,b\r\n1,2\r\n", newline="")
    assert (tmp_path / "per_class.csv").read_bytes() == b"a,b\r\n1,2\r\n"
