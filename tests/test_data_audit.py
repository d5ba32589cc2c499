"""Data-pipeline corner cases: brace patterns as bash and webdataset expand them, caption members with a
byte-order mark, compressed shards whatever their name, mixing weights, index files that are not clean
UTF-8 or not clean CSV. Every test builds its own tiny data in a temporary folder."""

from __future__ import annotations

import gzip
import io
import json
import math
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fusedit.config import ConfigError, DataConfig
from fusedit.data.loader import step_loader
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
