"""Skipped samples: the early warning when much of the data cannot be used, the run folder's list of every
skipped sample, and known-bad samples not opened again (without changing any batch)."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import numpy as np
import pytest
import torch

import fusedit.data.transforms as transforms
from conftest import tiny_config
from fusedit.checkpoints import find_checkpoint
from fusedit.config import DataConfig
from fusedit.data.loader import resplit_state, step_loader
from fusedit.data.skips import SkipCounter, merged_skip_report, merged_skips, skipped_jsonl
from fusedit.data.transforms import make_rng
from fusedit.train.loop import train
from test_data_sources import _noise, _write_shards


def _folder(root: Path, good: int, corrupt: int, tiny: int = 0, uncaptioned: int = 0) -> Path:
    """``good`` 32x32 captioned images, then the unusable kinds (random bytes, 6x6, no caption)."""
    root.mkdir(parents=True)
    for i in range(good):
        _noise(32, 32, i).save(root / f"good{i:02d}.png")
        (root / f"good{i:02d}.txt").write_text(f"a red {'circle' if i % 2 else 'square'}")
    for i in range(corrupt):
        (root / f"bad{i:02d}.png").write_bytes(np.random.default_rng(i).bytes(200))
        (root / f"bad{i:02d}.txt").write_text("never shown")
    for i in range(tiny):
        _noise(6, 6, 50 + i).save(root / f"tiny{i:02d}.png")
        (root / f"tiny{i:02d}.txt").write_text("too small")
    for i in range(uncaptioned):
        _noise(32, 32, 80 + i).save(root / f"nocap{i:02d}.png")
    return root


def _cfg(root: Path, **kw) -> DataConfig:
    return DataConfig(**{"source": "folder", "root": str(root), "image_size": 16, "min_image_size": 16, **kw})


def _skip_warnings(caplog) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.levelno == logging.WARNING and "cannot be used" in r.getMessage()
    ]


@pytest.mark.parametrize(
    "extra, head",
    [
        # met batch by batch: as if all 16 had been met, so once more than 3 are known skipped
        ({}, "12 of the 13 samples tried so far cannot be used (corrupt 11, tiny 1): about 92%"),
        # bucket planning checks every sample before the first batch
        (
            {"buckets": [[16, 16], [16, 24]]},
            "15 of the 16 samples tried so far cannot be used (corrupt 12, no-caption 1, tiny 2): about 94%",
        ),
    ],
    ids=["plain", "buckets"],
)
def test_mostly_unusable_folder_warns_once_early_naming_share_reasons_and_list(tmp_path, caplog, extra, head):
    root = _folder(tmp_path / "data", good=1, corrupt=12, tiny=2, uncaptioned=1)
    with caplog.at_level(logging.WARNING, logger="fusedit"):
        loader = step_loader(_cfg(root, **extra), 0, 4, 0, 8, skip_list="run/skipped.jsonl")
        batches = iter(loader)
        next(batches)
        assert len(_skip_warnings(caplog)) == 1  # at the first step, not at the end of training
        list(batches)
    assert _skip_warnings(caplog) == [
        f"data: {head} of the 16 in the data (warned above 20%); training goes on with the rest, repeating it "
        "more often; every skipped id is listed in run/skipped.jsonl, written at each checkpoint and at the end "
        "of training"
    ]
    # Rank 0 warns for all ranks: they read shares of the same data.
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="fusedit"):
        list(step_loader(_cfg(root, **extra), 0, 2, 0, 8, rank=1, world_size=2))
    assert _skip_warnings(caplog) == []


def _seed_trying_first(n: int, position: int) -> int:
    """A seed whose first epoch tries sample ``position`` (in path order) among its first three."""
    return next(s for s in range(1000) if position in make_rng(s, 0, 0).permutation(n)[:3])


def test_one_bad_file_among_many_does_not_warn_even_when_met_first(tmp_path, caplog):
    root = _folder(tmp_path / "data", good=30, corrupt=1)  # bad00.png sorts first: position 0
    seed = _seed_trying_first(31, 0)
    with caplog.at_level(logging.WARNING, logger="fusedit"):
        loader = step_loader(_cfg(root), seed, 3, 0, 25)  # 75 draws: more than two epochs
        batches = iter(loader)
        next(batches)
        assert loader.skips.counts() == {"corrupt": 1}  # met at the first step: one of three tried
        list(batches)
    assert _skip_warnings(caplog) == []
    # nor a few refused rows of an index file (3 of 33): they are weighed against all the rows
    index = root / "index.jsonl"
    rows = [{"file": f"good{i:02d}.png", "caption": "x"} for i in range(30)] + [{"caption": "no file"}] * 3
    index.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with caplog.at_level(logging.WARNING, logger="fusedit"):
        cfg = DataConfig(source="folder", index_file=str(index), image_size=16, min_image_size=16)
        loader = step_loader(cfg, 0, 4, 0, 10)
        list(loader)
    assert loader.skips.counts() == {"bad-row": 3} and _skip_warnings(caplog) == []


def test_a_mostly_unusable_stream_warns(tmp_path, caplog):
    corrupt = {(0, i) for i in range(10)} | {(1, i) for i in range(5)}  # half of the 30
    shards = _write_shards(tmp_path / "wds", "a", shards=3, per_shard=10, corrupt=corrupt)
    cfg = DataConfig(source="webdataset", shards=[shards], image_size=16, min_image_size=16)
    with caplog.at_level(logging.WARNING, logger="fusedit"):
        list(step_loader(cfg, 0, 2, 0, 12))
    warnings = _skip_warnings(caplog)
    assert len(warnings) == 1 and re.match(
        r"data: \d+ of the \d+ samples read so far cannot be used \(corrupt", warnings[0]
    )
    # 2 bad in 20 of the other shards, 10%: no warning for data that is only partly unusable
    caplog.clear()
    fine = _write_shards(tmp_path / "wds2", "b", shards=2, per_shard=10, corrupt={(0, 3), (1, 5)})
    with caplog.at_level(logging.WARNING, logger="fusedit"):
        list(step_loader(DataConfig(**{**cfg.__dict__, "shards": [fine]}), 0, 2, 0, 12))
    assert _skip_warnings(caplog) == []


def test_skip_state_keeps_every_detail_and_reads_older_states():
    counter = SkipCounter.of(
        [("corrupt", f"b{i}", f"broken {i}") for i in range(5)]
        + [("tiny", "t", "6x6"), ("corrupt", "b0", "")]
    )
    state = json.loads(json.dumps(counter.state_dict()))
    assert state["details"] == {"corrupt": [f"broken {i}" for i in range(5)], "tiny": ["6x6"]}
    restored = SkipCounter()
    restored.load_state_dict(state)
    assert restored.ids == counter.ids and restored.report() == counter.report()
    assert [json.loads(line) for line in skipped_jsonl(state).splitlines()] == [
        *({"id": f"b{i}", "reason": "corrupt", "detail": f"broken {i}"} for i in range(5)),
        {"id": "t", "reason": "tiny", "detail": "6x6"},
    ]
    # A state saved before the details were kept has those of the first three ids (its examples) only.
    old = {"ids": state["ids"], "times": state["times"], "examples": {"corrupt": [["b0", "broken 0"]]}}
    restored.load_state_dict(old)
    assert restored.ids["corrupt"] == {"b0": "broken 0", "b1": "", "b2": "", "b3": "", "b4": ""}
    assert json.loads(skipped_jsonl(restored.state_dict()).splitlines()[1]) == {
        "id": "b1",
        "reason": "corrupt",
    }
    assert skipped_jsonl(SkipCounter().state_dict()) == ""


def _listed(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_training_lists_the_skipped_samples_in_the_run_folder_exactly_across_a_resume(tmp_path, caplog):
    root = _folder(tmp_path / "data", good=2, corrupt=6, tiny=1)
    cfg = tiny_config(data={"source": "folder", "root": str(root)}, train={"steps": 4, "checkpoint_every": 2})
    with caplog.at_level(logging.INFO, logger="fusedit"):
        train(cfg, tmp_path / "a", progress=False)
    listed = _listed(tmp_path / "a" / "skipped.jsonl")
    assert sorted((r["id"], r["reason"]) for r in listed) == [
        *((f"bad{i:02d}.png", "corrupt") for i in range(6)),
        ("tiny00.png", "tiny"),
    ]
    assert all(r["detail"] for r in listed) and {r["detail"] for r in listed if r["reason"] == "tiny"} == {
        "6x6 < min_image_size 8"
    }
    (warning,) = _skip_warnings(caplog)
    assert f"every skipped id is listed in {tmp_path / 'a' / 'skipped.jsonl'}" in warning
    assert "samples tried so far cannot be used (corrupt " in warning
    report = [r.getMessage() for r in caplog.records if r.getMessage().startswith("data: skipped 7 samples")]
    assert len(report) == 1 and report[0].endswith(
        f"; every skipped id is listed in {tmp_path / 'a' / 'skipped.jsonl'}"
    )

    # Interrupted at the first checkpoint: the list matches that checkpoint's data state, and after the
    # resume the uninterrupted run's, byte for byte.
    train(cfg, tmp_path / "b", stop_at=2, progress=False)
    position = json.loads((find_checkpoint(tmp_path / "b") / "data_state.json").read_text())
    assert (tmp_path / "b" / "skipped.jsonl").read_text() == skipped_jsonl(position["skips"])
    train(cfg, tmp_path / "b", resume=True, progress=False)
    assert (tmp_path / "b" / "skipped.jsonl").read_bytes() == (tmp_path / "a" / "skipped.jsonl").read_bytes()

    # A fresh run without skips in the same folder leaves no earlier run's list behind.
    train(
        tiny_config(train={"steps": 2, "checkpoint_every": 2}), tmp_path / "a", overwrite=True, progress=False
    )
    assert not (tmp_path / "a" / "skipped.jsonl").exists()


def test_a_mostly_unusable_folder_trains_past_many_epochs(tmp_path):
    # 1 usable sample of 16: a slot whose candidates run into the next epoch must reach it there, wherever
    # it lies in the two epochs' orders (only 16 tries once ended before it: "no usable sample left").
    root = _folder(tmp_path / "data", good=1, corrupt=15)
    loader = step_loader(_cfg(root), 0, 4, 0, 30)
    assert {i for batch in loader for i in batch["id"]} == {"good00.png"}
    assert loader.skips.counts() == {"corrupt": 15}


class _Forgetful(dict):
    """A known-bad table that never learns: every candidate is opened, as without the shortcut."""

    def __setitem__(self, key, value) -> None:
        pass


@pytest.mark.parametrize("extra", [{}, {"buckets": [[16, 16], [16, 24]]}], ids=["plain", "buckets"])
def test_known_bad_samples_are_opened_once_and_the_batches_do_not_change(tmp_path, monkeypatch, extra):
    root = _folder(tmp_path / "data", good=5, corrupt=6)
    if extra:  # truncated: its header passes bucket planning, its pixels fail in the batches
        data = (root / "good00.png").read_bytes()
        (root / "good00.png").write_bytes(data[: len(data) // 2])
    # Met in the batches: the corrupt files, or (planning having left those out) the truncated one.
    bad = ["good00.png"] if extra else [f"bad{i:02d}.png" for i in range(6)]
    opened: list[str] = []
    open_image = transforms.open_image

    def counting(value):
        opened.append(Path(value).name)
        return open_image(value)

    monkeypatch.setattr(transforms, "open_image", counting)
    cfg = _cfg(root, **extra)
    loader = step_loader(cfg, 0, 4, 0, 12)  # 48 draws of 11 samples: four epochs and more
    opened.clear()  # bucket planning reads every header once
    with_shortcut = list(loader)
    assert {n: opened.count(n) for n in bad} == dict.fromkeys(bad, 1)
    assert sum(loader.skips.times.values()) > 2 * len(bad)  # met again and again, opened once

    loader = step_loader(cfg, 0, 4, 0, 12)
    loader.dataset._bad = _Forgetful()
    opened.clear()
    without = list(loader)
    assert all(opened.count(n) > 1 for n in bad)
    threaded = list(step_loader(DataConfig(**{**cfg.__dict__, "num_workers": 2}), 0, 4, 0, 12))
    resumed = with_shortcut[:5] + list(step_loader(cfg, 0, 4, 5, 12))  # a fresh table at step 5
    for got in (without, threaded, resumed):
        assert [b["id"] for b in got] == [b["id"] for b in with_shortcut]
        assert [b["caption"] for b in got] == [b["caption"] for b in with_shortcut]
        assert all(torch.equal(x["image"], y["image"]) for x, y in zip(got, with_shortcut))


@pytest.mark.skipif(
    not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
    reason="this torch build has no torch.distributed/gloo",
)
def test_each_rank_lists_the_samples_it_skipped(tmp_path):
    from fusedit.config import save_config
    from fusedit.train.data_state import skipped_list_name
    from test_distributed import torchrun

    root = _folder(tmp_path / "data", good=2, corrupt=9)
    cfg = tiny_config(data={"source": "folder", "root": str(root)}, train={"device": "cpu", "steps": 2})
    save_config(cfg, tmp_path / "run.yaml")
    run = torchrun(2, tmp_path / "run.yaml", tmp_path / "run")
    ckpt = find_checkpoint(run)
    for rank, state_file in enumerate(["data_state.json", "data_state.rank1.json"]):
        # Ranks read different rows of each batch: each lists what it met, as its data state holds it.
        position = json.loads((ckpt / state_file).read_text())
        listed = (run / skipped_list_name(rank)).read_text()
        assert listed and listed == skipped_jsonl(position["skips"])
    assert (
        skipped_list_name(1) == "skipped.rank1.jsonl"
        and skipped_list_name(0, stage=2) == "skipped.stage2.jsonl"
    )


def _indexed_folder(root: Path, good: int, corrupt: int) -> Path:
    """A folder of ``good`` and ``corrupt`` images (``_folder``) read through an index file whose last row
    names no file: a skip found while planning the data (the catalog refuses the row), on every rank alike."""
    _folder(root, good=good, corrupt=corrupt)
    rows = [{"file": p.name, "caption": "a red square"} for p in sorted(root.glob("*.png"))]
    index = root / "index.jsonl"
    index.write_text("".join(json.dumps(r) + "\n" for r in [*rows, {"caption": "no file"}]))
    return index


def _unreadable(root: Path, name: str) -> str:
    return f"{name}: cannot identify image file {str(root / name)!r}"


def test_the_ranks_skips_merge_counting_the_planned_ones_once(tmp_path):
    """The summary over the processes: the row every rank refuses while planning counts once (rank 0 alone
    holds it: every rank's state held a copy), each rank's reads add up (a sample two ranks met counts for
    each, as the line says), and a rank resumed from its data state tells its planned skips from its reads
    as the uninterrupted one does."""
    index = _indexed_folder(tmp_path / "data", good=8, corrupt=4)
    cfg = DataConfig(source="folder", index_file=str(index), image_size=16)
    loaders = [step_loader(cfg, 0, 4, 0, 2, rank=rank, world_size=2) for rank in (0, 1)]
    for loader in loaders:
        list(loader)
    # Each rank meets all four corrupt images: 8 counted of the 4 distinct ones.
    assert [list(loader.skips.ids["corrupt"]) for loader in loaders] == [
        ["bad02.png", "bad01.png", "bad00.png", "bad03.png"],
        ["bad00.png", "bad03.png", "bad01.png", "bad02.png"],
    ]
    assert [loader.skips.times for loader in loaders] == [
        {"bad-row": 1, "corrupt": 5},
        {"corrupt": 4},
    ]
    tallies = [loader.skipped_tally() for loader in loaders]
    root = tmp_path / "data"
    assert merged_skip_report(tallies) == (
        "skipped 9 samples (10 times) over the 2 processes (1 found while planning the data, counted once; "
        "8 met while reading, counted in each process that met them): bad-row 1 (e.g. index.jsonl:13: no "
        f"'file' path), corrupt 8 (e.g. {_unreadable(root, 'bad02.png')}; {_unreadable(root, 'bad01.png')}; "
        f"{_unreadable(root, 'bad00.png')})"
    )
    for rank in (0, 1):
        first = step_loader(cfg, 0, 4, 0, 1, rank=rank, world_size=2)
        list(first)
        resumed = step_loader(
            cfg, 0, 4, 1, 2, rank=rank, world_size=2, state=json.loads(json.dumps(first.state_dict()))
        )
        list(resumed)
        assert resumed.skipped_tally() == tallies[rank]
    assert merged_skip_report([SkipCounter().tally()] * 2) == "skipped samples: none over the 2 processes"


def _saved_before_rank_0_alone(state: dict, planned: SkipCounter) -> dict:
    """``state`` as the code saved it before rank 0 alone held the planning skips: every rank's skips began
    with them (the planning skips, then the rank's own reads)."""
    old = merged_skips([planned.state_dict(), state["skips"]])
    return {**state, "skips": old.state_dict()}


def test_states_saved_with_the_planning_skips_on_every_rank_resume_to_the_same_counts(tmp_path):
    """A checkpoint made before rank 0 alone held the planning skips: resumed on the same split, on one
    process and on four, its ranks' states give the counts and the line the states saved now give."""
    index = _indexed_folder(tmp_path / "data", good=8, corrupt=4)
    cfg = DataConfig(source="folder", index_file=str(index), image_size=16)
    first = [step_loader(cfg, 0, 4, 0, 1, rank=rank, world_size=2) for rank in (0, 1)]
    for loader in first:
        list(loader)
    new = [json.loads(json.dumps(loader.state_dict())) for loader in first]
    old = [new[0], _saved_before_rank_0_alone(new[1], first[0].planned)]
    assert old[1]["skips"]["times"] == {"bad-row": 1, **new[1]["skips"]["times"]}

    def resumed(states: list, world: int) -> tuple[list, str]:
        """Each of ``world`` ranks' skip counts and the merged line after step 1 (a global batch of 8)."""
        if world != 2:
            states = [resplit_state(states, 8)] * world
        loaders = [
            step_loader(
                cfg, 0, 8 // world, 1, 2, rank=rank, world_size=world, state=json.loads(json.dumps(state))
            )
            for rank, state in enumerate(states)
        ]
        for each in loaders:
            list(each)
        return [each.skips.times for each in loaders], merged_skip_report(
            [each.skipped_tally() for each in loaders]
        )

    # The same split: rank 1 keeps its copy (counted once in the line); a resplit: rank 0 takes on one.
    (old_times, old_line), (new_times, new_line) = resumed(old, 2), resumed(new, 2)
    assert old_times == [new_times[0], {"bad-row": 1, **new_times[1]}] and old_line == new_line
    assert old_line.startswith(
        "skipped 9 samples (10 times) over the 2 processes (1 found while planning the data, counted once; "
    )
    assert resumed(old, 1) == resumed(new, 1) and resumed(old, 1)[0] == [{"bad-row": 1, "corrupt": 9}]
    assert resumed(old, 4) == resumed(new, 4)


@pytest.mark.skipif(
    not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
    reason="this torch build has no torch.distributed/gloo",
)
def test_the_skipped_summary_under_torchrun_covers_every_rank(tmp_path):
    """It was rank 0's share: the corrupt images rank 1 met were left out of the count."""
    from fusedit.config import save_config
    from test_distributed import train_log

    index = _indexed_folder(tmp_path / "data", good=6, corrupt=4)
    cfg = tiny_config(
        data={"source": "folder", "index_file": str(index)},
        train={"device": "cpu", "steps": 2, "checkpoint_every": 2},
    )
    save_config(cfg, tmp_path / "run.yaml")
    printed = train_log(2, tmp_path / "run.yaml", tmp_path / "run")
    # Each rank lists the corrupt images it met (bad03.png only rank 1 did), rank 0 the row the index refuses.
    listed = [_listed(tmp_path / "run" / name) for name in ("skipped.jsonl", "skipped.rank1.jsonl")]
    assert [[r["id"] for r in rank if r["reason"] == "corrupt"] for rank in listed] == [
        ["bad02.png", "bad01.png", "bad00.png"],
        ["bad03.png", "bad00.png", "bad01.png", "bad02.png"],
    ]
    assert [[r["id"] for r in rank if r["reason"] == "bad-row"] for rank in listed] == [
        ["index.jsonl:11"],
        [],
    ]
    ckpt = find_checkpoint(tmp_path / "run")
    states = [json.loads((ckpt / name).read_text()) for name in ("data_state.json", "data_state.rank1.json")]
    assert [state["skips"]["times"] for state in states] == [
        {"bad-row": 1, "corrupt": 4},
        {"corrupt": 6},
    ]  # 1 + 4 + 6 times
    (line,) = [line for line in printed.splitlines() if "fusedit.train.loop: data: " in line]
    root = tmp_path / "data"
    assert line == (
        "INFO fusedit.train.loop: data: skipped 8 samples (11 times) over the 2 processes (1 found while "
        "planning the data, counted once; 7 met while reading, counted in each process that met them): bad-row "
        f"1 (e.g. index.jsonl:11: no 'file' path), corrupt 7 (e.g. {_unreadable(root, 'bad02.png')}; "
        f"{_unreadable(root, 'bad01.png')}; {_unreadable(root, 'bad00.png')}); every skipped id is listed in "
        f"{tmp_path / 'run' / 'skipped.jsonl'} (rank 1's in skipped.rank1.jsonl)"
    )


def test_the_skip_line_names_the_lists_the_ranks_wrote():
    """It sent readers to "rank 1's in skipped.rank1.jsonl, ..." where rank 1 had skipped nothing and so
    written no list."""
    from fusedit.train.data_state import where_listed

    run = Path("run")
    assert where_listed([0], run, None) == f"every skipped id is listed in {run / 'skipped.jsonl'}"
    assert where_listed([1, 3], run, None) == (
        f"every skipped id is listed in {run / 'skipped.rank1.jsonl'} (rank 3's in skipped.rank3.jsonl)"
    )
    assert where_listed([0, 2, 5, 6, 7], run, 1) == (
        f"every skipped id is listed in {run / 'skipped.stage1.jsonl'} (ranks 2, 5, 6 and 1 more in "
        "skipped.stage1.rank<r>.jsonl)"
    )


def test_a_malformed_json_caption_sidecar_is_named_in_its_skip(tmp_path):
    root = _folder(tmp_path / "data", good=4, corrupt=0)
    _noise(32, 32, 18).save(root / "0018.png")
    (root / "0018.json").write_text('{"caption": ')
    # Beside a .txt caption the broken sidecar costs nothing: the caption comes from the .txt.
    _noise(32, 32, 19).save(root / "0019.png")
    (root / "0019.json").write_text('{"caption": ')
    (root / "0019.txt").write_text("a txt caption")
    for extra in ({}, {"buckets": [[16, 16], [16, 24]]}):
        loader = step_loader(_cfg(root, caption_fields=["txt", "json.caption"], **extra), 0, 4, 0, 3)
        captions = {c for batch in loader for c in batch["caption"]}
        assert "a txt caption" in captions
        assert loader.skips.ids == {
            "no-caption": {
                "0018.png": "0018.json is not valid JSON (Expecting value: line 1 column 13 (char 12))"
            }
        }
    # A run that does not read .json sidecars says what it does read.
    loader = step_loader(_cfg(root, caption_fields=["txt"]), 0, 4, 0, 3)
    list(loader)
    assert loader.skips.ids == {"no-caption": {"0018.png": "none of the fields ['txt'] holds text"}}


def _skip_line(caplog) -> str:
    (line,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("data: skipped")]
    return line


@pytest.mark.skipif(
    not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
    reason="this torch build has no torch.distributed/gloo",
)
def test_a_resume_on_another_number_of_processes_keeps_every_skip(tmp_path, caplog):
    """Resumed on one process, a two-process run's skips were dropped: the end line said "none" (or counted
    the resumed steps alone), skipped.jsonl went and the old rank 1's list stayed. Now the old ranks' skips
    carry on in rank 0's: the line and the list are the uninterrupted one-process run's (the row the index
    refuses counted once), and the ranks the run no longer has leave no list."""
    from fusedit.config import save_config
    from test_distributed import logged_losses, torchrun, train_log

    index = _indexed_folder(tmp_path / "data", good=6, corrupt=4)
    data = {"source": "folder", "index_file": str(index)}
    train_cfg = {"device": "cpu", "steps": 4, "checkpoint_every": 2}
    one = tiny_config(data=data, train={**train_cfg, "batch_size": 4})
    with caplog.at_level(logging.INFO, logger="fusedit"):
        train(one, tmp_path / "ref", progress=False)
    ref_line = _skip_line(caplog)
    save_config(tiny_config(data=data, train={**train_cfg, "batch_size": 2}), tmp_path / "two.yaml")
    run = torchrun(2, tmp_path / "two.yaml", tmp_path / "run", "--stop-at", "2")
    assert [
        r["id"] for r in _listed(run / "skipped.rank1.jsonl") if r["reason"] == "corrupt"
    ]  # rank 1 met some
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="fusedit"):
        train(one, run, resume=True, progress=False)
    assert logged_losses(run) == pytest.approx(logged_losses(tmp_path / "ref"), rel=1e-5, abs=1e-6)
    assert sorted(map(str, _listed(run / "skipped.jsonl"))) == sorted(
        map(str, _listed(tmp_path / "ref" / "skipped.jsonl"))
    )
    assert not (run / "skipped.rank1.jsonl").exists()
    # The same counts and examples; a reason's examples in the old ranks' order, not the order met.
    line, examples = _skip_line(caplog).replace(str(run), "RUN"), re.compile(r"\(e\.g\. ([^)]*)\)")
    ref_line = ref_line.replace(str(tmp_path / "ref"), "RUN")
    assert (
        examples.sub("", line)
        == examples.sub("", ref_line)
        == (
            "data: skipped 5 samples (10 times): bad-row 1 , corrupt 4 ; every skipped id is listed in "
            "RUN/skipped.jsonl"
        )
    )
    assert [sorted(e.split("; ")) for e in examples.findall(line)] == [
        sorted(e.split("; ")) for e in examples.findall(ref_line)
    ]

    # And from one process to two: rank 0 carries the first steps' skips on, rank 1 lists its own.
    train(one, tmp_path / "up", stop_at=2, progress=False)
    printed = train_log(2, tmp_path / "two.yaml", tmp_path / "up", "--resume")
    listed = _listed(tmp_path / "up" / "skipped.jsonl") + _listed(tmp_path / "up" / "skipped.rank1.jsonl")
    assert {(r["id"], r["reason"]) for r in listed} == {
        (r["id"], r["reason"]) for r in _listed(tmp_path / "ref" / "skipped.jsonl")
    }
    # Counted as a two-process run counts (an image both ranks met, once for each): the same 10 times.
    assert (
        "data: skipped 6 samples (10 times) over the 2 processes (1 found while planning the data, counted "
        "once; 5 met while reading, counted in each process that met them)"
    ) in printed


def test_an_empty_caption_file_is_named_in_its_skip(tmp_path):
    """It read "none of the fields ['txt', 'json.caption'] holds text", which points at the setting while the
    caption file is there, empty."""
    root = _folder(tmp_path / "data", good=4, corrupt=0)
    _noise(32, 32, 18).save(root / "0018.png")
    (root / "0018.txt").write_text(" \n")
    _noise(32, 32, 19).save(root / "0019.png")  # an empty .txt beside a .json caption costs nothing
    (root / "0019.txt").write_text("")
    (root / "0019.json").write_text('{"caption": "a json caption"}')
    loader = step_loader(_cfg(root, caption_fields=["txt", "json.caption"]), 0, 4, 0, 3)
    assert "a json caption" in {c for batch in loader for c in batch["caption"]}
    assert loader.skips.ids == {"no-caption": {"0018.png": "0018.txt is empty"}}
    # Where the .txt sidecars are not read, the fields read are named as before.
    loader = step_loader(_cfg(root, caption_fields=["json.caption"]), 0, 4, 0, 3)
    list(loader)
    assert loader.skips.ids["no-caption"]["0018.png"] == "none of the fields ['json.caption'] holds text"


def test_an_empty_caption_member_of_a_shard_is_named_in_its_skip(tmp_path):
    """A shard's empty .txt member read "none of the fields ['txt'] holds text", as if the setting were wrong."""
    shards = _write_shards(tmp_path / "wds", "a", shards=1, per_shard=6, blank={(0, 2)})
    cfg = DataConfig(
        source="webdataset", shards=[shards], image_size=16, min_image_size=16, caption_fields=["txt"]
    )
    loader = step_loader(cfg, 0, 2, 0, 3)
    list(loader)
    assert loader.skips.ids == {"no-caption": {f"{shards[0]}/00000/000000002": "its txt field is empty"}}
    # A caption in another field read takes its place.
    loader = step_loader(
        DataConfig(**{**cfg.__dict__, "caption_fields": ["txt", "json.caption"]}), 0, 2, 0, 3
    )
    list(loader)
    assert loader.skips.ids == {}


@pytest.mark.parametrize("extra", [{}, {"buckets": [[16, 16], [16, 24]]}], ids=["plain", "buckets"])
def test_a_skipped_images_replacement_is_no_other_image_of_its_batch(tmp_path, extra):
    """The next image of the order took a skipped one's place, and that image was the next slot's: one image
    twice in the batch, at every skip. Replacements now come from the next epoch's order, the same however
    the batch is split over ranks."""
    root = _folder(tmp_path / "data", good=60, corrupt=4)
    if extra:  # truncated: their headers pass bucket planning, their pixels fail in the batches
        for name in ("good03.png", "good17.png", "good40.png"):
            data = (root / name).read_bytes()
            (root / name).write_bytes(data[: len(data) // 2])
    cfg = _cfg(root, **extra)
    one = step_loader(cfg, 0, 4, 0, 30)
    batches = [batch["id"] for batch in one]
    assert sum(one.skips.times.values()) >= 8  # replacements were drawn
    assert all(len(set(ids)) == len(ids) for ids in batches)
    ranks = [[batch["id"] for batch in step_loader(cfg, 0, 2, 0, 30, rank=r, world_size=2)] for r in (0, 1)]
    assert [a + b for a, b in zip(*ranks)] == batches
