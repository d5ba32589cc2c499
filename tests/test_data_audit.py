"""Data-pipeline corner cases: brace patterns as bash and webdataset expand them, caption members with a
byte-order mark or an upper-case name, compressed shards whatever their name, mixing weights, index files
that are not clean UTF-8 or not clean CSV, and image decoding in threads. Every test builds its own tiny
data in a temporary folder."""

from __future__ import annotations

import gzip
import io
import json
import logging
import math
import tarfile
import threading
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fusedit.config import ConfigError, DataConfig
from fusedit.data.loader import step_loader
from fusedit.data.transforms import SkipSample, decode_rgb, open_image
from fusedit.data.webdataset_source import TarShard, expand_braces, shard_lists

BOM = b"\xef\xbb\xbf"


def _png(width: int = 32, height: int = 32, seed: int = 0) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG")
    return buf.getvalue()


def _tar_bytes(samples: dict[str, dict[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for key, members in samples.items():
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _cfg(**kw) -> DataConfig:
    return DataConfig(**{"image_size": 16, "min_image_size": 16, **kw})


def _captions(cfg: DataConfig, steps: int = 2, batch_size: int = 2) -> tuple[dict, dict]:
    """{sample id: caption} over ``steps`` batches, and the loader's skip counts."""
    loader = step_loader(cfg, 0, batch_size, 0, steps)
    batches = list(loader)
    return {i: c for b in batches for i, c in zip(b["id"], b["caption"])}, loader.skips.counts()


# --------------------------------------------------------------------------------------------------
# WebDataset


def test_a_brace_range_from_0_is_not_zero_padded_as_in_bash(tmp_path):
    # bash and braceexpand pad only for an endpoint written with a leading zero: "0" itself is not one.
    assert expand_braces("x-{0..10}.tar") == [f"x-{i}.tar" for i in range(11)]
    assert expand_braces("{10..0}") == [str(i) for i in range(10, -1, -1)]
    assert expand_braces("{-2..0}") == ["-2", "-1", "0"]
    assert expand_braces("{00..10}") == [f"{i:02d}" for i in range(11)]
    assert expand_braces("{0..010}") == [f"{i:03d}" for i in range(11)]
    assert expand_braces("{-05..3}") == ["-05", "-04", "-03", "-02", "-01", "000", "001", "002", "003"]
    shards = tmp_path / "shards"
    shards.mkdir()
    for i in range(11):  # the names img2dataset-like tools write without a fixed width
        (shards / f"x-{i}.tar").write_bytes(b"")
    datasets, _ = shard_lists([str(shards / "x-{0..10}.tar")], [])
    assert datasets == [[str(shards / f"x-{i}.tar") for i in range(11)]]


def test_brace_steps_and_single_items_follow_bash():
    """bash (and the braceexpand package webdataset uses): a range's third number is its step, whose sign
    the endpoints override; a brace without a range or a comma is no expansion and stays as written."""
    assert expand_braces("x-{0..10..5}.tar") == ["x-0.tar", "x-5.tar", "x-10.tar"]
    assert expand_braces("{1..10..3}") == ["1", "4", "7", "10"]
    assert expand_braces("{10..1..-3}") == ["10", "7", "4", "1"]
    assert expand_braces("{000..010..4}") == ["000", "004", "008"]
    assert expand_braces("{1..3..0}") == ["1", "2", "3"]
    assert expand_braces("a{x}b") == ["a{x}b"]
    assert expand_braces("{{a,b}}-{}") == ["{a}-{}", "{b}-{}"]


def test_a_txt_member_with_a_byte_order_mark_is_read_without_it(tmp_path):
    shard = tmp_path / "a.tar"
    shard.write_bytes(
        _tar_bytes(
            {
                "s0": {"png": _png(seed=0), "txt": BOM + b"a red circle"},
                "s1": {"png": _png(seed=1), "txt": "a blue square é".encode()},
            }
        )
    )
    captions, skips = _captions(_cfg(source="webdataset", shards=[str(shard)]), steps=1)
    assert captions == {f"{shard}/s0": "a red circle", f"{shard}/s1": "a blue square é"}
    assert skips == {}


def test_an_upper_case_image_field_finds_its_member(tmp_path):
    # Windows tools write "s0.PNG"; member extensions are lower-cased when a shard is indexed.
    shard = tmp_path / "a.tar"
    samples = {f"s{i}": {"PNG": _png(seed=i), "txt": f"sample {i}".encode()} for i in range(2)}
    shard.write_bytes(_tar_bytes(samples))
    cfg = _cfg(source="webdataset", shards=[str(shard)], image_field="PNG")
    captions, skips = _captions(cfg, steps=1)
    assert sorted(captions.values()) == ["sample 0", "sample 1"] and skips == {}


def test_upper_case_caption_fields_find_their_members_as_image_field_does(tmp_path):
    # Member extensions are lower-cased when a shard is indexed, so the member part of a caption field is
    # too (TXT, JSON.Caption); the keys inside a JSON member keep their case, as index columns do.
    shard = tmp_path / "a.tar"
    sidecar = {"Caption": "from json", "caption": "another key"}
    samples = {
        "s0": {"png": _png(seed=0), "TXT": b"from txt"},
        "s1": {"png": _png(seed=1), "json": json.dumps(sidecar).encode()},
    }
    shard.write_bytes(_tar_bytes(samples))
    cfg = _cfg(source="webdataset", shards=[str(shard)], caption_fields=["TXT", "JSON.Caption"])
    captions, skips = _captions(cfg, steps=1)
    assert captions == {f"{shard}/s0": "from txt", f"{shard}/s1": "from json"} and skips == {}
    index = _index_folder(tmp_path / "data") / "index.jsonl"
    index.write_text("".join(json.dumps({"file": f, "caption": "x"}) + "\n" for f in ("a.png", "b.png")))
    with pytest.raises(ConfigError, match="no usable sample"):  # an index column is named exactly
        list(
            step_loader(_cfg(source="folder", index_file=str(index), caption_fields=["CAPTION"]), 0, 2, 0, 1)
        )


def test_caption_fields_given_as_a_tuple_from_code_read_as_the_list(tmp_path):
    shard = tmp_path / "a.tar"
    samples = {f"s{i}": {"png": _png(seed=i), "caption": f"sample {i}".encode()} for i in range(2)}
    shard.write_bytes(_tar_bytes(samples))
    as_list, as_tuple = (
        _captions(_cfg(source="webdataset", shards=[str(shard)], caption_fields=fields), steps=1)
        for fields in (["txt", "caption"], ("txt", "caption"))
    )
    assert as_tuple == as_list and sorted(as_list[0].values()) == ["sample 0", "sample 1"]
    with pytest.raises(ConfigError, match="data.caption_fields='caption' must be a non-empty list"):
        _captions(_cfg(source="webdataset", shards=[str(shard)], caption_fields="caption"), steps=1)


def test_hidden_files_in_a_shard_are_not_samples(tmp_path):
    # A macOS tar adds "._<name>" resource forks and .DS_Store; their stem is empty, so they grouped into
    # one image-less sample per folder, counted as a "missing" skip every epoch.
    shard = tmp_path / "a.tar"
    samples = {
        "d/s0": {"png": _png(), "txt": b"a caption"},
        "d/._s0": {"png": b"\0" * 8},
        "d/": {"DS_Store": b"x"},
    }
    shard.write_bytes(_tar_bytes(samples))
    opened = TarShard(str(shard))
    try:
        assert [key for key, _ in opened.samples] == ["d/s0"]
    finally:
        opened.close()
    captions, skips = _captions(_cfg(source="webdataset", shards=[str(shard)]), steps=1, batch_size=1)
    assert captions == {f"{shard}/d/s0": "a caption"} and skips == {}


def test_a_gzipped_shard_named_tar_is_read_whole_and_not_reported_truncated(tmp_path):
    samples = {f"s{i}": {"png": _png(seed=i), "txt": f"sample {i}".encode()} for i in range(4)}
    shard = tmp_path / "a.tar"  # tarfile recognises gzip by its content, whatever the name
    shard.write_bytes(gzip.compress(_tar_bytes(samples)))
    opened = TarShard(str(shard))
    try:
        assert opened.error is None and len(opened) == 4
    finally:
        opened.close()
    captions, skips = _captions(_cfg(source="webdataset", shards=[str(shard)]), steps=2)
    assert sorted(captions.values()) == [f"sample {i}" for i in range(4)]
    assert skips == {}


def test_an_infinite_mixing_weight_is_a_config_error_naming_it(tmp_path):
    # YAML's .inf was accepted, normalised to NaN, and failed at the first draw with numpy's "Probabilities
    # contain NaN", naming no setting.
    a, b = tmp_path / "a.tar", tmp_path / "b.tar"
    for path in (a, b):
        path.write_bytes(_tar_bytes({"s0": {"png": _png(), "txt": b"x"}}))
    cfg = _cfg(source="webdataset", shards=[str(a), str(b)], weights=[math.inf, 1])
    with pytest.raises(ConfigError) as error:
        list(step_loader(cfg, 0, 2, 0, 1))
    assert str(error.value) == (
        "data.weights=[inf, 1] must list one finite non-negative number per data.shards entry (2), "
        "not all zero"
    )


# --------------------------------------------------------------------------------------------------
# Folder index files


def _index_folder(root: Path) -> Path:
    root.mkdir(parents=True)
    for i, name in enumerate(("a.png", "b.png", "c.png")):
        (root / name).write_bytes(_png(seed=i))
    return root


@pytest.mark.parametrize("suffix", [".jsonl", ".csv"])
def test_an_index_with_bytes_that_are_not_utf8_loads_every_row(tmp_path, suffix):
    # A crawler's index with lines in Latin-1: the rows load (U+FFFD for the bad byte, as in caption
    # sidecars); a path spoilt so is a "missing" skip that names it, not an error that stops the run.
    root = _index_folder(tmp_path / "data")
    rows = [("a.png", "a plain caption"), ("b.png", "caf\xe9 au lait"), ("c\xe9.png", "a spoilt path")]
    if suffix == ".jsonl":
        lines = [json.dumps({"file": f, "caption": c}, ensure_ascii=False) for f, c in rows]
        text = "\n".join(lines) + "\n"
    else:
        text = "file,caption\n" + "".join(f"{f},{c}\n" for f, c in rows)
    index = root / f"index{suffix}"
    index.write_bytes(text.encode("latin-1"))  # the first line is ASCII, the same in UTF-8
    loader = step_loader(_cfg(source="folder", index_file=str(index)), 0, 2, 0, 3)
    captions = {i: c for b in loader for i, c in zip(b["id"], b["caption"])}
    assert captions == {"a.png": "a plain caption", "b.png": "caf\ufffd au lait"}
    assert loader.skips.counts() == {"missing": 1}
    spoilt = root / "c\ufffd.png"
    assert f"{spoilt} does not exist" in loader.skipped_report()


def test_a_csv_index_with_a_quote_left_open_is_a_one_line_error_naming_where(tmp_path):
    root = _index_folder(tmp_path / "data")
    index = root / "index.csv"
    # The open quote takes in every line after it, until the csv module's field size limit (128 KiB).
    index.write_text('file,caption\na.png,fine\nb.png,"never closed\n' + ("c.png,x" * 200 + "\n") * 200)
    with pytest.raises(ConfigError) as error:
        step_loader(_cfg(source="folder", index_file=str(index)), 0, 2, 0, 1)
    assert str(error.value) == (
        f"data.index_file={str(index)!r} cannot be read after line 2: field larger than field limit "
        "(131072) (a quote left open after it?)"
    )


def test_an_index_file_that_is_a_folder_is_named_as_one_with_what_is_allowed(tmp_path):
    root = _index_folder(tmp_path / "data")
    with pytest.raises(ConfigError) as error:
        step_loader(_cfg(source="folder", index_file=str(root)), 0, 2, 0, 1)
    assert str(error.value) == (
        f"data.index_file={str(root)!r} is a folder (allowed: an index file, .jsonl, .json, .ndjson with one "
        "JSON object per line, or .csv, .tsv with a header row; for a folder of images use data.root)"
    )


@pytest.mark.parametrize(
    ("extra", "first", "head"),
    [
        (
            {},
            "4 rows in {index!r}, 2 of them unusable",
            "2 of the 2 rows tried so far cannot be used (bad-row 2): about 50%",
        ),
        # bucket planning reads every image: the missing one is known before the first batch too
        (
            {"buckets": [[16, 16], [16, 24]]},
            "1 usable sample of the 4 rows in {index!r} (1 bucket)",
            "3 of the 4 rows tried so far cannot be used (bad-row 2, missing 1): about 75%",
        ),
    ],
    ids=["plain", "buckets"],
)
def test_an_index_files_summary_and_skip_warning_count_the_same_rows(tmp_path, caplog, extra, first, head):
    # The rows json cannot read are refused before any batch: the opening line counted only the others
    # ("2 samples"), the warning all four ("2 of the 2 samples tried ... of the 4 in the data").
    root = _index_folder(tmp_path / "data")
    index = root / "index.jsonl"
    rows = ['{"file": "a.png", "caption": "a"}', "not json", '{"file": "gone.png", "caption": "b"}', "{}"]
    index.write_text("\n".join(rows) + "\n")
    # The summary is fusedit.data.loader's, the warning fusedit.data.skips'.
    with caplog.at_level(logging.INFO, logger="fusedit.data"):
        next(iter(step_loader(_cfg(source="folder", index_file=str(index), **extra), 0, 1, 0, 1)))
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("data: ")]
    assert said[0] == "data: " + first.format(index=str(index))
    assert said[1].startswith(f"data: {head} of the 4 in the data (warned above 20%)")


def test_decoding_in_a_thread_leaves_the_process_warnings_filters_alone():
    # catch_warnings() around the decode swapped the process-wide filter list while a worker decoded, so
    # another thread saw it changed, and threads entering and leaving it out of step leaked or dropped
    # filters (before Python 3.14). Here the main thread looks at the filters while a worker is mid-decode.
    image = Image.open(io.BytesIO(_png()))
    inside, looked = threading.Event(), threading.Event()
    load = image.load

    def paused_load():
        inside.set()
        looked.wait(5)
        return load()

    image.load = paused_load
    before, decoded = list(warnings.filters), []
    worker = threading.Thread(target=lambda: decoded.append(decode_rgb(image)))
    worker.start()
    assert inside.wait(5)
    during = list(warnings.filters)
    looked.set()
    worker.join(5)
    assert during == before and list(warnings.filters) == before
    assert decoded[0].size == (32, 32)


def test_pils_pixel_limit_warns_through_the_callers_filters_and_twice_it_skips(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 700)
    with pytest.warns(Image.DecompressionBombWarning):  # 32x32 is over the limit but under twice it: used
        assert decode_rgb(open_image(_png(32, 32))).size == (32, 32)
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)  # the caller's choice is respected
        with pytest.raises(SkipSample, match="corrupt: Image size \\(1024 pixels\\) exceeds limit of 700"):
            open_image(_png(32, 32))
    with pytest.raises(SkipSample, match="corrupt: Image size \\(1600 pixels\\) exceeds limit of 1400"):
        open_image(_png(40, 40))


# --------------------------------------------------------------------------------------------------
# Resumes on another split of the batch


def _ids(loader) -> list[str]:
    return [i for batch in loader for i in batch["id"]]


def _states(cfg: DataConfig, batch_size: int, world_size: int, steps: int) -> list[dict]:
    """Each rank's loader state after ``steps`` steps, as the checkpoint's data_state files hold them."""
    states = []
    for rank in range(world_size):
        loader = step_loader(cfg, 0, batch_size, 0, steps, rank=rank, world_size=world_size)
        list(loader)
        states.append(json.loads(json.dumps(loader.state_dict())))
    return states


def test_a_resume_at_another_global_batch_goes_on_after_the_samples_read(tmp_path):
    """Step s read positions [s x G, (s + 1) x G) at the new global batch G: resumed at half the batch the
    run read the epoch's last samples again, at twice it jumped past samples never read."""
    from fusedit.data.loader import resplit_state
    from test_skipped import _cfg as folder_cfg
    from test_skipped import _folder

    # Without skips: a skipped sample's replacement depends on the global batch (StepPlan.candidates).
    cfg = folder_cfg(_folder(tmp_path / "data", good=10, corrupt=0))
    one_by_2 = _ids(step_loader(cfg, 0, 2, 0, 15))  # 30 draws of an endless order of epochs
    # 3 steps of 4 (12 samples), then 1 process x 2: positions 12.. (the old step x new batch: 6..)
    halved = step_loader(cfg, 0, 2, 3, 9, state=resplit_state(_states(cfg, 4, 1, 3), 4))
    assert _ids(step_loader(cfg, 0, 4, 0, 3)) + _ids(halved) == one_by_2[:24]
    assert halved.state_dict()["position"] == 24
    # 3 steps of 2 (6 samples), then 2 processes x 4: positions 6.. (not 24..), each rank its rows
    doubled = [
        step_loader(cfg, 0, 4, 3, 6, rank=r, world_size=2, state=resplit_state(_states(cfg, 2, 1, 3), 2))
        for r in (0, 1)
    ]
    rows = [[b["id"] for b in loader] for loader in doubled]
    assert [i for step in zip(*rows) for row in step for i in row] == one_by_2[6:30]
    assert [loader.state_dict()["position"] for loader in doubled] == [30, 30]
    # Where a state predates the position, the step at the old global batch gives it.
    old = [{k: v for k, v in state.items() if k != "position"} for state in _states(cfg, 4, 1, 3)]
    assert resplit_state(old, 4)["position"] == 12


def test_with_buckets_a_resume_at_another_global_batch_says_what_the_epoch_loses(tmp_path, caplog):
    import logging

    from fusedit.data.loader import resplit_state
    from test_skipped import _cfg as folder_cfg
    from test_skipped import _folder

    cfg = folder_cfg(_folder(tmp_path / "data", good=12, corrupt=0), buckets=[[16, 16], [16, 24]])
    assert "position" not in _states(cfg, 4, 1, 3)[0]  # an epoch is cut into batches of the global batch
    with caplog.at_level(logging.INFO, logger="fusedit.data.loader"):
        step_loader(cfg, 0, 2, 3, 4, state=resplit_state(_states(cfg, 4, 1, 3), 4))
        step_loader(cfg, 0, 8, 3, 4, state=resplit_state(_states(cfg, 4, 1, 3), 4))
        step_loader(cfg, 0, 4, 3, 4, state=resplit_state(_states(cfg, 2, 2, 3), 4))  # the same global batch
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith(("data: with", "data: res"))]
    assert said == [
        "data: with aspect-ratio buckets a resume at another global batch (2, not 4) goes on from the step: 12 "
        "samples were read before it, step 3 stands for 6 at the new batch, so the current epoch may read some "
        "samples again",
        "data: with aspect-ratio buckets a resume at another global batch (8, not 4) goes on from the step: 12 "
        "samples were read before it, step 3 stands for 24 at the new batch, so the current epoch may leave "
        "some samples unread",
        "data: resumed on another split of the batch; reading goes on after the 12 samples read before",
    ]


def test_a_resume_on_another_split_warns_when_the_sample_count_changed(tmp_path, caplog):
    import logging

    from fusedit.data.loader import resplit_state
    from test_skipped import _cfg as folder_cfg
    from test_skipped import _folder

    root = _folder(tmp_path / "data", good=6, corrupt=0)
    cfg = folder_cfg(root)
    states = _states(cfg, 2, 2, 2)
    (root / "good05.png").unlink()
    (root / "good05.txt").unlink()  # the sample removed whole (a caption left alone is warned about)
    with caplog.at_level(logging.WARNING, logger="fusedit.data.loader"):
        step_loader(cfg, 0, 4, 2, 3, state=resplit_state(states, 4))
    assert [r.getMessage() for r in caplog.records] == [
        "data: the dataset has 5 samples, not the 6 it had when the data position was saved; the run goes on "
        "at the same step in a new order of the 5, so the current epoch may repeat or miss samples read "
        "before the resume"
    ]


def test_a_stream_resumed_on_another_split_carries_the_old_ranks_skips_not_the_read_through(tmp_path):
    """Rank 0 takes every old rank's skips on; the samples read again to reach the step (the new ranks'
    shares of the stream, not the old ones') add none: the old ranks' are what the run skipped."""
    from fusedit.data.loader import resplit_state
    from fusedit.data.skips import merged_skips
    from test_data_sources import _write_shards

    shards = _write_shards(tmp_path / "wds", "a", shards=2, per_shard=8, corrupt={(0, 1), (1, 2), (1, 5)})
    cfg = _cfg(source="webdataset", shards=[shards])
    states = _states(cfg, 2, 2, 3)
    assert all(state["skips"]["ids"] for state in states)  # both old ranks skipped some
    resumed = [
        step_loader(cfg, 0, 4, 3, 3, state=resplit_state(states, 4)),
        step_loader(cfg, 0, 2, 3, 3, rank=1, world_size=2, state=resplit_state(states[:1], 4)),
    ]
    for loader in resumed:
        list(loader)  # reads the stream through to step 3, nothing more
    expected = merged_skips([state["skips"] for state in states])
    assert resumed[0].skips.state_dict() == expected.state_dict() and expected.total() == 3
    assert resumed[1].skips.total() == 0
    # A caller without a state still counts what the steps before its first met (they are its run's).
    plain = step_loader(cfg, 0, 4, 3, 3)
    list(plain)
    assert plain.skips.total() > 0


def test_merged_skips_count_the_planned_ones_once():
    from fusedit.data.skips import SkipCounter, merged_skips

    ranks = [
        SkipCounter.of([("bad-row", "i:3", "x"), ("corrupt", "a", "d"), ("corrupt", "b", "d")]),
        SkipCounter.of([("bad-row", "i:3", "x"), ("corrupt", "b", "d"), ("corrupt", "c", "d")]),
    ]
    merged = merged_skips([r.state_dict() for r in ranks], planned=[("bad-row", "i:3", "x")])
    assert {r: list(ids) for r, ids in merged.ids.items()} == {"bad-row": ["i:3"], "corrupt": ["a", "b", "c"]}
    assert merged.times == {"bad-row": 1, "corrupt": 4}


def test_training_resumed_at_another_batch_reads_on_from_the_samples_read(tmp_path, monkeypatch):
    from conftest import tiny_config
    from fusedit.train import loop

    read: list[str] = []
    make = loop.step_loader

    class Recording:
        """The training loop's loader, noting the ids of the samples it yields."""

        def __init__(self, *args, **kwargs):
            self.loader = make(*args, **kwargs)

        def __iter__(self):
            for batch in self.loader:
                read.extend(batch["id"])
                yield batch

        def __getattr__(self, name):
            return getattr(self.loader, name)

    monkeypatch.setattr(loop, "step_loader", Recording)
    cfg = {"steps": 4, "checkpoint_every": 2}
    loop.train(tiny_config(train={**cfg, "batch_size": 4}), tmp_path / "run", stop_at=2, progress=False)
    assert read == [str(i) for i in range(8)]  # the shapes world in order
    read.clear()
    loop.train(tiny_config(train={**cfg, "batch_size": 2}), tmp_path / "run", resume=True, progress=False)
    assert read == ["8", "9", "10", "11"]  # not 4..7, read at steps 2 and 3 of batch 2
    position = json.loads(
        (tmp_path / "run" / "checkpoints" / "step_00000004" / "data_state.json").read_text()
    )
    assert position["position"] == 12


# --------------------------------------------------------------------------------------------------
# data.shards globs, and bars over the long silent reads


def test_a_glob_in_data_shards_is_expanded_sorted_and_an_empty_one_refused(tmp_path):
    """It failed with "1 of 1 shards do not exist (first: '.../*.tar')" while the files existed."""
    for name in ("b-0001.tar", "b-0000.tar", "a-0000.tar"):
        (tmp_path / name).write_bytes(_tar_bytes({"s0": {"png": _png(), "txt": b"x"}}))
    datasets, _ = shard_lists([str(tmp_path / "b-*.tar"), [str(tmp_path / "a-000?.tar")]], None)
    assert datasets == [
        [str(tmp_path / "b-0000.tar"), str(tmp_path / "b-0001.tar")],
        [str(tmp_path / "a-0000.tar")],
    ]
    pattern = str(tmp_path / "c-*.tar")
    with pytest.raises(ConfigError) as error:
        shard_lists([pattern], None)
    assert str(error.value) == f"data.shards entry {pattern!r}: the glob {pattern!r} matches no file"


def _bars(monkeypatch, module) -> list[dict]:
    """The tqdm bars ``module`` opens (their settings), shown nowhere."""
    from tqdm.auto import tqdm

    opened: list[dict] = []

    def recording(*args, **kwargs):
        sized = args and hasattr(args[0], "__len__")
        opened.append({"total": len(args[0]) if sized else None, **kwargs})
        return tqdm(*args, **{**kwargs, "disable": True})

    monkeypatch.setattr(module, "tqdm", recording)
    return opened


def test_reading_shard_headers_and_reading_a_stream_through_show_bars(tmp_path, monkeypatch):
    import fusedit.data.loader as loader_module
    import fusedit.data.webdataset_source as wds
    from fusedit.data.loader import build_catalog
    from test_data_sources import _write_shards

    cfg = _cfg(source="webdataset", shards=[_write_shards(tmp_path / "wds", "a", shards=3, per_shard=4)])
    headers = _bars(monkeypatch, wds)
    build_catalog(cfg, progress=True)
    build_catalog(cfg)
    assert [(b["desc"], b["total"], b["disable"]) for b in headers] == [
        ("read shard headers", 3, False),
        ("read shard headers", 3, True),
    ]
    through = _bars(monkeypatch, loader_module)
    list(step_loader(cfg, 0, 2, 3, 4, progress=True))  # no state: steps 0..2 are read through
    list(step_loader(cfg, 0, 2, 3, 4, rank=1, world_size=2, progress=True))  # rank 0's bars only
    assert [(b["desc"], b["total"], b["disable"]) for b in through] == [
        ("read stream to step", 3, False),
        ("read stream to step", 3, True),
    ]


def test_a_resume_that_splits_the_same_global_batch_another_way_is_not_warned_as_a_change(tmp_path, caplog):
    """multi-node.md recommends keeping the global batch when the number of processes changes; doing so
    was warned as "1 changed setting(s): train.batch_size: 2 -> 4"."""
    import logging

    from conftest import tiny_config
    from fusedit.train.loop import train

    cfg = {"steps": 3, "checkpoint_every": 1}
    train(tiny_config(train={**cfg, "batch_size": 4}), tmp_path / "run", stop_at=1, progress=False)
    # The INFO line comes from fusedit.train.data_state (resplit_keys).
    with caplog.at_level(logging.INFO, logger="fusedit.train.data_state"):
        split = tiny_config(train={**cfg, "batch_size": 2, "grad_accum": 2})
        train(split, tmp_path / "run", resume=True, stop_at=2, progress=False)
        train(tiny_config(train={**cfg, "batch_size": 2}), tmp_path / "run", resume=True, progress=False)
    said = [(r.levelname, r.getMessage()) for r in caplog.records if r.getMessage().startswith("resuming")]
    assert said == [
        (
            "INFO",
            "resuming on another split of the same global batch of 4: 1 process(es) x batch_size 2 x "
            "grad_accum 2 (the checkpoint's: 1 x 4 x 1)",
        ),
        ("WARNING", "resuming step_00000002 with 1 changed setting(s): train.grad_accum: 2 -> 1"),
        (
            "WARNING",
            "resuming at a global batch of 2 (1 process(es) x batch_size 2 x grad_accum 1), not the 4 the "
            "checkpoint trained at (1 x 4 samples): the rest of the run trains at another batch (to keep 4: "
            "train.batch_size=4)",
        ),
    ]


def test_skip_reports_say_one_sample_and_one_time_in_the_singular():
    """h-journeyG R5: "skipped 1 samples (1 times)"."""
    from fusedit.data.skips import SkipCounter, merged_skip_report

    one = SkipCounter.of([("corrupt", "a.png", "cannot identify image file")])
    assert one.report() == "skipped 1 sample (1 time): corrupt 1 (e.g. a.png: cannot identify image file)"
    one.add("corrupt", "a.png", "cannot identify image file")  # met again the next epoch
    assert one.report().startswith("skipped 1 sample (2 times): ")
    assert merged_skip_report([SkipCounter.of([("tiny", "b.png", "")]).tally(), SkipCounter().tally()]) == (
        "skipped 1 sample (1 time) over the 2 processes (1 met while reading, counted in each process that "
        "met them): tiny 1 (e.g. b.png)"
    )


def test_the_early_skip_warning_says_when_the_list_it_names_is_written(tmp_path, caplog):
    """h-journeyG M2: warned at the first steps, "every skipped id is listed in RUN/skipped.jsonl" sent the
    reader to a file that is written only at the first checkpoint (and never, after a Ctrl+C before it)."""
    from conftest import tiny_config
    from fusedit.train.loop import train

    root = tmp_path / "data"
    root.mkdir()
    for i in range(2):
        (root / f"good{i}.png").write_bytes(_png(seed=i))
        (root / f"good{i}.txt").write_text("a photo")
    for i in range(8):
        (root / f"bad{i}.png").write_bytes(b"not a png")
        (root / f"bad{i}.txt").write_text("a photo")
    cfg = tiny_config(data={"source": "folder", "root": str(root)}, train={"steps": 4, "checkpoint_every": 4})
    with caplog.at_level(logging.WARNING, logger="fusedit.data"):
        train(cfg, tmp_path / "run", progress=False)
    (warning,) = [m for m in caplog.messages if "cannot be used" in m]
    listed = tmp_path / "run" / "skipped.jsonl"
    assert warning.endswith(
        f"; every skipped id is listed in {listed}, written at each checkpoint and at the end of training"
    )
    assert listed.is_file()
