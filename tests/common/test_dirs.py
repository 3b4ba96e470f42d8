"""Atomic directory replacement never deletes a directory the project did not mark as its own."""

from __future__ import annotations

from pathlib import Path

import pytest

from common.dirs import check_replaceable, replace_dir_atomically
from common.errors import ShrinkError

MARK = "shrink.json"


def _tmp_payload(parent: Path, text: str) -> Path:
    tmp = parent / ".dest.tmp-x"
    tmp.mkdir()
    (tmp / MARK).write_text(text)
    return tmp


def test_replaces_a_marked_directory(tmp_path: Path):
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / MARK).write_text("old")
    replace_dir_atomically(_tmp_payload(tmp_path, "new"), dest, MARK)
    assert (dest / MARK).read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dest"]


def test_refuses_an_unmarked_directory_and_keeps_it(tmp_path: Path):
    dest = tmp_path / "eval"
    dest.mkdir()
    (dest / "notes.txt").write_text("mine")
    tmp = _tmp_payload(tmp_path, "new")
    with pytest.raises(ShrinkError, match=str(dest)):
        replace_dir_atomically(tmp, dest, MARK)
    assert (dest / "notes.txt").read_text() == "mine"
    assert not (dest / MARK).exists()


def test_refuses_a_file_in_the_way(tmp_path: Path):
    dest = tmp_path / "eval"
    dest.write_text("a file")
    with pytest.raises(ShrinkError, match="not a directory"):
        check_replaceable(dest, MARK)
    assert dest.read_text() == "a file"


def test_absent_destination_is_fine(tmp_path: Path):
    check_replaceable(tmp_path / "absent", MARK)
    replace_dir_atomically(_tmp_payload(tmp_path, "new"), tmp_path / "absent", MARK)
    assert (tmp_path / "absent" / MARK).read_text() == "new"
