"""Captions that are not UTF-8: each sample carries the names of those its reading met (in whichever worker
process or thread read it), the loader sums its batches' into its state, and training reports the run's
total at the end of each stage, a resume included."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from types import SimpleNamespace

import pytest

from conftest import tiny_config
from fusedit.checkpoints import find_checkpoint
from fusedit.config import DataConfig
from fusedit.data.loader import resplit_state, step_loader
from fusedit.train import distributed, loop
from fusedit.train.loop import train
from test_data_edges import _tar
from test_data_sources import _encode, _noise

MID = "not UTF-8 (counted each time read, with a sample's caption files and fields that were not picked; e.g."
TAIL = "read with their bad bytes as U+FFFD; save captions as UTF-8 to keep every character"


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
        f"data: 3 caption texts read for batches were {MID} {root / 'b.txt'}): " + TAIL
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
        f"data: 4 caption texts read for batches were {MID} {root / 'b.txt'}): " + TAIL
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
    captions = [("k0", b"plain"), ("k1", b"caf\xe9"), ("k2", b"cr\xc3\xa8me")]
    members = [
        member
        for i, (key, caption) in enumerate(captions)
        for member in ((f"{key}.png", _encode(_noise(32, 32, i), "PNG")), (f"{key}.txt", caption))
    ]
    return _tar(path, members)


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
        f"data: 3 caption texts read for batches over the 3 processes were {MID} x/1.txt): " + TAIL
    )
    assert NotUTF8Count(1, "a.txt").report() == (
        f"data: 1 caption text read for batches was {MID} a.txt): " + TAIL
    )
    assert NotUTF8Count().report() is None
    # A state saved before the count was kept adds nothing; a resplit sums the old ranks' counts.
    old = [{"kind": "index", "step": 2, "not_utf8": share} for share in shares[1:]] + [
        {"kind": "index", "step": 2}
    ]
    assert resplit_state(old, 8)["not_utf8"] == {"count": 3, "example": "x/1.txt"}


def _old_ranks(kind: str) -> list[dict]:
    """Two old ranks' states at step 2 whose counts sum to 7 (the example: rank 0's)."""
    counts = [{"count": 5, "example": "x.txt"}, {"count": 2, "example": "y.txt"}]
    return [{"kind": kind, "step": 2, "samples": 4, "skips": {}, "not_utf8": c} for c in counts]


def test_a_resplit_gives_the_old_ranks_count_to_rank_0_alone_and_a_stream_counts_no_replayed_step(tmp_path):
    # Every new rank reads old rank 0's state (train/data_state.py): were the count not rank 0's alone, the
    # summed stage-end line would count the old ranks' captions once per new rank.
    root = _folder(tmp_path / "data")
    cfg = DataConfig(source="folder", root=str(root), image_size=16)
    state = resplit_state(_old_ranks("index"), 4)
    b = str(root / "b.txt")
    counts = []
    for rank in range(3):
        loader = step_loader(cfg, 0, 1, 2, 5, rank=rank, world_size=3, state=state)
        ids = [i for batch in loader for i in batch["id"]]
        counts.append((ids.count("b.png"), loader.state_dict()["not_utf8"]))
    # Rank 0: 7 + its own b.png (1); rank 1 never reads b; rank 2 once.
    assert counts == [
        (1, {"count": 8, "example": "x.txt"}),
        (0, {"count": 0, "example": ""}),
        (1, {"count": 1, "example": b}),
    ]
    # A stream is read through from its start to step 2 on every rank: those steps are the old ranks' (in
    # the 7), so only the batches yielded add. Rank 1 met k1 in its steps read through, too.
    shard = _shard(tmp_path / "s.tar")
    scfg = DataConfig(source="webdataset", shards=[str(shard)], image_size=16)
    state = resplit_state(_old_ranks("stream"), 4)
    counts = []
    for rank in range(2):
        loader = step_loader(scfg, 0, 1, 2, 4, rank=rank, world_size=2, state=state)
        captions = [c for batch in loader for c in batch["caption"]]
        counts.append((captions.count("caf\ufffd"), loader.state_dict()["not_utf8"]))
    assert counts == [(0, {"count": 7, "example": "x.txt"}), (1, {"count": 1, "example": f"{shard}/k1.txt"})]


@pytest.mark.parametrize("workers", [0, 2])
def test_a_sample_the_catalog_skips_after_reading_its_bad_caption_files_counts_nothing(tmp_path, workers):
    # c's caption file is a broken JSON in Latin-1 (next to a Latin-1 .txt): both are decoded, then the
    # catalog itself skips c ("no-caption") before the decoder ever sees it.
    root = tmp_path / "data"
    root.mkdir()
    for i, name in enumerate("abc"):
        _noise(32, 32, i).save(root / f"{name}.png")
        (root / f"{name}.json").write_text(json.dumps({"caption": f"a red {name}"}))
    (root / "c.json").write_bytes('{"caption": "caf\xe9'.encode("latin-1"))
    (root / "c.txt").write_bytes("caf\xe9".encode("latin-1"))
    cfg = DataConfig(
        source="folder", root=str(root), image_size=16, caption_fields=["json.caption"], num_workers=workers
    )
    loader = step_loader(cfg, 0, 2, 0, 3)
    ids = [i for batch in loader for i in batch["id"]]
    assert loader.skips.counts() == {"no-caption": 1} and "c.png" not in ids and len(ids) == 6
    assert loader.state_dict()["not_utf8"] == {"count": 0, "example": ""}


def test_the_stage_end_line_sums_every_rank_s_count(tmp_path, monkeypatch, caplog):
    from fusedit.data.skips import NotUTF8Count  # imported here: the tests above run on code without it

    root = _folder(tmp_path / "data")
    loader = step_loader(DataConfig(source="folder", root=str(root), image_size=16), 0, 2, 0, 2)
    ids = [i for batch in loader for i in batch["id"]]
    own = loader.state_dict()["not_utf8"]
    assert own == {"count": ids.count("b.png"), "example": str(root / "b.txt")} and own["count"] == 1
    gathered = []

    def gather(obj, env):  # ranks 1 and 2 of a 3-process run, this process being rank 0
        gathered.append(obj)
        return [
            obj,
            (obj[0], False, {"count": 2, "example": "r1.txt"}),
            (obj[0], False, {"count": 0, "example": ""}),
        ]

    monkeypatch.setattr(distributed, "gather_object", gather)
    run = SimpleNamespace(env=SimpleNamespace(world_size=3, rank=0), cfg=SimpleNamespace(stages=None))
    with caplog.at_level(logging.INFO, logger="fusedit"):
        loop._Run._report_skipped(run, SimpleNamespace(index=0), loader, False, tmp_path / "skipped.jsonl")
    # One collective carries this rank's count with its skip tally.
    assert [share[2] for share in gathered] == [own]
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warned == [NotUTF8Count(3, str(root / "b.txt")).report(3)]


@pytest.mark.parametrize(
    "fields, kinds, caption",
    [
        (["txt"], ["txt"], "a caf\ufffd au lait"),
        (["json.caption"], ["json"], "cr\ufffdme"),
        (["txt", "json.caption"], ["txt", "json"], "a caf\ufffd au lait"),  # both read, the first picked
    ],
)
def test_a_folder_reads_only_the_caption_sidecars_its_caption_fields_name(
    tmp_path, monkeypatch, fields, kinds, caption
):
    # Both sidecars were read whatever data.caption_fields said: a Latin-1 .json beside the .txt trained on
    # counted in the total (and cost a file read per sample).
    root = _folder(tmp_path / "data")
    for name in "abcd":
        (root / f"{name}.json").write_text(json.dumps({"caption": f"a blue {name}"}))
    (root / "b.json").write_bytes('{"caption": "cr\xe8me"}'.encode("latin-1"))
    opened = []
    real = Path.read_bytes
    monkeypatch.setattr(Path, "read_bytes", lambda path: opened.append(path.name) or real(path))
    cfg = DataConfig(
        source="folder", root=str(root), image_size=16, caption_fields=fields, caption_pick="first"
    )
    loader = step_loader(cfg, 0, 4, 0, 1)
    (batch,) = list(loader)  # a batch of 4: every sample once
    assert sorted(set(opened)) == sorted(f"{name}.{kind}" for name in "abcd" for kind in kinds)
    assert caption in batch["caption"]
    assert loader.state_dict()["not_utf8"] == {"count": len(kinds), "example": str(root / f"b.{kinds[0]}")}
