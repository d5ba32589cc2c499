"""Data-pipeline corner cases: brace patterns as bash and webdataset expand them, caption members with a
byte-order mark or an upper-case name, compressed shards whatever their name, mixing weights, index files
that are not clean UTF-8 or not clean CSV, and image decoding in threads. Every test builds its own tiny
data in a temporary folder."""

from __future__ import annotations

import gzip
import io
import json
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


# --------------------------------------------------------------------------------------------------
# Image decoding


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
