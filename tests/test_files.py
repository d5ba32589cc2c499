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
