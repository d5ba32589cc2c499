"""A latent cache at scale (h-scale audit, findings 1, 2 and 7): check_latents reads the small meta.json, the
reader keeps its per-sample tables packed, the index is written compact from the shard records, and open shard
files are kept in an LRU sized under the open-file limit."""

from __future__ import annotations

import json
import resource

import numpy as np
import pytest
import torch

import fusedit.data.latents as latents
from fusedit.config import ConfigError, DataConfig, VAEConfig
from fusedit.data.latents import LatentDataset, cache_latents, check_latents
from fusedit.data.loader import step_loader
from fusedit.data.packed import PackedStrings


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """12 shapes samples at 16 px, one per shard (12 shard files)."""
    out = tmp_path_factory.mktemp("scale") / "cache"
    data = DataConfig(source="shapes", image_size=16, num_samples=12)
    cache_latents(data, VAEConfig(), out, 4, 1, "cpu", progress=False)
    return out


def _latents(out, **kw) -> DataConfig:
    return DataConfig(**{"source": "latents", "latents_dir": str(out), "image_size": 16, **kw})


def test_check_latents_reads_meta_json_and_falls_back_to_the_index_without_it(cache, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(cache, copy)
    # A 10M-sample index is ~3 GB of JSON: checking the VAE and size must not parse it.
    (copy / "index.json").write_text("{")

    def accepts_its_size_only():
        check_latents(_latents(copy), VAEConfig())
        with pytest.raises(ConfigError) as error:
            check_latents(_latents(copy, image_size=32), VAEConfig())
        assert (
            str(error.value) == f"data.latents_dir={str(copy)!r} holds 16 px images, but data.image_size=32"
        )

    accepts_its_size_only()
    # A cache copied without its meta.json: the index's record, with the same checks.
    shutil.copy(cache / "index.json", copy / "index.json")
    (copy / "meta.json").unlink()
    accepts_its_size_only()
    # An unfinished cache (meta.json, no index yet) is refused as before.
    shutil.copy(cache / "meta.json", copy / "meta.json")
    (copy / "index.json").unlink()
    with pytest.raises(ConfigError, match=r"has no index.json: write it with `fusedit cache-latents CONFIG"):
        check_latents(_latents(copy), VAEConfig())


def test_the_reader_keeps_every_per_sample_table_packed(cache):
    dataset = LatentDataset(cache)
    per_sample = {k: type(v) for k, v in vars(dataset).items() if hasattr(v, "__len__") and len(v) == 12}
    # Lists of str or dicts would be copied page by page into every forked DataLoader worker.
    assert per_sample == {
        "ids": PackedStrings,
        "captions": PackedStrings,
        "positions": np.ndarray,
        "shard_of": np.ndarray,
        "group_of": np.ndarray,
        "shards": PackedStrings,  # one shard per sample here
    }
    assert list(dataset.ids) == [str(i) for i in range(12)] and dataset.groups()[0] is None


def test_the_index_is_compact_and_an_old_indented_one_still_reads(cache, tmp_path):
    text = (cache / "index.json").read_text()
    assert "\n" not in text and text.startswith('{"meta":{"format":2,')
    index = json.loads(text)
    assert index["num_samples"] == 12 and len(index["shards"]) == 12
    assert index["samples"]["5"] == {
        "shard": "latents-000005.safetensors",
        "key": "5",
        "caption": index["samples"]["5"]["captions"][0],
        "captions": index["samples"]["5"]["captions"],
        "shape": [3, 16, 16],
        "position": 5,
    }
    new = LatentDataset(cache)
    expected = [new.load(i, epoch=1, group=-1) for i in range(12)]
    # As earlier fusedits wrote it (indent=1), its samples out of position order, without "caption".
    import shutil

    old = tmp_path / "old"
    shutil.copytree(cache, old)
    shutil.rmtree(old / "index")  # made before the index's columns
    samples = list(index["samples"].items())[::-1]
    for _, entry in samples:
        del entry["caption"]
    (old / "index.json").write_text(json.dumps({**index, "samples": dict(samples)}, indent=1))
    dataset = LatentDataset(old)
    for i, want in enumerate(expected):
        got = dataset.load(i, epoch=1, group=-1)
        assert torch.equal(got.pop("latent"), want["latent"])
        assert got == {k: v for k, v in want.items() if k != "latent"}


@pytest.mark.parametrize(
    "shards, keys",
    [
        ([["a", "b"], ["a", "c"]], ["a", "b", "a@2", "c"]),
        # A given id equal to a repeat's new name: renamed in turn, as the index held every sample before.
        ([["x"], ["x"], ["x@1"]], ["x", "x@1", "x@1@2"]),
    ],
)
def test_a_repeated_id_is_keyed_by_its_position_in_the_streamed_index(tmp_path, shards, keys):
    # An id column of a streamed table may repeat: the later sample must not replace the earlier one.
    out = tmp_path / "cache"
    out.mkdir()
    tally = latents._Tally()
    start = 0
    for j, ids in enumerate(shards):
        shard = {
            "shard": j,
            "start": start,
            "end": start + len(ids),
            "samples": [
                {"id": i, "captions": [f"c{i}"], "key": str(p), "position": p, "shape": [3, 2, 2]}
                for p, i in enumerate(ids, start)
            ],
            "skipped": [],
        }
        start += len(ids)
        (out / f"latents-00000{j}.safetensors").write_bytes(b"")
        (out / f"latents-00000{j}.json").write_text(json.dumps(shard))
        tally.add(shard)
    summary = latents._write_index(out, {"format": 2}, tally)
    index = json.loads((out / "index.json").read_text())
    assert list(index["samples"]) == keys and index["num_samples"] == summary["samples"] == len(keys)
    assert [index["samples"][k]["position"] for k in keys] == list(range(len(keys)))


def test_open_shards_are_an_lru_sized_under_the_open_file_limit(cache, monkeypatch):
    opened = []

    def counting_open(path, framework):
        opened.append(path.rsplit("-", 1)[1])
        return real_open(path, framework=framework)

    real_open = latents.safe_open
    monkeypatch.setattr(latents, "safe_open", counting_open)
    dataset = LatentDataset(cache)
    # Shard 0 read between every other: the least recently read goes, never the most read (FIFO reopened it).
    for i in [0, 1, 0, 2, 0, 3, 0, 4, 0, 5, 0, 6, 0, 7, 0, 8, 0, 9, 0, 10]:
        dataset.load(i, epoch=0, group=-1)
    assert opened == [f"{i:06d}.safetensors" for i in range(11)]
    dataset._cap = 2
    dataset.load(11, epoch=0, group=-1)  # over the cap: all but the two most recent closed
    assert list(dataset._handles) == [10, 11]
    assert dataset.load(3, epoch=0, group=-1)["index"] == 3  # evicted shard: opened again

    monkeypatch.setattr(resource, "getrlimit", lambda kind: (100, 4096))
    assert latents._open_files_cap() == 25
    monkeypatch.setattr(resource, "getrlimit", lambda kind: (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    assert latents._open_files_cap() == 256


def test_forked_workers_read_the_same_batches(cache):
    """Each DataLoader worker opens its own shard files (none shared across the fork)."""

    def batches(workers):
        loader = step_loader(_latents(cache, num_workers=workers), 0, 4, 0, 6)
        return [(b["id"], b["latent"]) for b in loader]

    alone, workers = batches(0), batches(2)
    assert [ids for ids, _ in alone] == [ids for ids, _ in workers]
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(alone, workers))


def test_a_shard_removed_before_the_index_is_written_is_named(tmp_path):
    out = tmp_path / "cache"
    out.mkdir()
    tally = latents._Tally()
    tally.add({"shard": 0, "start": 0, "end": 0, "samples": [], "skipped": []})
    with pytest.raises(ConfigError, match=r"latents-000000.safetensors' or its record was removed while"):
        latents._write_index(out, {"format": 2}, tally)
