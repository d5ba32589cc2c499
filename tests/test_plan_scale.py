"""Bucket planning and the HF catalog's column reads at scale: same plans, bounded memory, no row walks."""

from __future__ import annotations

import json
import threading
import weakref
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fusedit.config import DataConfig
from fusedit.data import loader
from fusedit.data.packed import PackedStrings
from fusedit.data.transforms import SampleDecoder

# (file, width, height, caption): three aspect ratios, a tiny image, an uncaptioned one, a corrupt file.
ROWS = [
    ("a.png", 48, 32, "wide"),
    ("b.png", 32, 48, "tall"),
    ("c.png", 40, 40, "square"),
    ("bad.png", 40, 40, "corrupt file"),
    ("d.png", 64, 40, "wide again"),
    ("tiny.png", 6, 6, "too small"),
    ("e.png", 32, 32, ""),
    ("f.png", 36, 54, "tall again"),
    ("g.png", 40, 44, "nearly square"),
]


def _folder(root: Path, sizes: bool, table: list = ROWS) -> DataConfig:
    """``table``'s images (and its corrupt file) in ``root``, indexed with sizes or without."""
    rows = []
    for name, w, h, caption in table:
        if name == "bad.png":
            (root / name).write_bytes(b"not an image at all")
        else:
            Image.new("RGB", (w, h), (w, h, 7)).save(root / name)
        rows.append({"path": name, "caption": caption, **({"width": w, "height": h} if sizes else {})})
    (root / "index.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return DataConfig(
        source="folder",
        root=str(root),
        index_file=str(root / "index.jsonl"),
        image_size=32,
        min_image_size=16,
        caption_fields=["caption"],
        buckets=[[32, 32], [32, 48], [48, 32]],  # (H, W): square, wide, tall
    )


def _plan(cfg: DataConfig) -> tuple[list[int], list]:
    groups, events = loader.bucket_groups(loader.build_catalog(cfg), SampleDecoder.from_config(cfg, 0))
    return groups.tolist(), [(reason, Path(i).name, detail) for reason, i, detail in events]


# The plans the code gave before planning changed (pool over every sample): kept exactly.
TINY = ("tiny", "tiny.png", "6x6 < min_image_size 16")
NO_CAPTION = ("no-caption", "e.png", "its caption field is empty")


def test_a_plan_from_known_sizes_is_unchanged(tmp_path):
    groups, events = _plan(_folder(tmp_path, sizes=True))
    assert groups == [1, 2, 0, 0, 1, -1, -1, 2, 0]  # known sizes: the corrupt file is found when read
    assert events == [TINY, NO_CAPTION]


@pytest.mark.parametrize("ahead", [None, 2], ids=["default", "window-of-2"])
def test_a_plan_from_image_headers_is_unchanged(tmp_path, monkeypatch, ahead):
    if ahead is not None:  # a window smaller than the data: reads wrap through it, order kept
        monkeypatch.setattr(loader, "_HEADER_AHEAD", ahead, raising=False)
    groups, events = _plan(_folder(tmp_path, sizes=False))
    assert groups == [1, 2, 0, -1, 1, -1, -1, 2, 0]
    corrupt = ("corrupt", "bad.png", f"cannot identify image file {str(tmp_path / 'bad.png')!r}")
    assert events == [corrupt, TINY, NO_CAPTION]


def test_known_sizes_are_planned_in_the_calling_thread(tmp_path, monkeypatch):
    # Pure Python work: a thread pool only added GIL contention and a future per sample.
    cfg = _folder(tmp_path, sizes=True)
    catalog = loader.build_catalog(cfg)
    threads = set()
    record = catalog.record

    def recording(i):
        threads.add(threading.get_ident())
        return record(i)

    monkeypatch.setattr(catalog, "record", recording)
    loader.bucket_groups(catalog, SampleDecoder.from_config(cfg, 0))
    assert threads == {threading.get_ident()}


class _Counted(ThreadPoolExecutor):
    """A pool that records the most futures alive at once (the loop's own references keep them alive)."""

    most = 0

    def submit(self, *args, **kwargs):
        future = super().submit(*args, **kwargs)
        self.alive = getattr(self, "alive", weakref.WeakSet())
        self.alive.add(future)
        _Counted.most = max(_Counted.most, len(self.alive))
        return future


class _Headers:
    """200 samples without sizes, all the same small image."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __len__(self):
        return 200

    def record(self, i):
        return {"caption": f"sample {i}"}, self.path

    def sample_id(self, i):
        return str(i)


def test_header_reads_keep_a_bounded_number_of_futures(tmp_path, monkeypatch):
    Image.new("RGB", (48, 32)).save(tmp_path / "x.png")
    monkeypatch.setattr(loader, "ThreadPoolExecutor", _Counted)
    monkeypatch.setattr(loader, "_HEADER_AHEAD", 8, raising=False)
    cfg = DataConfig(image_size=32, caption_fields=["caption"], buckets=[[32, 32], [32, 48]])  # (H, W)
    _Counted.most = 0
    groups, events = loader.bucket_groups(_Headers(tmp_path / "x.png"), SampleDecoder.from_config(cfg, 0))
    assert groups.tolist() == [1] * 200 and events == []
    # Not one future per sample (200); 9 for a moment, as a worker lets go of a future after setting it.
    assert _Counted.most <= 9


def test_a_failed_header_read_stops_the_queued_reads(tmp_path, monkeypatch):
    # A read that raises (or Ctrl+C) must not wait for every queued read to run first.
    import time

    class Failing(_Headers):
        read = 0

        def record(self, i):
            Failing.read += 1
            time.sleep(0.03)
            if i == 5:
                raise RuntimeError("disk gone")
            return super().record(i)

    Image.new("RGB", (48, 32)).save(tmp_path / "x.png")
    monkeypatch.setattr(loader, "_HEADER_AHEAD", 64, raising=False)
    cfg = DataConfig(image_size=32, caption_fields=["caption"], buckets=[[32, 32], [32, 48]])
    with pytest.raises(RuntimeError, match="disk gone"):
        loader.bucket_groups(Failing(tmp_path / "x.png"), SampleDecoder.from_config(cfg, 0))
    assert Failing.read < 48  # the 16 threads' running reads and a few more, not all 64 queued


# --------------------------------------------------------------------------------------------------
# HF map-style catalog


def _hf_catalog(tmp_path, monkeypatch, rows: dict, order=None):
    datasets = pytest.importorskip("datasets")
    from fusedit.data import hf

    ds = datasets.Dataset.from_dict(rows)
    if order is not None:  # an indices mapping, as shuffle() and select() leave
        ds = ds.shuffle(seed=3).select(order)
    monkeypatch.setattr(hf, "load_hf", lambda cfg, streaming=None: ds)
    return hf.HFCatalog(DataConfig(source="hf", hf_path=str(tmp_path), caption_fields=["text"]))


def _rows(n: int) -> dict:
    return {
        "image": [f"/img/{i}.png" for i in range(n)],
        "text": [f"caption {i}" for i in range(n)],
        "width": [32 + i for i in range(n)],
        "height": [40 + 2 * i for i in range(n)],
        "id": [f"k{i:03d}" for i in range(n)],
    }


def test_hf_catalog_reads_sizes_and_ids_in_the_indices_mappings_order(tmp_path, monkeypatch):
    catalog = _hf_catalog(tmp_path, monkeypatch, _rows(10), order=[4, 0, 7, 2])
    ids = [catalog.sample_id(i) for i in range(len(catalog))]
    rows = [int(i[1:]) for i in ids]
    assert len(catalog) == 4 and len(set(rows)) == 4
    assert isinstance(catalog._ids, PackedStrings)  # not a list of str per rank and worker
    assert catalog.sizes_known.dtype == np.int64
    assert catalog.sizes_known.tolist() == [[32 + r, 40 + 2 * r] for r in rows]
    assert [catalog.record(i)[0]["text"] for i in range(4)] == [f"caption {r}" for r in rows]


@pytest.mark.parametrize(
    "width",
    [[32, 0, 40], [32, None, 40], [32.0, 33.0, 34.0]],
    ids=["zero", "missing", "float"],
)
def test_hf_catalog_uses_sizes_only_when_every_row_has_a_positive_integer(tmp_path, monkeypatch, width):
    rows = {**_rows(3), "width": width}
    del rows["id"]
    catalog = _hf_catalog(tmp_path, monkeypatch, rows)
    assert catalog.sizes_known is None
    assert [catalog.sample_id(i) for i in range(3)] == ["0", "1", "2"]  # no id column: the row number


def test_hf_catalog_ids_of_an_integer_column_are_their_str(tmp_path, monkeypatch):
    catalog = _hf_catalog(tmp_path, monkeypatch, {**_rows(3), "id": [7, 8, 9]})
    assert [catalog.sample_id(i) for i in range(3)] == ["7", "8", "9"]
