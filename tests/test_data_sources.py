"""Real-data sources: folders, webdataset shards, Hugging Face datasets; transforms, buckets, skips, ranks,
resume. Every test builds its own tiny data in a temporary folder."""

from __future__ import annotations

import io
import json
import logging
import os
import re
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fusedit.config import ConfigError, DataConfig, config_from_dict
from fusedit.data.loader import step_loader
from fusedit.data.plan import StepPlan
from fusedit.data.transforms import (
    SampleDecoder,
    SkipSample,
    caption_candidates,
    nearest_bucket,
    parse_buckets,
    resize_crop,
)
from fusedit.data.webdataset_source import WebDatasetReader, expand_braces, shard_lists

# (relative path, width, height, caption); JPEG and PNG, nested folders, three aspect ratios.
GOOD = [
    ("a/cat.png", 32, 32, "a cat"),
    ("a/dog.jpg", 48, 32, "a dog"),
    ("a/sub/owl.png", 32, 48, "an owl"),
    ("b/fox.png", 40, 40, "a fox"),
    ("b/hen.jpg", 64, 40, "a hen"),
    ("b/pig.png", 36, 54, "a pig"),
    ("c/ant.png", 30, 30, "an ant"),
    ("c/bee.jpg", 50, 30, "a bee"),
]


def _noise(width: int, height: int, seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def _encode(image: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt)
    return buf.getvalue()


def _write_good(root: Path, sidecars: bool = True) -> None:
    for i, (rel, w, h, caption) in enumerate(GOOD):
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        _noise(w, h, i).save(path, "JPEG" if rel.endswith(".jpg") else "PNG")
        if sidecars:
            path.with_suffix(".txt").write_text(caption)


@pytest.fixture
def folder(tmp_path) -> Path:
    """GOOD plus a corrupt PNG (random bytes), a tiny image and an image without a caption."""
    root = tmp_path / "images"
    _write_good(root)
    (root / "c" / "broken.png").write_bytes(os.urandom(200))
    (root / "c" / "broken.txt").write_text("never shown")
    _noise(6, 6, 99).save(root / "c" / "tiny.png")
    (root / "c" / "tiny.txt").write_text("too small")
    _noise(32, 32, 98).save(root / "c" / "nocaption.png")
    (root / ".hidden").mkdir()
    _noise(32, 32, 97).save(root / ".hidden" / "skip.png")  # hidden folders are not data
    return root


def _cfg(**kw) -> DataConfig:
    base = {"image_size": 16, "min_image_size": 16}
    return DataConfig(**{**base, **kw})


def _run(cfg, steps, batch_size=4, seed=0, start=0, **kw):
    loader = step_loader(cfg, seed, batch_size, start, steps, **kw)
    return loader, list(loader)


# --------------------------------------------------------------------------------------------------
# Folder


def test_folder_scan_is_sorted_and_skips_are_counted_and_reported(folder):
    loader, batches = _run(_cfg(source="folder", root=str(folder)), steps=6)  # 24 draws: > 2 epochs
    captions = {rel: cap for rel, _, _, cap in GOOD}
    seen = set()
    for batch in batches:
        assert batch["image"].shape == (4, 3, 16, 16) and batch["image"].dtype == torch.float32
        assert batch["image"].min() >= -1 and batch["image"].max() <= 1
        assert batch["index"].dtype == torch.long and len(batch["caption"]) == 4
        for sample_id, caption in zip(batch["id"], batch["caption"]):
            assert captions[sample_id] == caption  # the sidecar of that very image
            seen.add(sample_id)
    assert seen == set(captions)  # every good image, nothing else (hidden folder ignored)
    from fusedit.data.folder import scan_images

    assert scan_images(folder) == sorted(scan_images(folder)) and len(scan_images(folder)) == 11
    # distinct samples per reason, however often each was met
    assert loader.skips.counts() == {"corrupt": 1, "no-caption": 1, "tiny": 1}
    report = loader.skipped_report()
    assert "corrupt 1" in report and "c/broken.png" in report and "tiny 1" in report and "6x6" in report


def test_index_jsonl_and_csv_with_missing_files_and_bad_rows(tmp_path):
    root = tmp_path / "data"
    _write_good(root, sidecars=False)
    rows = [{"path": rel, "caption": cap, "width": w, "height": h} for rel, w, h, cap in GOOD]
    rows.insert(3, {"path": "a/gone.png", "caption": "missing file", "width": 32, "height": 32})
    lines = [json.dumps(r) for r in rows] + ["{not json", json.dumps({"caption": "no path"})]
    index = root / "index.jsonl"
    index.write_text("\n".join(lines) + "\n")
    loader, batches = _run(_cfg(source="folder", index_file=str(index)), steps=5)
    assert {i for b in batches for i in b["id"]} == {rel for rel, *_ in GOOD}
    assert loader.skips.counts() == {"bad-row": 2, "missing": 1}
    assert "index.jsonl:10" in loader.skipped_report() and "a/gone.png" in loader.skipped_report()

    # CSV, another path column name, root given separately, a configured caption column
    csv = tmp_path / "list.csv"
    csv.write_text("file_name,text\n" + "".join(f"{rel},{cap} (csv)\n" for rel, _, _, cap in GOOD[:4]))
    cfg = _cfg(source="folder", index_file=str(csv), root=str(root), caption_fields=["text"])
    _, batches = _run(cfg, steps=2)
    assert {c for b in batches for c in b["caption"]} == {f"{cap} (csv)" for *_, cap in GOOD[:4]}


def test_index_with_the_documented_file_column_loads_as_jsonl_and_csv(tmp_path):
    # The layout docs/train-your-own-data.md shows: {"file": "more/0003.webp", "caption": "..."} lines, or
    # a CSV with a file,caption header; relative paths resolved against the index file's folder.
    root = tmp_path / "data"
    _write_good(root, sidecars=False)
    (root / "more").mkdir()
    _noise(32, 32, 50).save(root / "more" / "0003.webp", "WEBP")
    listed = [(rel, cap) for rel, *_, cap in GOOD[:3]] + [("more/0003.webp", "a webp, with a comma")]
    jsonl = root / "index.jsonl"
    jsonl.write_text("".join(json.dumps({"file": rel, "caption": cap}) + "\n" for rel, cap in listed))
    csv = root / "index.csv"
    csv.write_text("file,caption\n" + "".join(f'{rel},"{cap}"\n' for rel, cap in listed))
    for index in (jsonl, csv):
        loader, batches = _run(_cfg(source="folder", index_file=str(index)), steps=2)
        assert {(i, c) for b in batches for i, c in zip(b["id"], b["caption"])} == set(listed), index.name
        assert loader.skips.counts() == {}


@pytest.mark.parametrize(
    ("text", "kind"),
    [
        # an export's list of rows: pretty-printed, one object per line with a comma after, or on one line
        (
            '[\n  {"file": "a/cat.png", "caption": "a cat"},\n'
            '  {"file": "a/dog.jpg", "caption": "a dog"}\n]\n',
            "array",
        ),
        ('[{"file": "a/cat.png", "caption": "a cat"}]\n', "array"),
        ('{\n  "file": "a/cat.png",\n  "caption": "a cat"\n}\n', "object"),
    ],
    ids=["array-per-line", "array-one-line", "object"],
)
def test_an_index_that_is_one_json_document_is_refused_as_not_json_lines(tmp_path, text, kind):
    root = tmp_path / "data"
    _write_good(root, sidecars=False)
    (root / "index.json").write_text(text)
    with pytest.raises(ConfigError) as error:
        _run(_cfg(source="folder", index_file=str(root / "index.json")), steps=1)
    assert str(error.value) == (
        f"data.index_file={str(root / 'index.json')!r} holds one JSON {kind}, not JSON Lines (one JSON "
        "object per line; allowed: .jsonl, .json, .ndjson with one JSON object per line, or .csv, .tsv with "
        "a header row)"
    )


def test_an_index_of_unusable_rows_or_another_suffix_is_a_one_line_error(tmp_path):
    root = tmp_path / "data"
    _write_good(root, sidecars=False)
    (root / "index.jsonl").write_text("not json\n" + json.dumps({"file": "", "caption": "no path"}) + "\n")
    with pytest.raises(ConfigError) as error:
        _run(_cfg(source="folder", index_file=str(root / "index.jsonl")), steps=1)
    assert str(error.value) == (
        f"data.index_file={str(root / 'index.jsonl')!r} lists no images (2 unusable rows, e.g. "
        "index.jsonl:1: not a JSON object)"
    )
    (root / "index.txt").write_text("a/cat.png\n")
    with pytest.raises(ConfigError) as error:
        _run(_cfg(source="folder", index_file=str(root / "index.txt")), steps=1)
    assert str(error.value) == (
        f"data.index_file={str(root / 'index.txt')!r} ends in '.txt' (allowed: .jsonl, .json, .ndjson with "
        "one JSON object per line, or .csv, .tsv with a header row)"
    )


BOM = b"\xef\xbb\xbf"  # the UTF-8 byte-order mark Excel ("CSV UTF-8") and Windows Notepad write first


def _captions_by_id(cfg, steps=2) -> dict:
    loader, batches = _run(cfg, steps=steps, batch_size=2)
    assert loader.skips.counts() == {}
    return {i: c for b in batches for i, c in zip(b["id"], b["caption"])}


def test_index_files_and_sidecars_with_a_utf8_bom_read_like_plain_utf8(tmp_path):
    root = tmp_path / "data"
    _write_good(root, sidecars=False)
    listed = {rel: cap for rel, *_, cap in GOOD[:2]}
    expected = {rel: f"{cap} é" for rel, cap in listed.items()}
    files = {
        "path-first.csv": "file,caption\n" + "".join(f"{r},{c} é\n" for r, c in listed.items()),
        # The caption column first: with the BOM in its name every row was a no-caption skip.
        "caption-first.csv": "caption,file\n" + "".join(f"{c} é,{r}\n" for r, c in listed.items()),
        "rows.jsonl": "".join(json.dumps({"file": r, "caption": f"{c} é"}) + "\n" for r, c in listed.items()),
    }
    for name, text in files.items():
        (root / name).write_bytes(BOM + text.encode("utf-8"))
        cfg = _cfg(source="folder", index_file=str(root / name), caption_fields=["caption"])
        assert _captions_by_id(cfg) == expected, name

    sidecars = tmp_path / "sidecars"
    _write_good(sidecars, sidecars=False)
    for rel, cap in listed.items():
        (sidecars / rel).with_suffix(".txt").write_bytes(BOM + f"{cap} é".encode())
    for rel, *_, cap in GOOD[3:5]:  # JSON sidecars with a BOM were unparsable: no caption at all
        (sidecars / rel).with_suffix(".json").write_bytes(BOM + json.dumps({"caption": cap}).encode())
    for rel, *_ in GOOD[2:3] + GOOD[5:]:
        (sidecars / rel).unlink()  # keep only the four captioned images
    cfg = _cfg(source="folder", root=str(sidecars), caption_fields=["txt", "json.caption"])
    assert _captions_by_id(cfg) == {**expected, **{rel: cap for rel, *_, cap in GOOD[3:5]}}
    # A webdataset .txt member with a BOM alike.
    assert caption_candidates({"txt": BOM + b"a red circle"}, ["txt"]) == ["a red circle"]


def test_several_caption_fields_of_one_json_member_parse_it_once(monkeypatch):
    """A webdataset .json member holding a long record is parsed once per sample, not once per field."""
    import fusedit.data.transforms as transforms

    calls = []
    loads = json.loads
    monkeypatch.setattr(transforms.json, "loads", lambda text: calls.append(text) or loads(text))
    member = json.dumps({"caption": "a red circle", "meta": {"alt": "a circle"}, "tags": ["red"]}).encode()
    fields = ["json.caption", "json.meta.alt", "json.missing", "txt"]
    assert caption_candidates({"json": member, "txt": b"red"}, fields) == ["a red circle", "a circle", "red"]
    assert calls == [member.decode()]  # decoded once too (decode_text), then parsed
    calls.clear()
    assert caption_candidates({"json": b"not json", "txt": b"red"}, fields) == ["red"]
    assert calls == ["not json"]


def test_caption_sidecars_match_the_image_whatever_the_case_of_their_extension(tmp_path):
    root = tmp_path / "data"
    root.mkdir()
    for i, name in enumerate(["UP.JPG", "mixed.png", "json.PNG", "both.png", "x.v2.jpg"]):
        _noise(32, 32, i).save(root / name, "JPEG" if name.lower().endswith(".jpg") else "PNG")
    (root / "UP.TXT").write_text("upper case, as cameras write it")
    (root / "mixed.Txt").write_text("mixed case")
    (root / "json.JSON").write_text(json.dumps({"caption": "from an upper-case json"}))
    (root / "both.TXT").write_text("not this one")
    (root / "both.txt").write_text("the exact .txt wins")
    (root / "x.v2.TXT").write_text("dotted stem")
    (root / "x.txt").write_text("another image's stem")
    cfg = _cfg(source="folder", root=str(root), caption_fields=["txt", "json.caption"])
    assert _captions_by_id(cfg, steps=3) == {
        "UP.JPG": "upper case, as cameras write it",
        "mixed.png": "mixed case",
        "json.PNG": "from an upper-case json",
        "both.png": "the exact .txt wins",
        "x.v2.jpg": "dotted stem",
    }


def test_symlinked_folders_are_followed_once_and_a_loop_does_not_multiply_images(tmp_path):
    from fusedit.data.folder import scan_images

    root, outside = tmp_path / "data", tmp_path / "elsewhere"
    for rel in ("a/one.png", "z/two.png", "a/deep/three.png"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        _noise(32, 32, 0).save(root / rel)
    (outside / "sub").mkdir(parents=True)
    _noise(32, 32, 1).save(outside / "sub" / "far.png")
    try:
        # One loop only: without the fix each loop is walked until the OS refuses the path (about 40
        # turns), and two loops would multiply into a walk that does not end in a test's time.
        (root / "a" / "up").symlink_to("..", target_is_directory=True)  # a loop back to the root
        (root / "b-link").symlink_to(root / "z", target_is_directory=True)  # into the tree, sorts first
        (root / "ext1").symlink_to(outside, target_is_directory=True)  # another disk: followed
        (root / "ext2").symlink_to(outside / "sub", target_is_directory=True)  # reached via ext1 already
    except OSError as e:  # e.g. Windows without the symlink privilege
        pytest.skip(f"cannot create symlinks here: {e}")
    expected = ["a/deep/three.png", "a/one.png", "ext1/sub/far.png", "z/two.png"]
    assert scan_images(root) == expected


def test_caption_fields_random_pick_is_deterministic_and_varies_by_epoch(tmp_path):
    root = tmp_path / "data"
    _write_good(root)
    for rel, *_ in GOOD:
        (root / rel).with_suffix(".json").write_text(json.dumps({"caption": "long " + rel}))
    fields = ["txt", "json.caption"]

    def captions(pick, seed):
        cfg = _cfg(source="folder", root=str(root), caption_fields=fields, caption_pick=pick)
        return [(i, c) for b in _run(cfg, steps=32, seed=seed)[1] for i, c in zip(b["id"], b["caption"])]

    first = captions("first", 0)
    assert all(not c.startswith("long") for _, c in first)
    random_a, random_b = captions("random", 0), captions("random", 0)
    assert random_a == random_b  # deterministic by seed
    for rel, *_ in GOOD:  # over 16 epochs every sample shows both of its captions
        shown = {c for i, c in random_a if i == rel}
        assert len(shown) == 2, (rel, shown)


def test_order_is_a_permutation_per_epoch_deterministic_by_seed_and_addressed_by_step(folder):
    cfg = _cfg(source="folder", root=str(folder), min_image_size=1, caption_fields=["txt", "caption"])
    _, full = _run(cfg, steps=6, batch_size=3)
    _, again = _run(cfg, steps=6, batch_size=3)
    _, tail = _run(cfg, steps=6, batch_size=3, start=4)
    _, other_seed = _run(cfg, steps=6, batch_size=3, seed=1)
    assert [b["id"] for b in full] == [b["id"] for b in again]
    assert all(torch.equal(a["image"], b["image"]) for a, b in zip(full, again))
    assert [b["id"] for b in full[4:]] == [b["id"] for b in tail]  # step addressing: exact resume
    assert [b["id"] for b in full] != [b["id"] for b in other_seed]


def test_a_resume_warns_when_the_folder_changed_size_and_old_states_are_not_checked(tmp_path, caplog):
    root = tmp_path / "data"
    _write_good(root)
    cfg = _cfg(source="folder", root=str(root))
    first, _ = _run(cfg, steps=2)
    state = json.loads(json.dumps(first.state_dict()))
    assert state["samples"] == len(GOOD)

    def warnings(state, **ranks) -> list[str]:
        caplog.clear()
        with caplog.at_level("WARNING", logger="fusedit"):
            _run(cfg, steps=3, start=2, state=state, **ranks)
        return [r.getMessage() for r in caplog.records]

    assert warnings(state) == []  # same folder
    _noise(32, 32, 50).save(root / "c" / "extra.png")
    (root / "c" / "extra.txt").write_text("an extra")
    assert len(messages := warnings(state)) == 1
    assert messages[0].startswith(
        f"data: the dataset has {len(GOOD) + 1} samples, not the {len(GOOD)} it had"
    )
    assert len(warnings(state, rank=0, world_size=2)) == 1
    assert warnings(state, rank=1, world_size=2) == []  # the first rank says it for every rank
    old = {k: v for k, v in state.items() if k != "samples"}  # a checkpoint from before the size was saved
    assert warnings(old) == []


def test_ranks_read_disjoint_shares_that_cover_each_epoch(tmp_path):
    root = tmp_path / "data"
    _write_good(root)  # 8 good samples
    cfg = _cfg(source="folder", root=str(root))
    for world in (2, 4):
        steps = len(GOOD) // (2 * world)  # one epoch over all ranks together
        shares = [
            [i for b in _run(cfg, steps=steps, batch_size=2, rank=r, world_size=world)[1] for i in b["id"]]
            for r in range(world)
        ]
        epoch = [i for share in shares for i in share]
        assert sorted(epoch) == sorted(rel for rel, *_ in GOOD)  # disjoint and covering


def test_plan_with_buckets_reads_one_bucket_per_step_whatever_the_split(caplog):
    """A step's global batch is one bucket, each rank reading its rows of it: 1 x 6, 2 x 3 and 3 x 2 read
    the same samples at every step (so a resume on another split goes on exactly), and an epoch covers
    every usable sample, never an unusable one."""
    groups = np.array([0] * 13 + [1] * 7 + [2] * 1 + [-1] * 2)  # uneven buckets, two unusable samples

    def global_batches(batch: int, world: int, steps: int) -> list[list[int]]:
        plans = [
            StepPlan(len(groups), batch, seed=7, rank=r, world_size=world, groups=groups)
            for r in range(world)
        ]
        return [[next(p.candidates(s))[0] for p in plans for s in p.slots(step)] for step in range(steps)]

    per_epoch = StepPlan(len(groups), 2, seed=7, rank=1, world_size=3, groups=groups).batches_per_epoch
    assert per_epoch == 3 + 2 + 1  # ceil(13/6) + ceil(7/6) + ceil(1/6)
    reads = global_batches(2, 3, 2 * per_epoch)
    assert reads == global_batches(3, 2, 2 * per_epoch) == global_batches(6, 1, 2 * per_epoch)
    assert all(len({int(groups[m]) for m in batch}) == 1 for batch in reads)  # one bucket per step
    assert {m for batch in reads[:per_epoch] for m in batch} == set(range(21))
    assert reads[:per_epoch] != reads[per_epoch:]  # each epoch its own order
    # A bucket smaller than the global batch repeats samples within it: the first rank says so.
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        for rank in (0, 1):
            StepPlan(len(groups), 4, seed=7, rank=rank, world_size=2, groups=groups, names=["a", "b", "c"])
    assert [r.getMessage() for r in caplog.records] == [
        "data: bucket(s) b (7), c (1) hold fewer usable samples than the global batch of 8: each of their "
        "batches repeats samples (fewer buckets, or more data in them, avoid it)"
    ]


def test_buckets_give_one_shape_per_batch(folder):
    buckets = [[16, 16], [16, 24], [24, 16]]
    cfg = _cfg(source="folder", root=str(folder), buckets=buckets)
    loader, batches = _run(cfg, steps=8, batch_size=2, world_size=2, rank=1)
    assert len(batches) == 8
    shapes = {tuple(b["image"].shape[2:]) for b in batches}
    assert shapes <= {(16, 16), (16, 24), (24, 16)} and len(shapes) >= 2
    sizes = {rel: (w, h) for rel, w, h, _ in GOOD}
    for b in batches:
        for sample_id in b["id"]:
            w, h = sizes[sample_id]
            assert buckets[nearest_bucket(w, h, [tuple(x) for x in buckets])] == list(b["image"].shape[2:])
    # planning found the unusable files before any batch was built (rank 0 counts them, for every rank)
    assert (
        loader.planned.counts() == {"corrupt": 1, "no-caption": 1, "tiny": 1} and loader.skips.counts() == {}
    )
    assert parse_buckets(buckets) == ((16, 16), (16, 24), (24, 16))
    with pytest.raises(ConfigError, match=r"data.buckets entry \[16, 0\]"):
        parse_buckets([[16, 0]])


def test_scan_and_bucket_planning_show_progress_on_rank_0_and_log_the_epoch_size(folder, capsys, caplog):
    buckets = _cfg(source="folder", root=str(folder), buckets=[[16, 16], [16, 24], [24, 16]])
    with caplog.at_level(logging.INFO, logger="fusedit"):
        step_loader(buckets, 0, 2, 0, 1, progress=True)
        bars = capsys.readouterr().err
        assert "scan images" in bars and "bucket images" in bars
        step_loader(buckets, 0, 2, 0, 1, progress=True, rank=1, world_size=2)  # rank 0 speaks for all
        assert "images" not in capsys.readouterr().err
        step_loader(buckets, 0, 2, 0, 1)
        assert "images" not in capsys.readouterr().err
        step_loader(_cfg(source="folder", root=str(folder)), 0, 2, 0, 1)
    epochs = [
        r.getMessage()
        for r in caplog.records
        if r.getMessage().startswith("data: ") and "samples" in r.getMessage()
    ]
    assert epochs == [
        f"data: 8 usable samples of 11 in {str(folder)!r} (3 buckets)",
        f"data: 8 usable samples of 11 in {str(folder)!r} (3 buckets)",
        f"data: 11 samples in {str(folder)!r}",
    ]


def test_transform_resize_crop_and_random_crop_determinism():
    image = _noise(40, 20, 0)
    center = resize_crop(image, 16, 16)
    assert center.size == (16, 16)
    resized = image.resize((32, 16), Image.Resampling.LANCZOS)
    assert np.array_equal(np.asarray(center), np.asarray(resized.crop((8, 0, 24, 16))))
    a = resize_crop(image, 16, 16, "random", seed=3, key=11)
    assert np.array_equal(np.asarray(a), np.asarray(resize_crop(image, 16, 16, "random", seed=3, key=11)))
    offsets = {np.asarray(resize_crop(image, 16, 16, "random", seed=3, key=k)).tobytes() for k in range(20)}
    assert len(offsets) > 3  # different samples, different crops
    decoder = SampleDecoder(targets=((16, 16),), min_image_size=16)
    with pytest.raises(SkipSample, match="tiny"):
        decoder({"txt": "x"}, _encode(_noise(15, 40, 0), "PNG"), key=0)
    with pytest.raises(SkipSample, match="corrupt"):
        decoder({"txt": "x"}, _encode(_noise(40, 40, 0), "PNG")[:-200], key=0)  # truncated
    rgba = Image.new("RGBA", (16, 16), (0, 0, 0, 0))
    out = decoder({"txt": "x"}, _encode(rgba, "PNG"), key=0)
    assert torch.allclose(out.image, torch.ones(3, 16, 16))  # transparent -> white, not black


def test_deep_greyscale_images_are_scaled_to_8_bits_not_clipped(tmp_path):
    levels = np.arange(256).reshape(16, 16)  # every 8-bit level once; 16x16 = the target: no resampling
    expected = torch.from_numpy(levels).float().expand(3, 16, 16) / 127.5 - 1.0
    decoder = SampleDecoder(targets=((16, 16),), min_image_size=16)
    png16 = tmp_path / "grey16.png"
    Image.fromarray((levels * 257).astype(np.uint16)).save(png16)
    assert Image.open(png16).mode == "I;16"  # what PIL makes of a 16-bit greyscale PNG
    for value in (
        str(png16),
        Image.fromarray((levels * 257).astype(np.int32)),  # "I" within 16 bits: 16-bit data
        Image.fromarray(np.rint(levels * ((2**31 - 1) / 255)).astype(np.int32)),  # "I", full 32 bits
        Image.fromarray((levels / 255).astype(np.float32)),  # "F" in [0, 1]
    ):
        out = decoder({"txt": "x"}, value, key=0)
        assert torch.equal(out.image, expected), getattr(value, "mode", value)


def _uncaptioned_folder(root: Path) -> Path:
    """Images whose .json sidecar holds the caption under "caption", which the default fields do not read."""
    for rel, w, h, caption in GOOD[:3]:
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        _noise(w, h, 0).save(path, "JPEG" if rel.endswith(".jpg") else "PNG")
        path.with_suffix(".json").write_text(json.dumps({"caption": caption}))
    return root


@pytest.mark.parametrize(
    "extra",
    [{}, {"num_workers": 1}, {"buckets": [[16, 16], [16, 24]]}],
    ids=["in-process", "worker-process", "buckets"],
)
def test_no_usable_sample_is_a_one_line_config_error_naming_the_fix(tmp_path, extra):
    root = _uncaptioned_folder(tmp_path / "data")
    with pytest.raises(ConfigError) as error:
        _run(_cfg(source="folder", root=str(root), **extra), steps=1)
    message = str(error.value)
    assert "\n" not in message  # also from a DataLoader worker, whose errors carry its traceback
    assert message.startswith("no usable sample left to fill a batch; skipped 3 samples")
    assert re.search(
        r"no-caption 3 \(e\.g\. a/\S+: none of the fields \['txt', 'caption'\] holds text", message
    )
    assert "data.caption_fields (e.g. [txt, json.caption]" in message
    # the hint works: the same folder loads with the field it names
    _, batches = _run(_cfg(source="folder", root=str(root), caption_fields=["json.caption"]), steps=1)
    assert sorted(batches[0]["caption"][:3]) == ["a cat", "a dog", "an owl"]


def test_cli_prints_no_usable_sample_in_one_line(tmp_path, capsys):
    import yaml

    from conftest import TINY
    from fusedit.cli import main

    root = _uncaptioned_folder(tmp_path / "data")
    config = tmp_path / "run.yaml"
    config.write_text(
        yaml.safe_dump({**TINY, "data": {"source": "folder", "root": str(root), "image_size": 16}})
    )
    assert main(["train", str(config), "--out", str(tmp_path / "run"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("fusedit: error: no usable sample left to fill a batch; skipped 3 samples")
    assert not any("Traceback" in line for line in err)


# --------------------------------------------------------------------------------------------------
# WebDataset


def _write_shards(
    folder: Path, prefix: str, shards: int, per_shard: int, corrupt: tuple = (), blank: tuple = ()
) -> list[str]:
    """Tar shards of JPEGs with .txt and .json captions; ``corrupt``/``blank`` (shard, index) pairs get noise
    bytes for an image / an empty .txt member."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for s in range(shards):
        path = folder / f"{prefix}-{s:04d}.tar"
        with tarfile.open(path, "w") as tar:
            for i in range(per_shard):
                key = f"{s:05d}/{s:05d}{i:04d}"
                w, h = (32, 32) if i % 3 == 0 else ((48, 32) if i % 3 == 1 else (32, 48))
                image = os.urandom(300) if (s, i) in corrupt else _encode(_noise(w, h, s * 100 + i), "JPEG")
                members = {
                    "jpg": image,
                    "txt": b" \n" if (s, i) in blank else f"{prefix} {s} {i}".encode(),
                    "json": json.dumps({"caption": f"json {prefix} {s} {i}", "width": w}).encode(),
                }
                for ext, data in members.items():
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        paths.append(str(path))
    return paths


def test_brace_expansion():
    assert expand_braces("d/x-{0000..0002}.tar") == ["d/x-0000.tar", "d/x-0001.tar", "d/x-0002.tar"]
    assert expand_braces("{a,b}-{1..2}") == ["a-1", "a-2", "b-1", "b-2"]
    assert expand_braces("{8..10}") == ["8", "9", "10"] and expand_braces("plain.tar") == ["plain.tar"]
    assert expand_braces("{x,{y,z}0}") == ["x", "y0", "z0"]
    with pytest.raises(ConfigError, match="unclosed"):
        expand_braces("a-{0..3.tar")


def _epoch_ids(datasets, seed, rank, world):
    reader = WebDatasetReader(datasets, [1.0], seed=seed, rank=rank, world_size=world)
    ids = []
    while True:
        record = reader.next()
        if record.epoch > 0:
            return ids
        ids.append(record.id)


def test_webdataset_ranks_take_disjoint_shares_covering_the_epoch(tmp_path):
    paths = _write_shards(tmp_path / "wds", "a", shards=4, per_shard=6)
    everything = sorted(_epoch_ids([paths], 0, 0, 1))
    assert len(everything) == 24
    for world in (2, 3, 6):  # 6 > 4 shards: samples are striped inside the shards instead
        shares = [_epoch_ids([paths], 0, r, world) for r in range(world)]
        assert sorted(i for share in shares for i in share) == everything, world
    assert _epoch_ids([paths], 0, 0, 1) == _epoch_ids([paths], 0, 0, 1)
    assert _epoch_ids([paths], 0, 0, 1) != _epoch_ids([paths], 1, 0, 1)  # shuffled by seed


def test_webdataset_mixes_datasets_by_weight(tmp_path):
    a = _write_shards(tmp_path / "wds", "a", shards=2, per_shard=4)
    b = _write_shards(tmp_path / "wds", "b", shards=1, per_shard=4)
    datasets, weights = shard_lists([str(tmp_path / "wds/a-{0000..0001}.tar"), b], [3, 1])
    assert datasets == [a, b] and weights == [0.75, 0.25]
    reader = WebDatasetReader(datasets, weights, seed=0)
    ids = [reader.next().id for _ in range(800)]
    share = sum("/a-" in i for i in ids) / len(ids)
    assert 0.7 < share < 0.8, share


def test_webdataset_loader_restores_its_position_exactly(tmp_path):
    _write_shards(tmp_path / "wds", "a", shards=3, per_shard=5, corrupt={(1, 2)})
    _write_shards(tmp_path / "wds", "b", shards=2, per_shard=4)
    cfg = _cfg(
        source="webdataset",
        shards=[str(tmp_path / "wds/a-{0000..0002}.tar"), str(tmp_path / "wds/b-{0000..0001}.tar")],
        weights=[2, 1],
        buckets=[[16, 16], [16, 24], [24, 16]],  # pending samples per bucket are part of the position
        caption_fields=["txt", "json.caption"],
    )
    loader, full = _run(cfg, steps=10, batch_size=3)
    assert all(b["image"].shape[0] == 3 for b in full) and len({b["image"].shape for b in full}) > 1
    assert loader.skips.counts() == {"corrupt": 1}
    first = step_loader(cfg, 0, 3, 0, 4)
    head = list(first)
    state = json.loads(json.dumps(first.state_dict()))  # a checkpoint stores it as JSON
    resumed_loader = step_loader(cfg, 0, 3, 4, 10, state=state)
    resumed = list(resumed_loader)
    assert resumed_loader.skips.counts() == loader.skips.counts()  # the counts travel with the state
    replayed = list(step_loader(cfg, 0, 3, 4, 10))  # no state: fast-forward, slower but exact
    threaded = list(step_loader(DataConfig(**{**cfg.__dict__, "num_workers": 2}), 0, 3, 0, 10))
    for got in (head + resumed, full[:4] + replayed, threaded):
        assert [b["id"] for b in got] == [b["id"] for b in full]
        assert [b["caption"] for b in got] == [b["caption"] for b in full]
        assert all(torch.equal(x["image"], y["image"]) for x, y in zip(got, full))
    with pytest.raises(ValueError, match="data state is for step 4"):
        step_loader(cfg, 0, 3, 5, 10, state=state)


def test_webdataset_corrupt_shard_is_counted_and_the_stream_goes_on(tmp_path):
    paths = _write_shards(tmp_path / "wds", "a", shards=2, per_shard=4)
    Path(paths[1]).write_bytes(os.urandom(3000))  # not a tar at all
    truncated = _write_shards(tmp_path / "wds", "t", shards=1, per_shard=4)[0]
    data = Path(truncated).read_bytes()
    Path(truncated).write_bytes(data[: len(data) // 2])  # cut in the middle of a member
    cfg = _cfg(source="webdataset", shards=[[paths[0], paths[1], truncated]])
    loader, batches = _run(cfg, steps=4, batch_size=2)
    assert len(batches) == 4 and all(b["image"].shape == (2, 3, 16, 16) for b in batches)
    counts = loader.skips.counts()
    assert counts["corrupt-shard"] == 2 and counts.get("corrupt", 0) >= 1
    assert paths[1] in loader.skipped_report()


@pytest.mark.parametrize("workers", [0, 2])
def test_webdataset_without_usable_samples_is_a_config_error_not_an_endless_read(tmp_path, workers):
    paths = _write_shards(tmp_path / "wds", "a", shards=2, per_shard=3)
    cfg = _cfg(source="webdataset", shards=[paths], caption_fields=["json.title"], num_workers=workers)
    with pytest.raises(ConfigError) as error:
        _run(cfg, steps=1, batch_size=2)
    message = str(error.value)
    assert message.startswith("no usable sample left to fill a batch; skipped 6 samples (12 times)")
    assert "no-caption 6" in message and "data.caption_fields" in message


def test_webdataset_mixed_source_without_usable_samples_is_named(tmp_path):
    good = _write_shards(tmp_path / "wds", "a", shards=1, per_shard=4)
    every = tuple((0, i) for i in range(3))
    bad = _write_shards(tmp_path / "wds", "b", shards=1, per_shard=3, corrupt=every)
    cfg = _cfg(source="webdataset", shards=[good, bad], weights=[1, 1])
    with pytest.raises(
        ConfigError, match=r"^no usable sample left to fill a batch \(data.shards entry 1 has "
    ):
        _run(cfg, steps=50, batch_size=2)
    # Mixed with a source that is only partly unusable, the stream goes on.
    partly = _write_shards(tmp_path / "wds", "c", shards=1, per_shard=3, corrupt=every[:2])
    loader, batches = _run(_cfg(source="webdataset", shards=[good, partly]), steps=20, batch_size=2)
    assert len(batches) == 20 and loader.skips.counts() == {"corrupt": 2}


def test_webdataset_config_errors_are_one_line(tmp_path):
    paths = _write_shards(tmp_path / "wds", "a", shards=2, per_shard=2)
    with pytest.raises(ConfigError, match=r"1 of 3 shards do not exist \(first: '.*a-0002.tar'\)"):
        shard_lists([str(tmp_path / "wds/a-{0000..0002}.tar")], [])
    with pytest.raises(ConfigError, match=r"data.weights=\[1, 2\] must list one finite non-negative number"):
        shard_lists([paths], [1, 2])
    with pytest.raises(ConfigError, match="data.shards='x.tar' must be a non-empty list"):
        shard_lists("x.tar", [])


def test_webdataset_shards_without_samples_are_named_with_the_first_read_error(tmp_path):
    bad = tmp_path / "x.tar"
    bad.write_bytes(b"not a tar at all\n" * 200)
    empty = tmp_path / "empty.tar"
    tarfile.open(empty, "w").close()  # a tar, but with no sample in it
    for shards, why in [
        ([bad], f"1 shards; {str(bad)!r}: not a tar file, plain or compressed"),
        ([empty, bad], f"2 shards; {str(bad)!r}: not a tar file, plain or compressed"),
        ([empty], f"1 shards; e.g. {str(empty)!r} has none"),
    ]:
        with pytest.raises(ConfigError) as error:
            _run(_cfg(source="webdataset", shards=[[str(s) for s in shards]]), steps=1)
        assert str(error.value) == f"data.shards entry 0 has no readable samples for rank 0 of 1 ({why})"


# --------------------------------------------------------------------------------------------------
# Config, errors, shapes


def test_config_fields_and_errors(tmp_path):
    from conftest import TINY

    data = {**TINY, "data": {**TINY["data"], "source": "webdataset", "shards": ["x-{0..3}.tar"]}}
    cfg = config_from_dict(data)
    assert cfg.data.shards == ["x-{0..3}.tar"] and cfg.data.buckets == [] and cfg.data.crop == "center"
    with pytest.raises(ConfigError, match=r"data.source='lmdb' is not allowed \(allowed: shapes, folder"):
        config_from_dict({**TINY, "data": {"source": "lmdb"}})
    with pytest.raises(ConfigError, match=r"data.crop='left' is not allowed"):
        config_from_dict({**TINY, "data": {"crop": "left"}})
    with pytest.raises(ConfigError, match="data.source=folder needs data.root"):
        step_loader(_cfg(source="folder"), 0, 2, 0, 1)
    with pytest.raises(ConfigError, match=r"data.root='.*nowhere' is not a folder"):
        step_loader(_cfg(source="folder", root=str(tmp_path / "nowhere")), 0, 2, 0, 1)
    with pytest.raises(ValueError, match="rank=2, world_size=2"):
        step_loader(_cfg(), 0, 2, 0, 1, rank=2, world_size=2)


def test_shapes_source_keeps_its_addressing():
    cfg = DataConfig(image_size=16, max_objects=2, kinds=["single"], num_samples=50)
    batches = list(step_loader(cfg, 0, 4, 3, 5))
    assert [b["index"].tolist() for b in batches] == [[12, 13, 14, 15], [16, 17, 18, 19]]
    ranks = [list(step_loader(cfg, 0, 4, 3, 4, rank=r, world_size=2))[0]["index"].tolist() for r in (0, 1)]
    assert ranks == [[24, 25, 26, 27], [28, 29, 30, 31]]


# --------------------------------------------------------------------------------------------------
# Hugging Face datasets (optional dependency)


@pytest.fixture
def parquet(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    rows = {"image": [], "text": [], "id": []}
    for i, (rel, w, h, caption) in enumerate(GOOD):
        rows["image"].append({"bytes": _encode(_noise(w, h, i), "PNG"), "path": None})
        rows["text"].append(caption)
        rows["id"].append(rel)
    rows["image"].append({"bytes": os.urandom(100), "path": None})
    rows["text"].append("corrupt")
    rows["id"].append("corrupt-row")
    features = datasets.Features(
        {"image": datasets.Image(), "text": datasets.Value("string"), "id": datasets.Value("string")}
    )
    path = tmp_path / "train.parquet"
    datasets.Dataset.from_dict(rows, features=features).to_parquet(str(path))
    return path


def test_hf_parquet_map_style(parquet):
    cfg = _cfg(source="hf", hf_path=str(parquet), caption_fields=["text"])
    loader, batches = _run(cfg, steps=5)
    captions = {rel: cap for rel, _, _, cap in GOOD}
    assert all(captions[i] == c for b in batches for i, c in zip(b["id"], b["caption"]))
    assert {i for b in batches for i in b["id"]} == set(captions)
    assert loader.skips.counts() == {"corrupt": 1}
    with pytest.raises(ConfigError, match="data.image_field='jpg' is not a column"):
        step_loader(_cfg(source="hf", hf_path=str(parquet), image_field="jpg"), 0, 2, 0, 1)


def test_hf_stream_without_usable_samples_is_a_config_error(parquet):
    # Every image smaller than min_image_size (and one corrupt): the stream ends in an error, not a loop.
    cfg = _cfg(
        source="hf", hf_path=str(parquet), caption_fields=["text"], hf_streaming=True, min_image_size=99
    )
    with pytest.raises(ConfigError, match=r"^no usable sample left to fill a batch; skipped 9 samples"):
        _run(cfg, steps=1, batch_size=2)


@pytest.mark.parametrize("streaming", [False, True], ids=["map-style", "stream"])
def test_hf_caption_fields_naming_no_column_is_an_error_listing_the_columns(parquet, streaming):
    cfg = _cfg(
        source="hf", hf_path=str(parquet), caption_fields=["title", "json.caption"], hf_streaming=streaming
    )
    with pytest.raises(ConfigError) as error:
        _run(cfg, steps=1, batch_size=2)
    assert str(error.value) == (
        f"data.caption_fields=['title', 'json.caption'] names no column of {str(parquet)!r} (columns: image, "
        "text, id)"
    )


def test_hf_streaming_ranks_and_exact_restore(parquet):
    cfg = _cfg(source="hf", hf_path=str(parquet), caption_fields=["text"], hf_streaming=True)
    loader, full = _run(cfg, steps=6, batch_size=3)
    assert loader.skips.counts() == {"corrupt": 1}
    first = step_loader(cfg, 0, 3, 0, 2)
    head = list(first)
    rest = list(step_loader(cfg, 0, 3, 2, 6, state=json.loads(json.dumps(first.state_dict()))))
    assert [b["id"] for b in head + rest] == [b["id"] for b in full]
    shares = [
        {i for b in _run(cfg, steps=2, batch_size=2, rank=r, world_size=2)[1] for i in b["id"]}
        for r in (0, 1)
    ]
    assert not shares[0] & shares[1] and shares[0] | shares[1] == {rel for rel, *_ in GOOD}


def _path_only_dataset(datasets, root: Path, missing: bool = False):
    """GOOD[:4] saved as image files under ``root/photos`` and a dataset whose image column holds only their
    paths, relative to ``root`` (the working directory in the tests), as ``Dataset.to_parquet`` keeps them."""
    rows: dict = {"image": [], "text": []}
    for i, (rel, w, h, caption) in enumerate(GOOD[:4]):
        path = root / "photos" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        _noise(w, h, i).save(path, "JPEG" if rel.endswith(".jpg") else "PNG")
        rows["image"].append({"bytes": None, "path": f"photos/{rel}"})
        rows["text"].append(caption)
    if missing:
        rows["image"].append({"bytes": None, "path": "photos/gone.png"})
        rows["text"].append("a missing image")
    features = datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")})
    return datasets.Dataset.from_dict(rows, features=features)


def _hf_captions(steps=4, **kw) -> tuple[set, dict, str]:
    loader, batches = _run(_cfg(source="hf", caption_fields=["text"], **kw), steps=steps, batch_size=2)
    return {c for b in batches for c in b["caption"]}, loader.skips.counts(), loader.skipped_report()


def test_hf_relative_image_paths_resolve_against_the_working_directory_in_every_form(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "pq").mkdir()
    gone = tmp_path / "photos" / "gone.png"
    gone.parent.mkdir()
    gone.write_bytes(b"")  # to_parquet reads the size of every file it names; deleted once written
    _path_only_dataset(datasets, tmp_path, missing=True).to_parquet(str(tmp_path / "pq" / "train.parquet"))
    gone.unlink()
    forms = [
        {"hf_path": "pq"},  # the folder: paths were resolved against it, so every image was "missing"
        {"hf_path": "pq/train.parquet"},
        {"hf_path": "pq/*.parquet"},
        {"hf_path": "pq", "hf_streaming": True},
    ]
    for form in forms:
        captions, skips, report = _hf_captions(**form)
        assert captions == {cap for *_, cap in GOOD[:4]}, form
        assert skips == {"missing": 1}, form
        # the skip names the absolute path looked for, i.e. what the relative one was resolved against
        assert f"{tmp_path / 'photos' / 'gone.png'} does not exist" in report, form


def test_hf_path_may_be_a_save_to_disk_folder_of_a_dataset_or_of_splits(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.chdir(tmp_path)
    ds = _path_only_dataset(datasets, tmp_path)
    ds.save_to_disk(str(tmp_path / "saved"))
    splits = datasets.DatasetDict({"train": ds.select(range(2)), "val": ds.select(range(2, 4))})
    splits.save_to_disk(str(tmp_path / "saved-splits"))
    everything = {cap for *_, cap in GOOD[:4]}
    for streaming in (False, True):
        assert _hf_captions(hf_path="saved", hf_streaming=streaming)[:2] == (everything, {})
        val = _hf_captions(hf_path="saved-splits", hf_split="val", hf_streaming=streaming)
        assert val[:2] == ({cap for *_, cap in GOOD[2:4]}, {})
    with pytest.raises(ConfigError, match=r"data.hf_split='test' is not a split .*\(allowed: train, val\)$"):
        _hf_captions(hf_path="saved-splits", hf_split="test")
    with pytest.raises(ConfigError, match=r"data.hf_name='x' does not apply .*\(allowed: empty\)$"):
        _hf_captions(hf_path="saved", hf_name="x")
