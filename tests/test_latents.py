"""Latent caches: cache_latents writes shards keyed by sample id, resumes, and LatentDataset reads them back
(identity autoencoder for exact round trips, a tiny random diffusers VAE for the real code path)."""

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
from safetensors.torch import load_file

from conftest import tiny_vae
from fusedit.config import ConfigError, DataConfig, VAEConfig
from fusedit.data.folder import FolderCatalog
from fusedit.data.latents import LatentDataset, cache_latents, check_latents
from fusedit.data.loader import step_loader
from fusedit.data.transforms import SampleDecoder
from fusedit.files import tensors_fingerprint

SIZES = [(32, 32), (48, 32), (32, 48), (40, 40), (64, 40), (36, 54), (30, 30)]


def _noise(width: int, height: int, seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.fixture
def folder(tmp_path) -> Path:
    root = tmp_path / "images"
    root.mkdir()
    for i, (w, h) in enumerate(SIZES):
        _noise(w, h, i).save(root / f"img{i}.png")
        (root / f"img{i}.txt").write_text(f"caption {i}")
    (root / "img3b.png").write_bytes(os.urandom(150))  # corrupt, sorted between img3 and img4
    (root / "img3b.txt").write_text("corrupt")
    _noise(5, 5, 0).save(root / "img5b.png")  # tiny
    (root / "img5b.txt").write_text("tiny")
    return root


def _data(root, **kw) -> DataConfig:
    return DataConfig(**{"source": "folder", "root": str(root), "image_size": 16, "min_image_size": 16, **kw})


def _tensors(out: Path) -> dict[str, dict[str, torch.Tensor]]:
    return {p.name: load_file(p) for p in sorted(out.glob("latents-*.safetensors"))}


def test_identity_cache_round_trip_and_latent_batches(tmp_path, folder):
    data = _data(folder)
    out = tmp_path / "cache"
    summary = cache_latents(data, VAEConfig(), out, batch_size=3, shard_size=4, device="cpu", progress=False)
    assert summary["samples"] == 7 and summary["shards"] == 3  # 9 files in shards of 4
    assert summary["skipped"] == {"corrupt": 1, "tiny": 1} and "img3b.png" in summary["report"]
    index = json.loads((out / "index.json").read_text())
    assert set(index["samples"]) == {f"img{i}.png" for i in range(7)}  # keyed by the stable sample id
    assert index["samples"]["img2.png"]["caption"] == "caption 2"
    assert index["samples"]["img2.png"]["shard"] == "latents-000000.safetensors"

    # identity latents are exactly the images the raw-image path produces for that sample
    catalog, decoder = FolderCatalog(str(folder)), SampleDecoder.from_config(data, 0)
    dataset = LatentDataset(out)
    assert len(dataset) == 7 and dataset.groups()[0] is None
    for i in range(len(dataset)):
        item = dataset.load(i, epoch=0, group=-1)
        position = catalog.paths.index(item["id"])
        fields, image = catalog.record(position)
        expected = decoder(fields, image, key=position)
        assert torch.equal(item["latent"], expected.image) and item["caption"] == expected.caption

    latents = _data(folder, source="latents", latents_dir=str(out))
    batches = list(step_loader(latents, 0, 4, 0, 4))
    assert all(b["latent"].shape == (4, 3, 16, 16) and "image" not in b for b in batches)
    assert {i for b in batches for i in b["id"]} == set(index["samples"])
    check_latents(latents, VAEConfig())
    with pytest.raises(ConfigError, match="holds 16 px images, but data.image_size=32"):
        check_latents(_data(folder, source="latents", latents_dir=str(out), image_size=32), VAEConfig())


def test_cache_resumes_skipping_finished_shards(tmp_path, folder, monkeypatch, caplog):
    data, out = _data(folder), tmp_path / "cache"
    with caplog.at_level("INFO", logger="fusedit.data.latents"):
        cache_latents(data, VAEConfig(), out, batch_size=2, shard_size=3, device="cpu", progress=False)
    # How many it cached, and where (h-journeyG R8); nothing about a rerun.
    assert caplog.messages == [f"cached 7 of 9 samples in 3 shards into {str(out)!r}"]
    before = _tensors(out)
    # Stamped at the epoch: a coarse filesystem clock could give a shard rewritten milliseconds later the
    # same modification time as the first write.
    for p in out.glob("latents-*"):
        os.utime(p, ns=(0, 0))
    # an interruption while shard 1 was being written: its marker json never appeared
    (out / "latents-000001.json").unlink()
    (out / "index.json").unlink()
    with caplog.at_level("INFO", logger="fusedit.data.latents"):
        cache_latents(data, VAEConfig(), out, batch_size=2, shard_size=3, device="cpu", progress=False)
    # Shard 1 (img3, img3b, img4) holds 2 usable samples (img3b is corrupt); shards 0 and 2, the other 5,
    # whose captions are as cached (h-review M4), and shard 2's tiny img5b, which is not tried again.
    assert caplog.messages[-1] == (
        f"cached 7 of 9 samples in 3 shards into {str(out)!r}: 5 already cached (captions edited since are "
        "not read again, nor is the 1 sample skipped then retried: to re-read them, delete the folder or "
        "cache into another one), 2 encoded now"
    )
    assert _tensors(out).keys() == before.keys()
    for name, tensors in _tensors(out).items():
        assert tensors.keys() == before[name].keys()
        assert all(torch.equal(t, before[name][k]) for k, t in tensors.items())
    rewritten = {p.name for p in out.glob("latents-*") if p.stat().st_mtime_ns != 0}
    assert rewritten == {"latents-000001.safetensors", "latents-000001.json"}

    # a finished cache reruns without even loading the autoencoder
    import fusedit.vae

    monkeypatch.setattr(fusedit.vae, "load_autoencoder", lambda *a, **k: pytest.fail("encoded again"))
    caplog.clear()
    with caplog.at_level("INFO", logger="fusedit.data.latents"):
        summary = cache_latents(
            data, VAEConfig(), out, batch_size=2, shard_size=3, device="cpu", progress=False
        )
    assert summary["samples"] == 7
    # The rerun said what the first run said, as if it had encoded everything again (h-docs R7), and not
    # that a caption edited since is not read again (h-journeyG R7).
    assert caplog.messages == [
        f"cached 7 of 9 samples in 3 shards into {str(out)!r}: all already cached, none encoded now (captions "
        "edited since are not read again, nor are the 2 samples skipped then retried: to re-read them, delete "
        "the folder or cache into another one)"
    ]

    with pytest.raises(ConfigError, match="holds latents made with data.crop='center', not 'random'"):
        cache_latents(_data(folder, crop="random"), VAEConfig(), out, 2, 3, "cpu", progress=False)
    (folder / "img0a.png").write_bytes((folder / "img0.png").read_bytes())  # the folder gained a file
    with pytest.raises(ConfigError, match="the dataset changed"):
        cache_latents(data, VAEConfig(), out, batch_size=2, shard_size=3, device="cpu", progress=False)


def test_a_resumed_cache_starts_its_bar_at_the_kept_samples(tmp_path, folder, monkeypatch):
    """h-journeyG M5: the kept shards were counted as progress (bar.update), so the rate and time left of a
    resumed cache were many times too fast; tqdm rates only what passes after its ``initial``."""
    import fusedit.data.latents as latents

    bars = []

    class Bar:
        def __init__(self, total=None, initial=0, **kwargs):
            self.total, self.initial, self.n = total, initial, initial
            bars.append(self)

        def update(self, n=1):
            self.n += n

        def close(self):
            pass

    monkeypatch.setattr(latents, "tqdm", Bar)
    data, out = _data(folder), tmp_path / "cache"
    cache_latents(data, VAEConfig(), out, batch_size=2, shard_size=3, device="cpu", progress=False)
    assert [(b.total, b.initial, b.n) for b in bars] == [(9, 0, 9)]
    # Interrupted during the last shard (positions 6..8): the first two are kept.
    (out / "latents-000002.json").unlink()
    bars.clear()
    cache_latents(data, VAEConfig(), out, batch_size=2, shard_size=3, device="cpu", progress=False)
    assert [(b.total, b.initial, b.n) for b in bars] == [(9, 6, 9)]
    # Nothing to encode: no bar (the line after says all was cached).
    bars.clear()
    cache_latents(data, VAEConfig(), out, batch_size=2, shard_size=3, device="cpu", progress=False)
    assert bars == []


def test_a_shard_that_fails_closes_the_bar_and_raises_its_error(tmp_path, folder, monkeypatch):
    """h-std F8: the bar was closed only after the last shard, so a shard that raised (here the disk, at the
    second shard's write) left it open on the terminal; the error itself still reaches the caller."""
    import fusedit.data.latents as latents

    bars, writes = [], []

    class Bar:
        def __init__(self, total=None, initial=0, **kwargs):
            self.n, self.closed = initial, False
            bars.append(self)

        def update(self, n=1):
            self.n += n

        def close(self):
            self.closed = True

    def save_file(tensors, path, metadata=None):
        writes.append(metadata["shard"])
        if metadata["shard"] == "1":
            raise OSError("No space left on device")
        real_save_file(tensors, path, metadata=metadata)

    real_save_file = latents.save_file
    monkeypatch.setattr(latents, "tqdm", Bar)
    monkeypatch.setattr(latents, "save_file", save_file)
    with pytest.raises(OSError, match="^No space left on device$"):
        cache_latents(_data(folder), VAEConfig(), tmp_path / "cache", 2, 3, device="cpu", progress=False)
    assert writes == ["0", "1"]
    assert [(b.n, b.closed) for b in bars] == [(6, True)]


def test_a_rerun_encodes_what_the_folder_gained_after_the_cached_samples(tmp_path, folder):
    data, out = _data(folder), tmp_path / "cache"
    # 9 files (7 usable) in shards of 4: the last shard, [8, 9), is short.
    assert cache_latents(data, VAEConfig(), out, 2, 4, "cpu", progress=False)["samples"] == 7
    _noise(32, 32, 9).save(folder / "img9.png")  # sorted after every cached file
    (folder / "img9.txt").write_text("caption 9")
    assert cache_latents(data, VAEConfig(), out, 2, 4, "cpu", progress=False)["samples"] == 8
    assert "img9.png" in LatentDataset(out).ids


def test_diffusers_vae_cache_is_deterministic_and_resumable(tmp_path, folder):
    tiny_vae().save_pretrained(tmp_path / "vae")
    vae = VAEConfig(kind="diffusers", model_id=str(tmp_path / "vae"), latent_channels=4, downsample=2)
    data = _data(folder)
    a, b = tmp_path / "a", tmp_path / "b"
    cache_latents(data, vae, a, batch_size=4, shard_size=5, device="cpu", progress=False, seed=3)
    # The VAE noise is seeded per sample by (seed, shard, position): the batch size (and so a sample's
    # neighbours) of the encoding does not matter, nor does the global generator, and a redone shard is
    # the one it replaces.
    cache_latents(data, vae, b, batch_size=3, shard_size=5, device="cpu", progress=False, seed=3)
    (b / "latents-000000.json").unlink()
    torch.manual_seed(1234)
    cache_latents(data, vae, b, batch_size=2, shard_size=5, device="cpu", progress=False, seed=3)
    ta, tb = _tensors(a), _tensors(b)
    assert ta.keys() == tb.keys()
    for name in ta:
        assert all(torch.equal(ta[name][k], tb[name][k]) for k in ta[name])
    latents = _data(folder, source="latents", latents_dir=str(a))
    batch = next(iter(step_loader(latents, 0, 2, 0, 1)))
    assert batch["latent"].shape == (2, 4, 8, 8)
    check_latents(latents, vae)
    with pytest.raises(
        ConfigError, match="was encoded with vae.kind='diffusers', but the config has vae.kind"
    ):
        check_latents(latents, VAEConfig())


def test_webdataset_cache_with_buckets_gives_one_latent_shape_per_batch(tmp_path):
    shard_dir = tmp_path / "wds"
    shard_dir.mkdir()
    for s in range(2):
        with tarfile.open(shard_dir / f"part-{s}.tar", "w") as tar:
            for i, (w, h) in enumerate(SIZES):
                buf = io.BytesIO()
                _noise(w, h, 10 * s + i).save(buf, "JPEG")
                for ext, payload in (("jpg", buf.getvalue()), ("txt", f"shard {s} image {i}".encode())):
                    info = tarfile.TarInfo(f"{i:04d}.{ext}")
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
    data = DataConfig(
        source="webdataset",
        shards=[str(shard_dir / "part-{0..1}.tar")],
        image_size=16,
        min_image_size=16,
        buckets=[[16, 16], [16, 24], [24, 16]],
        num_workers=2,  # decode threads reading the shards concurrently
    )
    out = tmp_path / "cache"
    summary = cache_latents(data, VAEConfig(), out, batch_size=3, shard_size=8, device="cpu", progress=False)
    assert summary["samples"] == 14 and summary["shards"] == 2
    index = json.loads((out / "index.json").read_text())
    assert index["samples"][f"{shard_dir}/part-1.tar/0002"]["caption"] == "shard 1 image 2"
    shapes = {tuple(s["shape"]) for s in index["samples"].values()}
    assert shapes == {(3, 16, 16), (3, 16, 24), (3, 24, 16)}
    latents = DataConfig(source="latents", latents_dir=str(out), image_size=16)
    assert LatentDataset(out).groups()[0] is not None
    for batch in step_loader(latents, 0, 2, 0, 6, rank=1, world_size=2):
        assert batch["latent"].shape[0] == 2 and tuple(batch["latent"].shape[1:]) in shapes


def test_shapes_can_be_cached_and_missing_cache_is_a_config_error(tmp_path):
    data = DataConfig(image_size=16, max_objects=2, kinds=["single"], num_samples=6)
    summary = cache_latents(data, VAEConfig(), tmp_path / "c", batch_size=4, shard_size=4, progress=False)
    assert summary["samples"] == 6 and summary["skipped"] == {}
    nothing = tmp_path / "nothing"
    # the message names the command that writes the cache, as typed on the command line
    with pytest.raises(ConfigError) as error:
        step_loader(DataConfig(source="latents", latents_dir=str(nothing)), 0, 2, 0, 1)
    assert str(error.value).startswith(
        f"data.latents_dir={str(nothing)!r} has no index.json: write it with "
        f"`fusedit cache-latents CONFIG --out {nothing}` first"
    )
    with pytest.raises(ConfigError) as error:
        step_loader(DataConfig(source="latents"), 0, 2, 0, 1)
    assert str(error.value) == (
        "data.source=latents needs data.latents_dir (a folder written by `fusedit cache-latents`)"
    )


@pytest.mark.parametrize(
    ("sizes", "message"),
    [
        ((0, 3), "batch_size=0 is not allowed (allowed: an integer >= 1)"),
        ((2, -1), "shard_size=-1 is not allowed (allowed: an integer >= 1)"),
        # A string from a caller's own argument parsing: compared with 1, it was a TypeError ("3" < 1).
        (("3", 3), "batch_size='3' is not allowed (allowed: an integer >= 1)"),
        ((2, 2.5), "shard_size=2.5 is not allowed (allowed: an integer >= 1)"),
    ],
)
def test_cache_latents_rejects_batch_and_shard_sizes_below_one(tmp_path, sizes, message):
    with pytest.raises(ConfigError, match=f"^{re.escape(message)}$"):
        cache_latents(
            _data(tmp_path / "images"), VAEConfig(), tmp_path / "out", *sizes, "cpu", progress=False
        )
    assert not (tmp_path / "out").exists()


def test_a_folder_of_other_files_or_a_cache_too_big_for_the_disk_is_refused_before_encoding(tmp_path, folder):
    with pytest.raises(
        ValueError, match=r"already holds other files \(e.g. 'img0.png'\); writing a latent cache"
    ):
        cache_latents(_data(folder), VAEConfig(), folder, 2, 3, "cpu", progress=False)
    # The procedural source at 10^13 samples: ~120 PB of float32 latents, refused with a size that fits.
    huge = DataConfig(source="shapes", image_size=32, num_samples=10**13)
    out = tmp_path / "cache"
    with pytest.raises(
        ConfigError, match=r"caching 10,000,000,000,000 samples needs about 122.9 PB more \(12,288 bytes"
    ):
        cache_latents(huge, VAEConfig(), out, 2, 3, "cpu", progress=False)
    assert not out.exists()
    with pytest.raises(
        ConfigError, match=r"fits: data.num_samples=\d+, --dtype bfloat16 \(half the bytes\), more"
    ):
        cache_latents(huge, VAEConfig(), out, 2, 3, "cpu", progress=False)
    # A folder whose meta.json is not a cache's is another folder of files, not an earlier cache.
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "meta.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match=r"already holds other files \(e.g. 'meta.json'\)"):
        cache_latents(_data(folder), VAEConfig(), tmp_path / "other", 2, 3, "cpu", progress=False)


def test_the_disk_check_gives_readable_sizes_and_names_a_read_only_disk(tmp_path, monkeypatch):
    """Megabytes below 1 GB (not "0.0 GB more ... 0.0 GB free"), and a read-only mount, which reports its
    free space all the same, is called read-only rather than short of space."""
    import shutil
    from types import SimpleNamespace

    from fusedit.files import readable_size

    assert [readable_size(n) for n in (512, 1000, 29_491_200, 1.5e9, 2e12)] == [
        "512 bytes",
        "1.0 kB",
        "29.5 MB",
        "1.5 GB",
        "2.0 TB",
    ]
    data, out = DataConfig(source="shapes", image_size=32, num_samples=2400), tmp_path / "cache"
    monkeypatch.setattr(shutil, "disk_usage", lambda where: SimpleNamespace(free=10_500_000))
    with pytest.raises(ConfigError) as e:
        cache_latents(data, VAEConfig(), out, 2, 3, "cpu", progress=False)
    assert str(e.value) == (
        f"caching 2,400 samples needs about 29.5 MB more (12,288 bytes of float32 latents each) but "
        f"{str(tmp_path)!r} has 10.5 MB free (allowed: a cache that fits: data.num_samples=854, --dtype "
        "bfloat16 (half the bytes), more free disk space, another disk)"
    )
    monkeypatch.setattr(os, "statvfs", lambda where: SimpleNamespace(f_flag=os.ST_RDONLY))
    with pytest.raises(ConfigError) as e:
        cache_latents(data, VAEConfig(), out, 2, 3, "cpu", progress=False)
    assert str(e.value) == (
        f"{str(tmp_path)!r} is on a read-only file system, so the cache cannot be written into {str(out)!r} "
        "(allowed: an --out on a writable disk)"
    )
    assert not out.exists()


def test_a_rerun_refuses_files_changed_inside_a_shard_naming_them(tmp_path, folder):
    data, out = _data(folder), tmp_path / "cache"
    # 9 files in shards of 3: img0 img1 img2 | img3 img3b img4 | img5 img5b img6
    cache_latents(data, VAEConfig(), out, 2, 3, "cpu", progress=False)
    # One file removed, another added in the same shard: the same count, first and last file.
    (folder / "img0b.png").write_bytes((folder / "img0.png").read_bytes())
    (folder / "img0b.txt").write_text("added")
    (folder / "img1.png").unlink()
    with pytest.raises(ConfigError) as error:
        cache_latents(data, VAEConfig(), out, 2, 3, "cpu", progress=False)
    assert str(error.value) == (
        f"{str(out)!r}: the dataset changed since shard 0 (positions 0..2) was cached: 'img1.png' is gone "
        "and 'img0b.png' is new; use another folder (allowed: only samples added after the last cached one)"
    )
    (folder / "img1.png").write_bytes((folder / "img0b.png").read_bytes())
    (folder / "img0b.png").unlink()
    (folder / "img6.png").unlink()  # the last file, so the last shard's positions run past the end
    with pytest.raises(
        ConfigError, match=r"since shard 2 \(positions 6..8\) was cached: 'img6.png' is gone;"
    ):
        cache_latents(data, VAEConfig(), out, 2, 3, "cpu", progress=False)


def test_a_rerun_after_an_insertion_or_a_removal_says_which_samples_moved(tmp_path, folder):
    """An image inserted before the last cached one moves the later ones along: the refusal said that one
    of them "is gone" when it was still there, one position on."""
    data, out = _data(folder), tmp_path / "cache"
    # 9 files in shards of 3: img0 img1 img2 | img3 img3b img4 | img5 img5b img6
    cache_latents(data, VAEConfig(), out, 2, 3, "cpu", progress=False)
    (folder / "img2a.png").write_bytes((folder / "img0.png").read_bytes())
    (folder / "img2a.txt").write_text("inserted")
    with pytest.raises(ConfigError) as error:
        cache_latents(data, VAEConfig(), out, 2, 3, "cpu", progress=False)
    assert str(error.value) == (
        f"{str(out)!r}: the dataset changed since shard 1 (positions 3..5) was cached: 'img2a.png' was added "
        "at position 3, before the last cached sample: the samples after it moved ('img4.png' is now at "
        "position 6); use another folder (allowed: only samples added after the last cached one)"
    )
    (folder / "img2a.png").unlink()
    (folder / "img1.png").unlink()
    with pytest.raises(ConfigError) as error:
        cache_latents(data, VAEConfig(), out, 2, 3, "cpu", progress=False)
    assert (
        "was cached: 'img1.png' is gone: the samples after it moved ('img3.png' is now at position 2); use"
        in (str(error.value))
    )


def test_a_rerun_refuses_an_index_whose_rows_changed_order(tmp_path, folder):
    index = tmp_path / "index.jsonl"
    rows = [{"file": f"img{i}.png", "caption": f"c{i}"} for i in range(3)]
    index.write_text("".join(json.dumps(r) + "\n" for r in rows))
    data, out = _data(folder, index_file=str(index), caption_fields=["caption"]), tmp_path / "cache"
    cache_latents(data, VAEConfig(), out, 2, 3, "cpu", progress=False)
    index.write_text("".join(json.dumps(r) + "\n" for r in [rows[1], rows[0], rows[2]]))
    with pytest.raises(ConfigError, match=r"was cached: 'img0.png', at position 0 then, is now at 1; use"):
        cache_latents(data, VAEConfig(), out, 2, 3, "cpu", progress=False)


def test_latent_shards_are_readable_by_everyone(tmp_path, folder):
    out = tmp_path / "cache"
    cache_latents(_data(folder), VAEConfig(), out, 2, 4, "cpu", progress=False)
    shards = sorted(out.glob("latents-*.safetensors"))
    assert shards and all(p.stat().st_mode & 0o444 == 0o444 for p in shards)


def _vae(place, **kw) -> VAEConfig:
    return VAEConfig(kind="diffusers", model_id=str(place), latent_channels=4, downsample=2, **kw)


def test_a_moved_vae_folder_is_the_same_vae_and_another_at_the_same_path_is_refused(tmp_path, folder, caplog):
    tiny_vae().save_pretrained(tmp_path / "vae")
    data, out = _data(folder), tmp_path / "cache"
    cache_latents(data, _vae(tmp_path / "vae"), out, 4, 5, "cpu", progress=False)
    latents = _data(folder, source="latents", latents_dir=str(out))
    (tmp_path / "vae").rename(tmp_path / "moved")
    with caplog.at_level(logging.INFO, logger="fusedit"):
        check_latents(latents, _vae(tmp_path / "moved"))
    assert any("holds the same kind and shapes" in r.getMessage() for r in caplog.records)
    # A rerun of cache-latents with the moved VAE finds the cache finished.
    assert cache_latents(data, _vae(tmp_path / "moved"), out, 4, 5, "cpu", progress=False)["samples"] == 7
    assert any("same kind and shapes (config.json) and weights" in r.getMessage() for r in caplog.records)

    # Other weights of the same config (a fine-tuned VAE, an fp16 fix) in the folder the cache names.
    recorded = json.loads((out / "index.json").read_text())["meta"]["vae_identity"]["weights"]
    tiny_vae().save_pretrained(tmp_path / "moved")
    with pytest.raises(ConfigError) as error:
        check_latents(latents, _vae(tmp_path / "moved"))
    assert str(error.value) == (
        f"data.latents_dir={str(out)!r} was encoded with a VAE whose weights have the fingerprint {recorded}, "
        f"but vae.model_id={str(tmp_path / 'moved')!r} holds other weights of the same config "
        f"({tensors_fingerprint(tmp_path / 'moved')})"
    )

    # Another VAE of the same vae.* settings (4 channels, 2x) in the folder the cache names.
    tiny_vae(scaling_factor=0.5).save_pretrained(tmp_path / "moved")
    message = (
        "a VAE whose config.json has scaling_factor=0.18215, but vae.model_id="
        f"{str(tmp_path / 'moved')!r} holds another, whose config.json has scaling_factor=0.5"
    )
    with pytest.raises(ConfigError) as error:
        check_latents(latents, _vae(tmp_path / "moved"))
    assert str(error.value) == f"data.latents_dir={str(out)!r} was encoded with {message}"
    with pytest.raises(
        ConfigError, match=re.escape(f"holds latents made with {message}: use another folder")
    ):
        cache_latents(data, _vae(tmp_path / "moved"), out, 4, 5, "cpu", progress=False)

    # A cache written before the VAE's identity was recorded compares vae.model_id as written.
    index = json.loads((out / "index.json").read_text())
    del index["meta"]["vae_identity"]
    (out / "index.json").write_text(json.dumps(index))
    (out / "meta.json").write_text(json.dumps(index["meta"]))  # both records lack it in such a cache
    check_latents(latents, _vae(tmp_path / "moved"))
    with pytest.raises(ConfigError, match=r"was encoded with vae.model_id='.*moved', but the config has vae"):
        check_latents(latents, _vae(tmp_path / "vae2"))


def test_a_hub_vae_cache_accepts_the_downloaded_folder_of_that_vae(tmp_path, folder, monkeypatch):
    import huggingface_hub.constants

    import fusedit.vae

    # A Hugging Face cache that the VAE's first load fills, as a download would.
    hub = tmp_path / "hub"
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub))
    tiny_vae().save_pretrained(tmp_path / "download")
    load = fusedit.vae.load_autoencoder

    def download_and_load(cfg, device):
        repo = hub / "models--org--tiny-vae"
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / "main").write_text("abc")
        (repo / "snapshots" / "abc").mkdir(parents=True, exist_ok=True)
        (repo / "snapshots" / "abc" / "config.json").write_bytes(
            (tmp_path / "download/config.json").read_bytes()
        )
        return load(_vae(tmp_path / "download"), device)

    monkeypatch.setattr(fusedit.vae, "load_autoencoder", download_and_load)
    data, out = _data(folder), tmp_path / "cache"
    cache_latents(data, _vae("org/tiny-vae"), out, 4, 5, "cpu", progress=False)
    latents = _data(folder, source="latents", latents_dir=str(out))
    check_latents(latents, _vae("org/tiny-vae"))
    check_latents(latents, _vae(tmp_path / "download"))
    tiny_vae(block_out_channels=(8, 16)).save_pretrained(tmp_path / "other")
    with pytest.raises(ConfigError, match=r"config.json has block_out_channels=\[8, 8\], but vae.model_id="):
        check_latents(latents, _vae(tmp_path / "other"))


def test_training_on_latents_warns_that_data_crop_has_no_effect(tmp_path, folder, caplog):
    out = tmp_path / "cache"
    cache_latents(_data(folder), VAEConfig(), out, 2, 4, "cpu", progress=False)
    for crop, warned in (("random", True), ("center", False)):
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="fusedit"):
            step_loader(_data(folder, source="latents", latents_dir=str(out), crop=crop), 0, 2, 0, 1)
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert warnings == (
            [
                f"data.crop='random' has no effect with data.source=latents: the images in {str(out)!r} were "
                "cropped when they were cached (with data.crop='center')"
            ]
            if warned
            else []
        )
        assert f"data: 7 samples in {str(out)!r}" in [r.getMessage() for r in caplog.records]


def test_a_cache_of_no_usable_sample_is_refused_and_a_corrected_rerun_starts_over(tmp_path, folder):
    out = tmp_path / "cache"
    wrong = _data(folder, caption_fields=["text"])  # the captions are in .txt sidecars
    with pytest.raises(
        ConfigError, match=r"^no usable sample to cache into .*no-caption 9.*data\.caption_fields"
    ):
        cache_latents(wrong, VAEConfig(), out, batch_size=2, shard_size=4, device="cpu", progress=False)
    assert not (out / "index.json").exists()  # training names the missing index, not an empty cache
    # Nothing was encoded, so the corrected settings are not refused over the first try's meta.json.
    summary = cache_latents(
        _data(folder), VAEConfig(), out, batch_size=2, shard_size=4, device="cpu", progress=False
    )
    assert summary["samples"] == 7 and summary["skipped"] == {"corrupt": 1, "tiny": 1}
    reference = tmp_path / "reference"
    cache_latents(
        _data(folder), VAEConfig(), reference, batch_size=2, shard_size=4, device="cpu", progress=False
    )
    assert json.loads((out / "index.json").read_text()) == json.loads((reference / "index.json").read_text())
    # A cache holding latents is still refused.
    with pytest.raises(ConfigError, match="holds latents made with data.caption_fields="):
        cache_latents(wrong, VAEConfig(), out, batch_size=2, shard_size=4, device="cpu", progress=False)


def test_a_cache_of_no_usable_sample_reruns_on_the_data_once_fixed(tmp_path, folder):
    out, data = tmp_path / "cache", _data(folder)
    captions = {p: p.read_text() for p in folder.glob("*.txt")}
    for p in captions:
        p.unlink()
    with pytest.raises(ConfigError, match="no-caption 9"):
        cache_latents(data, VAEConfig(), out, 2, 4, "cpu", progress=False)
    for p, text in captions.items():  # the captions written, the same command again
        p.write_text(text)
    assert cache_latents(data, VAEConfig(), out, 2, 4, "cpu", progress=False)["samples"] == 7


def test_a_cache_killed_before_its_first_shard_reruns_with_other_settings(tmp_path, folder):
    out = tmp_path / "cache"
    cache_latents(_data(folder, crop="random"), VAEConfig(), out, 2, 4, "cpu", progress=False)
    for p in out.glob("latents-*"):  # as if killed in shard 0: only meta.json was written
        p.unlink()
    (out / "index.json").unlink()
    assert cache_latents(_data(folder), VAEConfig(), out, 2, 4, "cpu", progress=False)["samples"] == 7
    assert json.loads((out / "meta.json").read_text())["data"]["crop"] == "center"
