"""The image-text data path at its edges (h-data audit): tar shards with odd names, a missing end, repeated
keys or images in another format; folders with other image extensions and lone captions; index rows that
name one file twice or hold Windows line breaks; colour-keyed transparency; a latent cache rerun over
samples it skipped. Every test builds its own tiny data."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import struct
import subprocess
import sys
import tarfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fusedit.config import ConfigError, DataConfig, VAEConfig
from fusedit.data.folder import FolderCatalog
from fusedit.data.latents import cache_latents
from fusedit.data.loader import step_loader
from fusedit.data.skips import skipped_jsonl
from fusedit.data.transforms import decode_rgb, image_extensions, open_image, stable_key
from fusedit.data.webdataset_source import TarShard, WebDatasetCatalog


def _png(width: int = 32, height: int = 32, seed: int = 0) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG")
    return buf.getvalue()


def _tar(path: Path, members: list[tuple[str, bytes]], **kw) -> Path:
    with tarfile.open(path, "w", **kw) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def _cfg(**kw) -> DataConfig:
    return DataConfig(**{"image_size": 16, "min_image_size": 16, **kw})


# --------------------------------------------------------------------------------------------------
# Tar shards


def test_stable_key_takes_a_surrogate_escaped_name_and_keeps_every_utf8_key():
    # Values from before the change: a UTF-8 key must not move (it seeds crops and caption picks).
    assert stable_key("shards/a.tar/000001") == 3157184065707677105
    assert stable_key("caf\u00e9/cr\u00e8me") == 634582818696591102
    # tarfile hands a Latin-1 member name back with its byte escaped; the key is that of the raw bytes.
    digest = hashlib.blake2b(b"caf\xe9", digest_size=8).digest()
    assert stable_key("caf\udce9") == int.from_bytes(digest, "big") >> 1


def test_a_shard_with_latin1_member_names_trains(tmp_path):
    # GNU tar on a Latin-1 file system writes the names' raw bytes; training crashed in stable_key.
    shard = tmp_path / "x.tar"
    members = [("caf\xe9.png", _png()), ("caf\xe9.txt", b"a cafe")]
    _tar(shard, members, format=tarfile.GNU_FORMAT, encoding="latin-1")
    loader = step_loader(_cfg(source="webdataset", shards=[str(shard)]), 0, 1, 0, 2)
    batches = list(loader)
    assert [b["caption"] for b in batches] == [["a cafe"], ["a cafe"]]
    assert batches[0]["id"] == [f"{shard}/caf\udce9"]
    assert loader.skips.counts() == {}


def test_a_skipped_sample_with_a_latin1_member_name_is_listed_and_reads_back(tmp_path):
    # Its id holds the name's byte surrogate-escaped: the checkpoint's list of skips crashed writing it.
    from fusedit.train.data_state import write_skipped

    shard = tmp_path / "x.tar"
    members = [("caf\xe9.png", b"not a png"), ("caf\xe9.txt", b"x"), ("ok.png", _png()), ("ok.txt", b"ok")]
    _tar(shard, members, format=tarfile.GNU_FORMAT, encoding="latin-1")
    loader = step_loader(_cfg(source="webdataset", shards=[str(shard)]), 0, 1, 0, 2)
    assert [b["caption"] for b in loader] == [["ok"], ["ok"]]
    listed = tmp_path / "skipped.jsonl"
    assert write_skipped(listed, loader.state_dict())
    rows = [json.loads(line) for line in listed.read_text(encoding="utf-8").splitlines()]
    assert [(r["id"], r["reason"]) for r in rows] == [(f"{shard}/caf\udce9", "corrupt")]
    # A name that is UTF-8 stays readable in the list.
    utf8 = {"ids": {"corrupt": [f"{shard}/caf\u00e9"]}}
    assert (
        skipped_jsonl(utf8)
        == json.dumps({"id": f"{shard}/caf\u00e9", "reason": "corrupt"}, ensure_ascii=False) + "\n"
    )


def test_a_shard_cut_at_a_member_boundary_is_reported_as_cut_short(tmp_path):
    # Six samples, the file cut right after the fifth's members: no end-of-archive blocks, no error from
    # tarfile, and the sixth sample was gone without a word.
    whole = _tar(
        tmp_path / "whole.tar",
        [(f"{i:03d}.{e}", d) for i in range(6) for e, d in (("png", _png(seed=i)), ("txt", b"x"))],
    )
    with tarfile.open(whole) as tar:
        last = tar.getmember("004.txt")
        end = last.offset_data + -(-last.size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
    cut = tmp_path / "cut.tar"
    cut.write_bytes(whole.read_bytes()[:end])
    shard = TarShard(str(cut))
    assert len(shard) == 5
    assert shard.error == "no end-of-archive marker: the shard may have been cut short after member 004.txt"
    catalog = WebDatasetCatalog([[str(cut)]])
    assert catalog.skipped == [("corrupt-shard", str(cut), shard.error)]
    assert TarShard(str(whole)).error is None
    loader = step_loader(_cfg(source="webdataset", shards=[str(cut)]), 0, 5, 0, 1)
    next(iter(loader))
    assert loader.skips.counts() == {"corrupt-shard": 1}


def test_a_repeated_key_in_a_shard_keeps_the_first_copy_and_counts_the_other(tmp_path):
    shard = _tar(
        tmp_path / "d.tar",
        [
            ("001.png", _png(seed=1)),
            ("001.txt", b"one"),
            ("002.png", _png(seed=2)),
            ("002.txt", b"first copy"),
            ("002.png", _png(seed=3)),
            ("002.txt", b"second copy"),
            ("003.png", _png(seed=4)),
            ("003.txt", b"three"),
        ],
    )
    expected = (
        "duplicate",
        f"{shard}/002@2",
        "duplicate member 002.png, 002.txt in the shard (key '002' again); the first copy is used",
    )
    opened = TarShard(str(shard))
    assert [key for key, _ in opened.samples] == ["001", "002", "003"]
    assert opened.dropped == [expected]
    catalog = WebDatasetCatalog([[str(shard)]])
    assert catalog.skipped == [expected]
    assert catalog.record(1)[0]["txt"] == b"first copy"
    # The stream counts it too: 3 samples read + 1 skipped = the 4 in the shard.
    loader = step_loader(_cfg(source="webdataset", shards=[str(shard)]), 0, 3, 0, 1)
    batch = next(iter(loader))
    assert sorted(batch["caption"]) == ["first copy", "one", "three"]
    assert loader.skips.counts() == {"duplicate": 1}
    # And a latent cache: cached 3 of 4.
    summary = cache_latents(
        _cfg(source="webdataset", shards=[str(shard)]), VAEConfig(), tmp_path / "cache", 2, 8, progress=False
    )
    assert (summary["samples"], summary["skipped"]) == (3, {"duplicate": 1})


def test_a_repeated_key_is_split_into_copies_by_occurrence_never_mixing_them(tmp_path):
    # A writer restarted mid-sample: the first copy's image was written, its caption not; then the whole
    # sample again. The sample read is the first copy whole (no caption: skipped as such), not image A with
    # caption B, and the copy counted as a duplicate is the one whose members the message names.
    shard = _tar(
        tmp_path / "d.tar",
        [("002.png", b"IMAGE-A"), ("002.png", b"IMAGE-B"), ("002.txt", b"caption of B"), ("003.txt", b"c")],
    )
    opened = TarShard(str(shard))
    assert [(key, sorted(group)) for key, group in opened.samples] == [("002", ["png"]), ("003", ["txt"])]
    assert opened.dropped == [
        (
            "duplicate",
            f"{shard}/002@2",
            "duplicate member 002.png, 002.txt in the shard (key '002' again); the first copy is used",
        )
    ]
    fields, image = WebDatasetCatalog([[str(shard)]]).record(0)[:2]
    assert (fields, image) == ({"__key__": "002", "__url__": str(shard)}, b"IMAGE-A")


def test_a_sample_without_an_image_member_names_its_members_and_the_extensions_read(tmp_path):
    # A gif member is read, as a folder reads .gif files (one list of image extensions: image_extensions).
    gif = io.BytesIO()
    Image.new("RGB", (32, 32), (9, 9, 9)).save(gif, "GIF")
    shard = _tar(
        tmp_path / "g.tar",
        [("a.png", _png()), ("a.txt", b"a"), ("b.gif", gif.getvalue()), ("b.txt", b"b"), ("c.txt", b"c")],
    )
    catalog = WebDatasetCatalog([[str(shard)]])
    loader = step_loader(_cfg(source="webdataset", shards=[str(shard)]), 0, 1, 0, 3)
    assert {c for batch in loader for c in batch["caption"]} == {"a", "b"}
    assert loader.skips.ids == {
        "missing": {
            f"{shard}/c": "no image member (its members: txt; image extensions read: "
            f"{', '.join(image_extensions())}, or the one data.image_field names)"
        }
    }
    with pytest.raises(Exception) as error:
        TarShard(str(shard), catalog.samples[0]).read(0, {"txt": "txt"}, "jpg")
    assert str(error.value) == "missing: no jpg member (data.image_field; its members: png, txt)"


# --------------------------------------------------------------------------------------------------
# Folders and index files


def test_a_folder_reads_other_jpeg_names_and_says_which_captions_have_no_image(tmp_path, caplog):
    root = tmp_path / "data"
    root.mkdir()
    jpeg = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 10, 10)).save(jpeg, "JPEG")
    names = ["a.jpg", "b.jfif", "c.jpe"] + (["d.avif"] if "avif" in image_extensions() else [])
    for name in names:
        (root / name).write_bytes(jpeg.getvalue())
        (root / name).with_suffix(".txt").write_text(f"caption of {name}")
    (root / "e.txt").write_text("a caption whose image is gone")
    (root / "f.xyz").write_bytes(b"")
    (root / "f.json").write_text('{"caption": "an image in a format not read"}')
    with caplog.at_level(logging.INFO, logger="fusedit.data.folder"):
        catalog = FolderCatalog(root=str(root))
    assert catalog.paths == names
    assert [r.getMessage() for r in caplog.records] == [
        f"data: 2 text or JSON files in {str(root)!r} have no image of their name beside them (e.g. e.txt; "
        f"image extensions read: {', '.join(image_extensions())})"
    ]
    assert image_extensions()[:10] == (
        "jpg",
        "jpeg",
        "jfif",
        "jpe",
        "png",
        "webp",
        "bmp",
        "gif",
        "tif",
        "tiff",
    )
    for name in names:
        assert decode_rgb(open_image(root / name)).getpixel((16, 16))[0] > 150


def test_the_image_extensions_are_listed_at_first_use_not_at_import():
    # Listing them imports every Pillow format plugin: no cost to a process that only imports fusedit's
    # data modules, and a HEIC opener registered after the import (pillow-heif) is still seen.
    code = (
        "import fusedit.data.folder, fusedit.data.loader, fusedit.data.webdataset_source, fusedit.eval.fid\n"
        "from PIL import Image\n"
        "print(Image._initialized)\n"
        "from fusedit.data.transforms import image_extensions\n"
        "print(Image._initialized, 'jpg' in image_extensions(), Image._initialized)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.split("\n")[:2] == ["0", "0 True 2"]


def test_index_rows_naming_one_file_are_counted_as_rows(tmp_path, caplog):
    # Two unusable rows for l.png (an empty caption, no caption) and two usable ones for a.png: 5 rows,
    # 3 usable, 2 skipped; they used to be counted as 1 skipped sample (keyed by the path).
    root = tmp_path / "data"
    root.mkdir()
    for name in ("a.png", "b.png", "l.png"):
        (root / name).write_bytes(_png())
    rows = [
        {"file": "a.png", "caption": "a"},
        {"file": "l.png", "caption": ""},
        {"file": "a.png", "caption": "a again"},
        {"file": "l.png"},
        {"file": "b.png", "caption": "b"},
    ]
    index = root / "index.jsonl"
    index.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = _cfg(source="folder", index_file=str(index))
    catalog = FolderCatalog(index_file=str(index))
    assert [catalog.sample_id(i) for i in range(5)] == ["a.png", "l.png", "a.png@2", "l.png@3", "b.png"]
    loader = step_loader(cfg, 0, 3, 0, 2)
    used = {i for b in loader for i in b["id"]}
    assert used == {"a.png", "a.png@2", "b.png"}
    assert sorted(loader.skips.ids["no-caption"]) == ["l.png", "l.png@3"]
    with caplog.at_level(logging.INFO, logger="fusedit.data.latents"):
        summary = cache_latents(cfg, VAEConfig(), tmp_path / "cache", 2, 8, progress=False)
    assert (summary["samples"], summary["skipped"]) == (3, {"no-caption": 2})
    assert caplog.messages[-1].startswith("cached 3 of 5 samples in 1 shard")
    index_json = json.loads((tmp_path / "cache" / "index.json").read_text())
    assert sorted(index_json["samples"]) == ["a.png", "a.png@2", "b.png"]
    # A cache made before recorded the repeated rows by their bare path: it still reruns as the same data,
    # its rows keyed by position as now, so the counts add up to the 5 rows.
    record = tmp_path / "cache" / "latents-000000.json"
    record.write_text(record.read_text().replace('"a.png@2"', '"a.png"').replace('"l.png@3"', '"l.png"'))
    with caplog.at_level(logging.INFO, logger="fusedit.data.latents"):
        again = cache_latents(cfg, VAEConfig(), tmp_path / "cache", 2, 8, progress=False)
    assert (again["samples"], again["skipped"]) == (3, {"no-caption": 2})
    assert caplog.messages[-1].startswith("cached 3 of 5 samples in 1 shard")
    assert again["report"] == summary["report"]


def test_an_index_caption_with_windows_line_breaks_reads_as_a_sidecars_does(tmp_path):
    root = tmp_path / "data"
    root.mkdir()
    (root / "a.png").write_bytes(_png())
    (root / "b.png").write_bytes(_png(seed=1))
    (root / "b.txt").write_bytes(b"line one\r\nline two")
    index = root / "index.csv"
    index.write_bytes(b'file,caption\r\na.png,"line one\r\nline two"\r\n')
    jsonl = root / "index.jsonl"
    jsonl.write_text(json.dumps({"file": "a.png", "caption": ["x\r\ny", "z\rw"]}) + "\n")
    assert (
        FolderCatalog(index_file=str(index), keep_fields=["caption"]).record(0)[0]["caption"]
        == "line one\nline two"
    )
    assert FolderCatalog(index_file=str(jsonl), keep_fields=["caption"]).record(0)[0]["caption"] == [
        "x\ny",
        "z\nw",
    ]
    sidecar = FolderCatalog(root=str(root))
    assert sidecar.record(sidecar.paths.index("b.png"))[0]["txt"] == "line one\nline two"
    # A JSON sidecar's line breaks are escapes, "\r\n" only once parsed: read as an index row's are.
    (root / "b.json").write_text(json.dumps({"caption": ["x\r\ny", "z\rw"], "meta": {"alt": "p\r\nq"}}))
    fields = sidecar.record(sidecar.paths.index("b.png"))[0]
    assert fields["json"] == {"caption": ["x\ny", "z\nw"], "meta": {"alt": "p\nq"}}


def test_index_lines_that_are_not_utf8_are_counted_and_warned_about_once(tmp_path, caplog):
    root = tmp_path / "data"
    root.mkdir()
    (root / "a.png").write_bytes(_png())
    lines = ['{"file": "a.png", "caption": "plain"}', '{"file": "a.png", "caption": "caf\xe9"}']
    lines += ['{"file": "a.png", "caption": "cr\xe8me"}']
    index = root / "index.jsonl"
    index.write_bytes("\n".join(lines).encode("latin-1") + b"\n")
    with caplog.at_level(logging.INFO, logger="fusedit.data.folder"):
        catalog = FolderCatalog(index_file=str(index), keep_fields=["caption"])
    assert [catalog.record(i)[0]["caption"] for i in range(3)] == ["plain", "caf\ufffd", "cr\ufffdme"]
    assert caplog.messages == [
        f"data: 2 lines of {str(index)!r} are not UTF-8: their bad bytes read as U+FFFD (e.g. line 2; save the "
        "index as UTF-8 to keep every character)"
    ]


def test_captions_that_are_not_utf8_are_warned_about_once_and_counted_by_the_cache(
    tmp_path, caplog, monkeypatch
):
    from fusedit.data.transforms import NOT_UTF8

    monkeypatch.setattr(NOT_UTF8, "count", 0)  # "once per process": as if none had been met yet
    root = tmp_path / "data"
    root.mkdir()
    for i in range(3):
        (root / f"{i}.png").write_bytes(_png(seed=i))
    (root / "0.txt").write_text("plain")
    (root / "1.txt").write_bytes("caf\xe9".encode("latin-1"))
    (root / "2.txt").write_bytes("cr\xe8me".encode("latin-1"))
    cfg = _cfg(source="folder", root=str(root))
    with caplog.at_level(logging.INFO, logger="fusedit.data"):
        cache_latents(cfg, VAEConfig(), tmp_path / "cache", 2, 8, progress=False)
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    first = str(root / "1.txt")
    assert warned == [
        f"data: the caption in {first} is not UTF-8: its bad bytes read as U+FFFD (said for the first such "
        "caption each data-loading process meets; save captions as UTF-8 to keep every character)",
        f"data: 2 captions encoded now were not UTF-8 (e.g. {root / '2.txt'}): cached with their bad bytes as U+FFFD",
    ]
    # A shard's .txt member is named by shard and member.
    monkeypatch.setattr(NOT_UTF8, "count", 0)
    shard = _tar(tmp_path / "s.tar", [("k.png", _png()), ("k.txt", b"caf\xe9")])
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="fusedit.data.transforms"):
        batch = next(iter(step_loader(_cfg(source="webdataset", shards=[str(shard)]), 0, 1, 0, 1)))
    assert batch["caption"] == ["caf\ufffd"]
    assert caplog.messages[0].startswith(f"data: the caption in {shard}/k.txt is not UTF-8")


def test_a_json_member_that_is_not_utf8_is_warned_about_and_read(tmp_path, caplog, monkeypatch):
    # It was skipped as "none of the fields holds text", with no word of its bytes.
    from fusedit.data.transforms import NOT_UTF8

    monkeypatch.setattr(NOT_UTF8, "count", 0)
    shard = _tar(tmp_path / "j.tar", [("k.png", _png()), ("k.json", b'{"caption": "caf\xe9"}')])
    cfg = _cfg(source="webdataset", shards=[str(shard)], caption_fields=["json.caption"])
    loader = step_loader(cfg, 0, 1, 0, 1)
    with caplog.at_level(logging.INFO, logger="fusedit.data.transforms"):
        batch = next(iter(loader))
    assert batch["caption"] == ["caf\ufffd"]
    assert loader.skips.counts() == {}
    assert NOT_UTF8.count == 1
    assert caplog.messages[0].startswith(f"data: the caption in {shard}/k.json is not UTF-8")


def test_the_data_summary_counts_one_sample_in_the_singular(tmp_path, caplog):
    root = tmp_path / "data"
    root.mkdir()
    (root / "a.png").write_bytes(_png())
    (root / "a.txt").write_text("a")
    with caplog.at_level(logging.INFO, logger="fusedit.data.loader"):
        step_loader(_cfg(source="folder", root=str(root)), 0, 1, 0, 1)
    assert f"data: 1 sample in {str(root)!r}" in caplog.messages


# --------------------------------------------------------------------------------------------------
# Pixels


@pytest.mark.parametrize(
    ("mode", "background", "key", "square"),
    [("RGB", (0, 0, 255), (0, 0, 255), (255, 255, 0)), ("L", 7, 7, 200), ("I;16", 1000, 1000, 40000)],
)
def test_a_colour_key_is_transparent_on_white_as_an_alpha_channel_is(mode, background, key, square):
    if mode == "I;16":
        pixels = np.full((8, 8), background, np.uint16)
        pixels[2:6, 2:6] = square
        image = Image.fromarray(pixels)
    else:
        image = Image.new(mode, (8, 8), background)
        image.paste(square, (2, 2, 6, 6))
    buf = io.BytesIO()
    image.save(buf, "PNG", transparency=key)
    opened = open_image(buf.getvalue())
    assert opened.mode == mode and opened.info["transparency"] == key
    rgb = decode_rgb(opened)
    inside = {"RGB": (255, 255, 0), "L": (200, 200, 200), "I;16": (156, 156, 156)}[mode]
    assert (rgb.getpixel((0, 0)), rgb.getpixel((3, 3))) == ((255, 255, 255), inside)


def _png_by_hand(bit_depth: int, colour_type: int, rows: list[bytes], width: int, trns: bytes) -> bytes:
    # Pillow writes neither 16-bit RGB nor 4-bit grey with a key: the chunks, written out.
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, len(rows), bit_depth, colour_type, 0, 0, 0)
    pixels = zlib.compress(b"".join(b"\0" + row for row in rows))
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"tRNS", trns)
        + chunk(b"IDAT", pixels)
        + chunk(b"IEND", b"")
    )


def test_a_colour_key_of_a_png_not_8_bits_deep_leaves_its_pixels_as_they_are():
    # 16-bit RGB reads as 8-bit "RGB" with its key still 16-bit: the key (100, 100, 100) is near black, and
    # Pillow would have made white the mid-grey pixels whose 8-bit value is 100.
    grey = np.zeros((4, 4, 3), ">u2")
    grey[:2] = 100
    grey[2:] = 100 * 257
    png = _png_by_hand(16, 2, [row.tobytes() for row in grey], 4, struct.pack(">HHH", 100, 100, 100))
    opened = open_image(png)
    assert (opened.mode, opened.info["transparency"]) == ("RGB", (100, 100, 100))
    rgb = decode_rgb(opened)
    assert (rgb.getpixel((0, 0)), rgb.getpixel((0, 3))) == ((0, 0, 0), (100, 100, 100))
    # 4-bit grey reads as "L" scaled up (1 as 17, 2 as 34): its key 1 makes the rows of 1 white, not
    # the pixels whose 8-bit value is 1 (there are none).
    rows = [bytes([0x11, 0x11])] * 2 + [bytes([0x22, 0x22])] * 2
    opened = open_image(_png_by_hand(4, 0, rows, 4, struct.pack(">H", 1)))
    assert (opened.mode, opened.info["transparency"]) == ("L", 1)
    rgb = decode_rgb(opened)
    assert (rgb.getpixel((0, 0)), rgb.getpixel((0, 3))) == ((255, 255, 255), (34, 34, 34))


# --------------------------------------------------------------------------------------------------
# Latent cache reruns


def test_the_cache_summary_counts_with_thousands_separators(tmp_path):
    from fusedit.data.latents import _cached_line

    summary = {"samples": 1234567, "skipped": {"corrupt": 33}, "shards": 3}
    assert _cached_line(summary, 1234000, tmp_path) == (
        f"cached 1,234,567 of 1,234,600 samples in 3 shards into {str(tmp_path)!r}: 1,234,000 already cached "
        "(captions edited since are not read again: to re-read them, delete the folder or cache into another "
        "one), 567 encoded now"
    )


def test_a_cache_rerun_refused_for_a_jfif_file_says_such_files_were_not_read_before(tmp_path):
    # The folder may not have changed: fusedit's scan has, and the cache was made before it.
    root = tmp_path / "data"
    root.mkdir()
    for name in ("a.png", "c.png"):
        (root / name).write_bytes(_png())
        (root / name).with_suffix(".txt").write_text("x")
    cfg = _cfg(source="folder", root=str(root))
    out = tmp_path / "cache"
    cache_latents(cfg, VAEConfig(), out, 2, 8, progress=False)
    jpeg = io.BytesIO()
    Image.new("RGB", (32, 32), (9, 9, 9)).save(jpeg, "JPEG")
    (root / "b.jfif").write_bytes(jpeg.getvalue())
    (root / "b.txt").write_text("y")
    with pytest.raises(ConfigError) as error:
        cache_latents(cfg, VAEConfig(), out, 2, 8, progress=False)
    assert str(error.value) == (
        f"{str(out)!r}: the dataset changed since shard 0 (positions 0..1) was cached: 'b.jfif' was added at "
        "position 1, before the last cached sample: the samples after it moved ('c.png' is now at position 2); "
        ".jfif files are images to fusedit since its data-edge fixes (docs/train-your-own-data.md), so a cache "
        "made before them left out any that were there already; use another folder (allowed: only samples "
        "added after the last cached one)"
    )


def test_a_cache_rerun_says_the_samples_it_skipped_are_not_retried(tmp_path, caplog):
    root = tmp_path / "data"
    root.mkdir()
    for i in range(3):
        (root / f"{i}.png").write_bytes(_png(seed=i))
        (root / f"{i}.txt").write_text(f"caption {i}")
    (root / "1.png").write_bytes(_png()[:60])  # truncated
    cfg = _cfg(source="folder", root=str(root))
    out = tmp_path / "cache"
    cache_latents(cfg, VAEConfig(), out, 2, 8, progress=False)
    (root / "1.png").write_bytes(_png(seed=1))  # repaired
    with caplog.at_level(logging.INFO, logger="fusedit.data.latents"):
        summary = cache_latents(cfg, VAEConfig(), out, 2, 8, progress=False)
    assert summary["samples"] == 2
    assert caplog.messages[-1] == (
        f"cached 2 of 3 samples in 1 shard into {str(out)!r}: all already cached, none encoded now (captions "
        "edited since are not read again, nor is the 1 sample skipped then retried: to re-read them, delete "
        "the folder or cache into another one)"
    )
