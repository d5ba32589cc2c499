"""Atomic writes: a write that fails midway leaves the old file whole and no temporary file behind."""

import os

import pytest

from fusedit.files import write_atomic, write_text_atomic


def test_a_failed_write_keeps_the_old_file_and_leaves_nothing_behind(tmp_path):
    path = tmp_path / "sub" / "state.json"
    write_text_atomic(path, "old")
    assert path.read_text() == "old" and os.stat(path).st_mode & 0o777 == 0o644

    def half_then_fail(handle):
        handle.write(b"new, but only ha")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_atomic(path, half_then_fail)
    assert path.read_text() == "old"
    assert sorted(p.name for p in path.parent.iterdir()) == ["state.json"]
    write_text_atomic(path, "néw")
    assert path.read_text(encoding="utf-8") == "néw"
