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


def test_tensors_fingerprint_follows_the_weights_not_the_files(tmp_path):
    import shutil

    import torch

    from conftest import tiny_vae
    from fusedit.files import tensors_fingerprint

    torch.manual_seed(0)
    vae = tiny_vae()
    vae.save_pretrained(tmp_path / "a")
    first = tensors_fingerprint(tmp_path / "a")
    shutil.copytree(tmp_path / "a", tmp_path / "copy")
    vae.save_pretrained(tmp_path / "sharded", max_shard_size="10KB")  # other files, other headers
    assert len(list((tmp_path / "sharded").glob("*.safetensors"))) > 1
    assert tensors_fingerprint(tmp_path / "copy") == tensors_fingerprint(tmp_path / "sharded") == first
    with torch.no_grad():
        vae.decoder.conv_out.bias[0] += 1  # one value of one tensor
    vae.save_pretrained(tmp_path / "tuned")
    assert tensors_fingerprint(tmp_path / "tuned") != first
    assert tensors_fingerprint(tmp_path) is None  # no weights here


def killed_mid_write(path) -> None:
    """A process killed (SIGKILL) inside ``write_atomic(path, ...)``: what it leaves is its temporary file."""
    import signal
    import subprocess
    import sys

    code = (
        "import os, signal, sys; from fusedit.files import write_atomic; "
        "write_atomic(sys.argv[1], lambda h: (h.write(b'half'), os.kill(os.getpid(), signal.SIGKILL)))"
    )
    done = subprocess.run([sys.executable, "-c", code, str(path)], check=False)
    assert done.returncode == -signal.SIGKILL


def test_the_temporaries_a_kill_left_are_swept_and_nothing_else(tmp_path):
    from fusedit.files import sweep_temporaries, temporary_of

    killed_mid_write(tmp_path / "00001.png")
    killed_mid_write(tmp_path / "sub" / "metadata.jsonl")
    left = [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert len(left) == 1 and temporary_of(left[0]) == "00001.png"
    mine = ["notes.tmp", ".notes.tmp", ".draft.txt.tmp", ".x.png.ABCDEFGH.tmp", "a.png.abcdefgh.tmp"]
    for name in mine:
        (tmp_path / name).write_text("mine")
    (tmp_path / ".grid.png.abcd_123.tmp").write_text("")  # a temporary of another file than asked for

    import re

    assert sweep_temporaries(tmp_path, re.compile(r"\d{5}\.png")) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*mine, ".grid.png.abcd_123.tmp", "sub"])
    assert len(list((tmp_path / "sub").iterdir())) == 1  # not recursive unless asked
    assert sweep_temporaries(tmp_path, recursive=True) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*mine, "sub"])
    assert list((tmp_path / "sub").iterdir()) == []
    assert sweep_temporaries(tmp_path / "missing") == 0


def test_a_folder_that_cannot_be_written_is_named_in_one_line(tmp_path, monkeypatch):
    """As root every permission is granted, so the refusal of a read-only file system is imitated: what
    TemporaryFile raises there."""
    import errno
    import tempfile

    from fusedit.files import check_writable

    check_writable(tmp_path / "new" / "out")  # a writable place: nothing made there, nothing left
    assert list(tmp_path.iterdir()) == []

    def read_only(*args, dir=None, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system", str(dir))

    monkeypatch.setattr(tempfile, "TemporaryFile", read_only)
    with pytest.raises(ValueError) as e:
        check_writable(tmp_path)
    assert str(e.value) == (
        f"--out {str(tmp_path)!r} cannot be written: Read-only file system (allowed: a folder you may write "
        "to, on a writable disk)"
    )
    with pytest.raises(ValueError) as e:
        check_writable(tmp_path / "new", "--cache-dir")
    assert str(e.value) == (
        f"--cache-dir {str(tmp_path / 'new')!r} cannot be written (in {str(tmp_path)!r}, where it would be "
        "made): Read-only file system (allowed: a folder you may write to, on a writable disk)"
    )


def test_an_output_folder_may_hold_the_commands_own_earlier_files(tmp_path):
    from fusedit.files import check_output_folder

    (tmp_path / "00000.png").write_text("")
    (tmp_path / "b.txt").write_text("")
    (tmp_path / "a.txt").write_text("")
    ours = lambda path: path.suffix == ".png"  # noqa: E731
    with pytest.raises(ValueError, match=r"already holds other files \(e\.g\. 'a\.txt'\);"):
        check_output_folder(tmp_path, "images", "an earlier sample", ours)
    for name in ("a.txt", "b.txt"):
        (tmp_path / name).unlink()
    assert check_output_folder(tmp_path, "images", "an earlier sample", ours) == tmp_path
    # A folder is named as one: "(e.g. 'sub')" read as a file (h-docs R9).
    (tmp_path / "sub").mkdir()
    with pytest.raises(ValueError, match=r"already holds other files \(e\.g\. the folder 'sub'\);"):
        check_output_folder(tmp_path, "images", "an earlier sample", ours)
