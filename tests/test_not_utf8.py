"""Captions that are not UTF-8: each sample carries the names of those its reading met (in whichever worker
process or thread read it), the loader sums its batches' into its state, and training reports the run's
total at the end of each stage, a resume included."""

from __future__ import annotations

import io
import json
import logging
import tarfile
from pathlib import Path

import pytest

from conftest import tiny_config
from fusedit.checkpoints import find_checkpoint
from fusedit.config import DataConfig
from fusedit.data.loader import resplit_state, step_loader
from fusedit.train.loop import train
from test_data_sources import _encode, _noise

TAIL = "trained on with their bad bytes as U+FFFD; save captions as UTF-8 to keep every character"


def _folder(root: Path, corrupt: bool = False) -> Path:
    """Four 32x32 captioned images, b's caption saved as Latin-1; with ``corrupt``, an unreadable image
    whose caption is Latin-1 too (skipped: never in a batch)."""
    root.mkdir(parents=True)
    for i, name in enumerate("abcd"):
        _noise(32, 32, i).save(root / f"{name}.png")
        (root / f"{name}.txt").write_text(f"a red {name}")
    (root / "b.txt").write_bytes("a caf\xe9 au lait".encode("latin-1"))
    if corrupt:
        (root / "e.png").write_bytes(b"not an image")
        (root / "e.txt").write_bytes("cr\xe8me".encode("latin-1"))
    return root


def _not_utf8_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if "not UTF-8 (counted" in r.getMessage()]


@pytest.mark.parametrize("workers", [0, 2])
def test_training_reports_the_total_of_captions_not_utf8_at_the_end(tmp_path, caplog, workers):
    root = _folder(tmp_path / "data")
    cfg = tiny_config(
        data={"source": "folder", "root": str(root), "num_workers": workers},
        train={"steps": 3, "checkpoint_every": 3, "device": "cpu"},
    )
    with caplog.at_level(logging.INFO, logger="fusedit"):
        train(cfg, tmp_path / "run", progress=False)
    # A batch of 4 holds all 4 samples: b's caption is read at each of the 3 steps.
    assert _not_utf8_lines(caplog) == [
        f"data: 3 captions read into batches were not UTF-8 (counted each time read; e.g. {root / 'b.txt'}): "
        + TAIL
    ]
    state = json.loads((find_checkpoint(tmp_path / "run") / "data_state.json").read_text())
    assert state["not_utf8"] == {"count": 3, "example": str(root / "b.txt")}


def test_a_resumed_run_reports_the_total_of_the_whole_run(tmp_path, caplog):
    root = _folder(tmp_path / "data")
    cfg = tiny_config(data={"source": "folder", "root": str(root)}, train={"steps": 4, "checkpoint_every": 2})
    train(cfg, tmp_path / "run", stop_at=2, progress=False)
    state = json.loads((find_checkpoint(tmp_path / "run") / "data_state.json").read_text())
    assert state["not_utf8"] == {"count": 2, "example": str(root / "b.txt")}
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="fusedit"):
        train(cfg, tmp_path / "run", resume=True, progress=False)
    assert _not_utf8_lines(caplog) == [
        f"data: 4 captions read into batches were not UTF-8 (counted each time read; e.g. {root / 'b.txt'}): "
        + TAIL
    ]


@pytest.mark.parametrize("workers", [0, 2])
def test_a_skipped_sample_s_caption_is_not_counted_whatever_the_workers(tmp_path, workers):
    root = _folder(tmp_path / "data", corrupt=True)
    cfg = DataConfig(source="folder", root=str(root), image_size=16, min_image_size=16, num_workers=workers)
    loader = step_loader(cfg, 0, 2, 0, 6)
    ids = [i for batch in loader for i in batch["id"]]
    assert loader.skips.counts() == {"corrupt": 1}
    assert "not_utf8" not in loader.state_dict()["skips"]
    # The seed's order puts b.png in 3 of the 12 slots (the same with workers); e.png's crème never counts.
    assert ids.count("b.png") == 3
    assert loader.state_dict()["not_utf8"] == {"count": 3, "example": str(root / "b.txt")}


def _shard(path: Path) -> Path:
    with tarfile.open(path, "w") as tar:
        for i, (key, caption) in enumerate([("k0", b"plain"), ("k1", b"caf\xe9"), ("k2", b"cr\xc3\xa8me")]):
            for name, data in ((f"{key}.png", _encode(_noise(32, 32, i), "PNG")), (f"{key}.txt", caption)):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


@pytest.mark.parametrize("workers", [0, 2])
def test_a_stream_counts_its_batches_captions_and_resumes_the_count(tmp_path, workers):
    shard = _shard(tmp_path / "s.tar")
    cfg = DataConfig(source="webdataset", shards=[str(shard)], image_size=16, num_workers=workers)
    whole = step_loader(cfg, 0, 3, 0, 4)
    batches = list(whole)
    # Three samples, a batch of 3: every batch holds k1 (its caption "caf\ufffd") once.
    assert all(batch["caption"].count("caf\ufffd") == 1 for batch in batches)
    expected = {"count": 4, "example": f"{shard}/k1.txt"}
    assert whole.state_dict()["not_utf8"] == expected
    first = step_loader(cfg, 0, 3, 0, 2)
    list(first)
    resumed = step_loader(cfg, 0, 3, 2, 4, state=first.state_dict())
    list(resumed)
    assert first.state_dict()["not_utf8"]["count"] == 2 and resumed.state_dict()["not_utf8"] == expected


def test_several_processes_counts_are_summed_in_one_line_and_carried_by_a_resplit():
    from fusedit.data.skips import NotUTF8Count  # imported here: the tests above run on code without it

    shares = [
        {"count": 0, "example": ""},
        {"count": 2, "example": "x/1.txt"},
        {"count": 1, "example": "y.txt"},
    ]
    total = NotUTF8Count.of(shares)
    assert total.report(3) == (
        "data: 3 captions read into batches over the 3 processes were not UTF-8 (counted each time read; "
        "e.g. x/1.txt): " + TAIL
    )
    assert NotUTF8Count(1, "a.txt").report() == (
        "data: 1 caption read into batches was not UTF-8 (counted each time read; e.g. a.txt): " + TAIL
    )
    assert NotUTF8Count().report() is None
    # A state saved before the count was kept adds nothing; a resplit sums the old ranks' counts.
    old = [{"kind": "index", "step": 2, "not_utf8": share} for share in shares[1:]] + [
        {"kind": "index", "step": 2}
    ]
    assert resplit_state(old, 8)["not_utf8"] == {"count": 3, "example": "x/1.txt"}
