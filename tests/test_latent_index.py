"""The latent cache's index as columns (index/: .npy arrays a reader maps instead of parsing index.json) and
StepPlan's int32 epoch orders: the same samples, groups and batches as before, in less memory."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import fusedit.data.latents as latents
import fusedit.data.plan as plan
from fusedit.config import ConfigError, DataConfig, VAEConfig
from fusedit.data.latents import LatentDataset, cache_latents, check_latents
from fusedit.data.plan import StepPlan
from fusedit.data.transforms import make_rng

# Three aspect ratios under buckets, a non-ASCII name and caption, and a corrupt file (a skip).
SIZES = {"a.png": (32, 32), "b.png": (48, 32), "c.png": (32, 48), "d.png": (40, 40), "é.png": (64, 40)}
SIZES |= {"f.png": (36, 54), "g.png": (30, 30)}


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    """A bucketed folder cache of 7 samples in shards of 3, one corrupt file skipped."""
    root = tmp_path_factory.mktemp("latidx") / "images"
    root.mkdir()
    for k, (name, (w, h)) in enumerate(SIZES.items()):
        pixels = np.random.default_rng(k).integers(0, 256, (h, w, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / name)
        (root / name).with_suffix(".txt").write_text(f"caption {k} ☕ « {name} »")
    (root / "bad.png").write_bytes(b"not an image")
    (root / "bad.txt").write_text("corrupt")
    out = root.parent / "cache"
    data = _data(root)
    summary = cache_latents(data, VAEConfig(), out, 2, 3, "cpu", progress=False)
    assert summary["samples"] == 7 and summary["skipped"] == {"corrupt": 1}
    return out


def _data(root: Path) -> DataConfig:
    buckets = [[16, 16], [16, 24], [24, 16]]
    return DataConfig(source="folder", root=str(root), image_size=16, min_image_size=16, buckets=buckets)


def _without_columns(cache: Path, to: Path) -> Path:
    """A copy of ``cache`` as a fusedit before the columns wrote it: index.json alone."""
    shutil.copytree(cache, to)
    shutil.rmtree(to / "index")
    return to


def _mapped(array: np.ndarray) -> bool:
    while array is not None and not isinstance(array, np.memmap):
        array = array.base
    return array is not None


def _tables(dataset: LatentDataset) -> dict:
    groups, names = dataset.groups()
    return {
        "ids": list(dataset.ids),
        "captions": list(dataset.captions),
        "positions": (dataset.positions.dtype, dataset.positions.tolist()),
        "shard_of": (dataset.shard_of.dtype, dataset.shard_of.tolist()),
        "group_of": (dataset.group_of.dtype, dataset.group_of.tolist()),
        "shards": list(dataset.shards),
        "shapes": dataset.shapes,
        "groups": (None if groups is None else (groups.dtype, groups.tolist()), names),
        "meta": dataset.meta,
        "report": dataset.skipped_report(),
    }


def test_the_columns_read_as_index_json_does_without_parsing_it(cache, tmp_path, monkeypatch):
    old = LatentDataset(_without_columns(cache, tmp_path / "old"))

    def no_parse(latents_dir):
        raise AssertionError("index.json parsed")

    monkeypatch.setattr(latents, "read_index", no_parse)
    new = LatentDataset(cache)
    assert _tables(new) == _tables(old)
    assert new.groups()[1] == ["latents 3x16x16", "latents 3x16x24", "latents 3x24x16"]
    assert new.ids[6] == "é.png" and json.loads(new.captions[6]) == ["caption 4 ☕ « é.png »"]
    # Mapped from the files, not copied: the ranks of a machine share them in the page cache.
    assert all(_mapped(a) for a in (new.positions, new.shard_of, new.ids._data, new.captions._ends))
    for i in range(len(new)):
        for epoch in (0, 3):
            got, want = new.load(i, epoch, -1), old.load(i, epoch, -1)
            latent = got.pop("latent")
            assert latent.dtype == want["latent"].dtype and torch.equal(latent, want.pop("latent"))
            assert got == want


def test_a_spawned_worker_maps_the_columns_again_rather_than_unpickle_a_copy(cache, tmp_path):
    dataset = LatentDataset(cache)
    data = pickle.dumps(dataset)
    # The tables are left out of the pickle (no caption, no id is in it), and mapped again when it loads.
    assert b"caption 0" not in data and "é.png".encode() not in data
    worker = pickle.loads(data)
    assert all(
        _mapped(a) for a in (worker.positions, worker.shard_of, worker.ids._data, worker.captions._ends)
    )
    assert _tables(worker) == _tables(dataset)
    assert torch.equal(worker.load(4, 0, -1)["latent"], dataset.load(4, 0, -1)["latent"])
    # Columns written anew in between (a cache started over under the run) are refused, not mixed in.
    copy = LatentDataset(shutil.copytree(cache, tmp_path / "copy"))
    data = pickle.dumps(copy)
    head = tmp_path / "copy" / "index" / "head.json"
    head.write_text(head.read_text())
    with pytest.raises(ConfigError, match="was written anew while training read it"):
        pickle.loads(data)


def test_the_columns_hold_what_index_json_does_for_repeated_ids_and_empty_shards(tmp_path):
    out = tmp_path / "cache"
    out.mkdir()
    tally = latents._Tally()
    shards = [
        ["x", "y"],
        [],
        ["x"],
        ["x@1"],
    ]  # a repeat, a given id equal to its new name, a shard all skipped
    start = 0
    for j, ids in enumerate(shards):
        samples = [
            {"id": i, "captions": [f"c{p}", f"second {p}"], "key": str(p), "position": p, "shape": [4, 2, 2]}
            for p, i in enumerate(ids, start)
        ]
        shard = {"shard": j, "start": start, "end": start + max(1, len(ids)), "samples": samples}
        shard["skipped"] = [] if ids else [["corrupt", "z", "bad"]]
        start = shard["end"]
        (out / f"latents-00000{j}.safetensors").write_bytes(b"")
        (out / f"latents-00000{j}.json").write_text(json.dumps(shard))
        tally.add(shard)
    latents._write_index(out, {"format": 2}, tally)
    keys = ["x", "y", "x@3", "x@1"]
    assert list(json.loads((out / "index.json").read_text())["samples"]) == keys
    new = LatentDataset(out)
    assert list(new.ids) == keys and list(new.positions) == [0, 1, 3, 4]
    assert list(new.shards) == [
        "latents-000000.safetensors",
        "latents-000002.safetensors",
        "latents-000003.safetensors",
    ]
    assert (
        new.captions[3] == '["c4", "second 4"]'
        and new.skipped_report() == latents.SkipCounter.of([("corrupt", "z", "bad")]).report()
    )
    assert _tables(new) == _tables(LatentDataset(_without_columns(out, tmp_path / "old")))


def test_columns_left_beside_an_index_json_written_without_them_are_not_read(cache, tmp_path, caplog):
    # A rerun by a fusedit before the columns rewrites index.json and leaves index/ as it was.
    copy = tmp_path / "copy"
    shutil.copytree(cache, copy)
    index = json.loads((copy / "index.json").read_text())
    index["samples"].pop("é.png")  # the data changed since: one sample fewer
    (copy / "index.json").write_text(json.dumps(index, indent=1))
    with caplog.at_level("WARNING", logger="fusedit.data.latents"):
        dataset = LatentDataset(copy)
    assert len(dataset) == 6 and "é.png" not in dataset.ids
    size = (copy / "index.json").stat().st_size
    columns = json.loads((copy / "index" / "head.json").read_text())["index_bytes"]
    assert caplog.messages == [
        f"{str(copy / 'index')!r} was written with another index.json (of {columns} bytes, not {size}): reading "
        "index.json instead, which takes longer and ~1.5 GB per 1M samples; a rerun of `fusedit cache-latents "
        f"CONFIG --out {copy}` writes both anew"
    ]


def test_a_damaged_column_is_named_with_the_remedy(cache, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(cache, copy)
    column = copy / "index" / "positions.npy"
    column.write_bytes(column.read_bytes()[:-8])  # cut short
    with pytest.raises(ConfigError) as error:
        LatentDataset(copy)
    remedy = f"a damaged copy? copy the cache again, or rerun `fusedit cache-latents CONFIG --out {copy}`"
    assert str(error.value) == (
        f"{str(column)!r} is not a readable column of a latent index (mmap length is greater than file size; "
        f"{remedy})"
    )
    np.save(column, np.arange(6))  # whole, but not of the index's 7 samples
    with pytest.raises(ConfigError) as error:
        LatentDataset(copy)
    assert str(error.value) == (
        f"{str(column)!r} is not a readable column of a latent index (int64 of shape (6,), not int64 of shape "
        f"(7,); {remedy})"
    )


def test_a_cache_without_columns_gains_them_by_a_rerun_and_a_failed_rerun_leaves_none_stale(
    cache, tmp_path, monkeypatch
):
    old = _without_columns(cache, tmp_path / "old")
    root = cache.parent / "images"
    summary = cache_latents(
        _data(root), VAEConfig(), old, 2, 3, "cpu", progress=False
    )  # nothing encoded again
    assert summary["samples"] == 7 and (old / "index" / "head.json").is_file()
    assert _tables(LatentDataset(old)) == _tables(LatentDataset(cache))
    check_latents(DataConfig(source="latents", latents_dir=str(old)), VAEConfig())

    # A rerun that encodes nothing leaves the index as it is (no 2.8 GB of JSON per 10M samples written again,
    # no columns replaced under another node's map).
    stamps = {
        f.name: (f.stat().st_ino, f.stat().st_mtime_ns)
        for f in [old / "index.json", *(old / "index").iterdir()]
    }

    def no_vae(*args, **kwargs):
        raise AssertionError("nothing was to be encoded")

    monkeypatch.setattr("fusedit.vae.load_autoencoder", no_vae)
    assert cache_latents(_data(root), VAEConfig(), old, 2, 3, "cpu", progress=False) == summary
    assert {
        f.name: (f.stat().st_ino, f.stat().st_mtime_ns)
        for f in [old / "index.json", *(old / "index").iterdir()]
    } == stamps

    def killed(path, write, durable=False):
        raise OSError("disk full")

    # Killed while writing index.json anew (its columns' head says another index, so it is written): the
    # columns of the index.json before are gone with it, never left beside another one, and no partial
    # folder stays.
    head = json.loads((old / "index" / "head.json").read_text())
    (old / "index" / "head.json").write_text(json.dumps({**head, "report": "another"}))
    monkeypatch.setattr(latents, "write_atomic", killed)
    with pytest.raises(OSError, match="disk full"):
        cache_latents(_data(root), VAEConfig(), old, 2, 3, "cpu", progress=False)
    assert sorted(p.name for p in old.iterdir() if "index" in p.name) == ["index.json"]
    monkeypatch.undo()
    assert _tables(LatentDataset(old)) == _tables(LatentDataset(cache))


@pytest.mark.parametrize("dtype", ["<i8", "|u1", "<i4"])
def test_a_column_writes_each_value_once_into_the_file_np_save_writes(tmp_path, monkeypatch, dtype):
    # The values went to a raw file, then were copied behind the header (~1.3 GB more written at 10M).
    def copied(*args):
        raise AssertionError("the values were written twice")

    monkeypatch.setattr(latents.shutil, "copyfileobj", copied)
    # Lengths whose digits differ (0, 9 and 10, ...): numpy's header keeps its size for each.
    for n in (0, 9, 10, 1000, 123_457):
        folder = tmp_path / str(n)
        folder.mkdir()
        values = np.arange(n) % 251
        column = latents._Column(folder / "c.npy", dtype)
        for piece in np.array_split(values, 3):
            column.write(piece)
        assert [p.name for p in folder.iterdir()] == ["c.npy"]  # nothing beside it to copy from
        column.finish()
        np.save(tmp_path / "saved.npy", values.astype(dtype))
        assert (folder / "c.npy").read_bytes() == (tmp_path / "saved.npy").read_bytes()


def test_a_caches_columns_are_np_save_s_files(cache, tmp_path):
    paths = sorted((cache / "index").glob("*.npy"))
    assert sorted(p.stem for p in paths) == sorted(latents._IndexColumns.ARRAYS)
    for path in paths:
        np.save(tmp_path / "saved.npy", np.load(path))
        assert path.read_bytes() == (tmp_path / "saved.npy").read_bytes(), path.name


# --------------------------------------------------------------------------------------------------
# StepPlan's epoch orders


class _Int64Plan(StepPlan):
    """The plan as it was built before int32 orders, for comparison."""

    def _build(self, epoch):
        if self.groups is None:
            return make_rng(self.seed, 0, epoch).permutation(self.n)
        members = np.flatnonzero(self.groups >= 0)
        order = members[make_rng(self.seed, 0, epoch).permutation(len(members))]
        lists = {g: order[self.groups[order] == g] for g in self.group_sizes}
        batches = [
            (g, c) for g, size in self.group_sizes.items() for c in range(-(-size // self.global_batch))
        ]
        return lists, [batches[i] for i in make_rng(self.seed, 6, epoch).permutation(len(batches))]


@pytest.mark.parametrize("groups", [None, [0, 2, -1, 1, 0, 0, 2, -1, 1, 1, 0, 2, 2, 0, 1, 0, 0]])
def test_epoch_orders_are_int32_and_read_the_same_samples_as_int64_ones(groups):
    n, steps = 17, 12
    new, old = (cls(n, 2, 5, rank=1, world_size=2, groups=groups) for cls in (StepPlan, _Int64Plan))
    for epoch in range(3):
        built, reference = new._build(epoch), old._build(epoch)
        if groups is None:
            assert built.dtype == np.int32 and np.array_equal(built, reference)
        else:
            assert all(built[0][g].dtype == np.int32 for g in built[0]) and built[1] == reference[1]
            assert all(np.array_equal(built[0][g], reference[0][g]) for g in reference[0])
    for step in range(steps):
        assert new.slots(step) == old.slots(step)
        for slot in new.slots(step):
            assert list(new.candidates(slot)) == list(old.candidates(slot))
    if groups is None:  # pinned: seed 5's first epoch
        assert new._build(0).tolist() == [7, 3, 12, 1, 16, 9, 11, 2, 4, 13, 10, 6, 0, 15, 5, 14, 8]
    else:
        assert new.members.dtype == np.int32 and new.groups.dtype == np.int32


def test_orders_are_int64_only_where_an_index_needs_it():
    assert plan.index_dtype(1) == plan.index_dtype(2**31) == np.int32  # indices up to 2**31 - 1
    assert plan.index_dtype(2**31 + 1) == np.int64
