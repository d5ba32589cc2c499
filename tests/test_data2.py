"""The data path's second round of edges (h-data2): a tar shard reads the image extensions a folder reads;
float images are scaled by a stated rule; data.max_aspect_ratio skips elongated images in every reader and
in a latent cache alike. Every test builds its own tiny data."""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fusedit.config import ConfigError, DataConfig, VAEConfig, load_config
from fusedit.data.latents import META, cache_latents
from fusedit.data.loader import step_loader
from fusedit.data.skips import skipped_jsonl
from fusedit.data.transforms import FLOAT_CLIPPED, decode_rgb, image_extensions, open_image
from test_data_edges import _cfg, _tar


def _image(width: int, height: int, fmt: str = "PNG", seed: int = 0) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, fmt)
    return buf.getvalue()


def _read(cfg: DataConfig, steps: int = 4, batch_size: int = 2):
    loader = step_loader(cfg, 0, batch_size, 0, steps)
    ids = {i for batch in loader for i in batch["id"]}
    return loader, ids


# --------------------------------------------------------------------------------------------------
# 1. A shard's image members: the extensions a folder reads


def test_a_shard_reads_jfif_and_avif_members_as_a_folder_reads_those_files(tmp_path):
    other = "avif" if "avif" in image_extensions() else "tif"  # avif where this Pillow writes it
    shard = _tar(
        tmp_path / "s.tar",
        [
            ("a.jfif", _image(32, 32, "JPEG")),
            ("a.txt", b"a jfif"),
            (f"b.{other}", _image(32, 32, other.upper().replace("TIF", "TIFF"))),
            ("b.txt", b"another"),
        ],
    )
    loader, ids = _read(_cfg(source="webdataset", shards=[str(shard)]), steps=2)
    assert ids == {f"{shard}/a", f"{shard}/b"}
    assert loader.skips.counts() == {}


# --------------------------------------------------------------------------------------------------
# 2. Float images


def _float_tiff(path: Path, values: np.ndarray) -> Path:
    Image.fromarray(values.astype(np.float32)).save(path, "TIFF")  # mode "F", a 32-bit float TIFF
    return path


def test_float_images_read_as_0_to_1_within_1_else_as_0_to_255_and_clipping_is_warned_once(
    tmp_path, caplog, monkeypatch
):
    monkeypatch.setattr(FLOAT_CLIPPED, "done", False)  # "once per process": as if none had been met yet
    unit = _float_tiff(tmp_path / "unit.tif", np.full((4, 4), 0.2))
    bytes_range = _float_tiff(tmp_path / "bytes.tif", np.full((4, 4), 200.0))
    outside = _float_tiff(tmp_path / "hdr.tif", np.array([[-5.0, 300.0], [100.0, 0.0]]))
    outside2 = _float_tiff(tmp_path / "hdr2.tif", np.array([[-1.0, 2.0]]))
    # A 0..1 ramp of 200 values with one highlight at 1.2: read as 0..1 (by its 99th percentile), the
    # highlight clipped to 255; judged by its maximum it read as 0..255, all but black.
    ramp = np.append(np.linspace(0.0, 1.0, 199), 1.2).reshape(1, 200)
    highlight = _float_tiff(tmp_path / "highlight.tif", ramp)
    with caplog.at_level(logging.WARNING, logger="fusedit.data.transforms"):
        read = {p.name: np.asarray(decode_rgb(open_image(p)))[..., 0] for p in (unit, bytes_range, outside)}
        assert read["unit.tif"].tolist() == [[51] * 4] * 4  # 0.2 of 255
        assert read["bytes.tif"].tolist() == [[200] * 4] * 4  # was 200 / 257 -> 1: nearly black
        assert read["hdr.tif"].tolist() == [[0, 255], [100, 0]]
        assert np.asarray(decode_rgb(open_image(outside2)))[..., 0].tolist() == [[0, 2]]
        lit = np.asarray(decode_rgb(open_image(highlight)))[0, :, 0]
        assert np.abs(lit[:199] - ramp[0, :199] * 255).max() <= 0.501 and lit[199] == 255  # rounded; clipped
    assert [r.getMessage() for r in caplog.records] == [
        f"data: the float image {outside} holds values -5..300, outside the 0..255 it is read as: clipped (a "
        "float image is read as 0..1 when 99% of its values stay within 1, else as 0..255; said for the first such "
        "image each data-loading process meets)"
    ]


def test_a_float_image_given_as_bytes_in_a_shard_is_named_by_its_member(tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(FLOAT_CLIPPED, "done", False)
    buf = io.BytesIO()
    Image.fromarray(np.full((16, 16), 1.5, dtype=np.float32)).save(buf, "TIFF")
    buf2 = io.BytesIO()
    Image.fromarray(np.full((16, 16), -0.5, dtype=np.float32)).save(buf2, "TIFF")
    shard = _tar(tmp_path / "f.tar", [("x.tif", buf2.getvalue()), ("x.txt", b"x")])
    with caplog.at_level(logging.WARNING, logger="fusedit.data.transforms"):
        list(step_loader(_cfg(source="webdataset", shards=[str(shard)]), 0, 1, 0, 1))
    assert [r.getMessage().split(" holds")[0] for r in caplog.records] == [f"data: the float image {shard}/x"]
    assert np.asarray(decode_rgb(open_image(buf.getvalue())))[0, 0].tolist() == [2, 2, 2]  # 1.5 of 0..255


# --------------------------------------------------------------------------------------------------
# 3. data.max_aspect_ratio


# (width, height): square, 3:1, 1:9 (a banner stood on end), 8:1 (a banner)
_SIZES = {"square": (32, 32), "wide": (96, 32), "tall": (32, 288), "banner": (256, 32)}
_DETAILS = {"tall": "32x288 is 9:1 > max_aspect_ratio 4", "banner": "256x32 is 8:1 > max_aspect_ratio 4"}


def _folder(tmp_path: Path) -> Path:
    root = tmp_path / "photos"
    root.mkdir()
    for seed, (name, (w, h)) in enumerate(_SIZES.items()):
        (root / f"{name}.png").write_bytes(_image(w, h, seed=seed))
        (root / f"{name}.txt").write_text(f"a {name} photo")
    return root


def _aspect_skips(loader) -> dict:
    return loader.skips.ids.get("aspect-ratio", {})


@pytest.mark.parametrize("limit", [None, 0.0])
def test_no_aspect_ratio_limit_keeps_every_image(tmp_path, limit):
    root = _folder(tmp_path)
    loader, ids = _read(_cfg(source="folder", root=str(root), max_aspect_ratio=limit))
    assert ids == {f"{name}.png" for name in _SIZES}
    assert loader.skips.counts() == {}


def test_a_folder_skips_and_counts_images_past_the_aspect_ratio(tmp_path):
    root = _folder(tmp_path)
    loader, ids = _read(_cfg(source="folder", root=str(root), max_aspect_ratio=4))
    assert ids == {"square.png", "wide.png"}
    assert _aspect_skips(loader) == {f"{name}.png": _DETAILS[name] for name in ("banner", "tall")}
    assert loader.skips.counts() == {"aspect-ratio": 2}
    listed = [json.loads(line) for line in skipped_jsonl(loader.state_dict()["skips"]).splitlines()]
    assert {(r["id"], r["reason"]) for r in listed} == {
        ("banner.png", "aspect-ratio"),
        ("tall.png", "aspect-ratio"),
    }
    assert loader.skipped_report().startswith("skipped 2 samples (")


@pytest.mark.parametrize("sizes", [False, True], ids=["headers", "index-sizes"])
def test_an_index_with_buckets_leaves_elongated_images_out_of_the_plan(tmp_path, sizes):
    # With buckets, planning judges every image before the first batch: from its header, or from the
    # index's width/height columns without opening it.
    root = _folder(tmp_path)
    rows = [
        {"file": f"{name}.png", "caption": name, **({"width": w, "height": h} if sizes else {})}
        for name, (w, h) in _SIZES.items()
    ]
    index = root / "index.jsonl"
    index.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = _cfg(source="folder", index_file=str(index), max_aspect_ratio=4, buckets=[[16, 16], [16, 48]])
    loader, ids = _read(cfg, steps=2, batch_size=1)
    assert ids == {"square.png", "wide.png"}
    assert _aspect_skips(loader) == {f"{name}.png": _DETAILS[name] for name in ("tall", "banner")}


def test_a_webdataset_stream_skips_and_counts_images_past_the_aspect_ratio(tmp_path):
    members = []
    for seed, (name, (w, h)) in enumerate(_SIZES.items()):
        members += [(f"{name}.png", _image(w, h, seed=seed)), (f"{name}.txt", name.encode())]
    shard = _tar(tmp_path / "a.tar", members)
    loader, ids = _read(_cfg(source="webdataset", shards=[str(shard)], max_aspect_ratio=4), steps=2)
    assert ids == {f"{shard}/square", f"{shard}/wide"}
    assert _aspect_skips(loader) == {f"{shard}/{name}": _DETAILS[name] for name in ("tall", "banner")}


@pytest.mark.parametrize("streaming", [False, True], ids=["map-style", "stream"])
def test_an_hf_dataset_skips_and_counts_images_past_the_aspect_ratio(tmp_path, monkeypatch, streaming):
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    rows = {"image": [], "text": []}
    for seed, (name, (w, h)) in enumerate(_SIZES.items()):
        rows["image"].append({"bytes": _image(w, h, seed=seed), "path": None})
        rows["text"].append(name)
    features = datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")})
    path = tmp_path / "train.parquet"
    datasets.Dataset.from_dict(rows, features=features).to_parquet(str(path))
    cfg = _cfg(
        source="hf", hf_path=str(path), caption_fields=["text"], max_aspect_ratio=4, hf_streaming=streaming
    )
    loader, _ = _read(cfg, steps=2)
    assert sorted(_aspect_skips(loader).values()) == sorted(_DETAILS.values())
    assert loader.skips.counts() == {"aspect-ratio": 2}


def test_every_image_past_the_aspect_ratio_is_an_error_naming_the_setting(tmp_path):
    root = tmp_path / "banners"
    root.mkdir()
    (root / "b.png").write_bytes(_image(256, 32))
    (root / "b.txt").write_text("a banner")
    with pytest.raises(ConfigError, match=r"raise data.max_aspect_ratio \(or set it to 0, no limit\)"):
        _read(_cfg(source="folder", root=str(root), max_aspect_ratio=4), steps=1, batch_size=1)


@pytest.mark.parametrize("value", [1, 0.5, -2, float("nan")])
def test_an_aspect_ratio_limit_of_1_or_less_is_refused_at_load(value):
    with pytest.raises(ConfigError) as error:
        load_config("debug", [f"data.max_aspect_ratio={value}"])
    assert str(error.value) == (
        f"data.max_aspect_ratio={float(value)!r} is not allowed (allowed: a number > 1, e.g. 3 for 3:1, or 0 "
        "or null for no limit)"
    )


@pytest.mark.parametrize("value", ["0", "null", "2.5"])
def test_an_aspect_ratio_limit_above_1_or_off_loads(value):
    assert load_config("debug", [f"data.max_aspect_ratio={value}"]).data.max_aspect_ratio == (
        None if value == "null" else float(value)
    )


def test_a_latent_cache_skips_the_same_images_and_refuses_another_limit(tmp_path):
    root = _folder(tmp_path)
    cfg = _cfg(source="folder", root=str(root), max_aspect_ratio=4.0)
    out = tmp_path / "cache"
    summary = cache_latents(cfg, VAEConfig(), out, 2, 8, progress=False)
    assert (summary["samples"], summary["skipped"]) == (2, {"aspect-ratio": 2})
    assert json.loads((out / META).read_text())["data"]["max_aspect_ratio"] == 4.0
    with pytest.raises(ConfigError, match=r"holds latents made with data.max_aspect_ratio=4.0, not 3.0"):
        cache_latents(_cfg(source="folder", root=str(root), max_aspect_ratio=3.0), VAEConfig(), out, 2, 8)


def test_a_cache_made_before_the_limit_existed_counts_as_made_without_one(tmp_path):
    root = _folder(tmp_path)
    out = tmp_path / "cache"
    cache_latents(
        _cfg(source="folder", root=str(root), max_aspect_ratio=0), VAEConfig(), out, 2, 8, progress=False
    )
    meta = json.loads((out / META).read_text())
    assert meta["data"]["max_aspect_ratio"] is None  # 0 is recorded as no limit, as None is
    del meta["data"]["max_aspect_ratio"]  # as an earlier fusedit wrote it
    (out / META).write_text(json.dumps(meta))
    assert (
        cache_latents(_cfg(source="folder", root=str(root)), VAEConfig(), out, 2, 8, progress=False)[
            "samples"
        ]
        == 4
    )
    with pytest.raises(ConfigError, match=r"made with data.max_aspect_ratio=None, not 4.0"):
        cache_latents(_cfg(source="folder", root=str(root), max_aspect_ratio=4.0), VAEConfig(), out, 2, 8)


def test_an_image_exactly_at_the_aspect_ratio_is_kept():
    from fusedit.data.transforms import SampleDecoder, SkipSample

    decoder = SampleDecoder.from_config(_cfg(max_aspect_ratio=4), seed=0)
    decoder.check_size(128, 32)  # 4:1 at a limit of 4: kept
    decoder.check_size(32, 128)
    with pytest.raises(SkipSample) as e:
        decoder.check_size(129, 32)
    assert (e.value.reason, e.value.detail) == ("aspect-ratio", "129x32 is 4.03:1 > max_aspect_ratio 4")
