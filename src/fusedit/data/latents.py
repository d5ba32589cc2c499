"""Pre-encoded latents: encode a dataset with the VAE once, then train without running the VAE.

:func:`cache_latents` enumerates the samples of ``data_cfg`` once, in the source's natural order (sorted
paths, index rows, shards as listed, table rows), decodes and transforms them exactly like training does,
encodes them with ``fusedit.vae.load_autoencoder(vae_cfg)`` and writes, into ``out_dir``:

* ``latents-NNNNNN.safetensors``: shard j holds the samples at positions [j * shard_size, (j + 1) *
  shard_size) of that order (skipped samples leave gaps), one tensor per sample;
* ``latents-NNNNNN.json``: that shard's samples (stable id, tensor key, every caption candidate, shape) and
  its skips, written after the tensors, so its presence marks the shard finished;
* ``index.json``: sample id -> shard, key, captions, shape, position, for all shards, and the skip report,
  written at the end from the shard records, one at a time;
* ``index/``: the same index as columns (``_IndexColumns``), written beside index.json: what training reads,
  memory-mapped, without parsing the whole JSON document (about 1.5 GB of parse per 1M samples in every
  process); a cache made before it has none and is read from index.json;
* ``meta.json``: the data and VAE settings the cache was made with.

Samples are keyed by their stable id (relative path, shard/key, row), never by a training step, so one
cache serves any batch size, seed and number of ranks. A rerun after an interruption skips finished shards
(without decoding them) and refuses a folder made with other settings. The VAE's sampling noise is seeded per
sample by (seed, shard, position), so a re-encoded shard is identical to the one it replaces, whatever
``batch_size`` encodes it.

:class:`LatentDataset` reads the cache (``data.source=latents``, ``data.latents_dir``): items are
``{"latent": (C, h, w) float32, "caption", "index": position, "id"}``; with buckets in the cache, every batch
holds one latent shape. Captions are picked among the stored candidates by ``data.caption_pick`` per epoch,
as for raw images; caption dropout stays with the training loop.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import os
import shutil
from array import array
from collections import OrderedDict
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from fusedit.config import (
    ConfigError,
    DataConfig,
    VAEConfig,
    check_data_locations,
    check_whole,
    identity_difference,
    model_identity,
    written_as_path,
)
from fusedit.data.loader import build_catalog, build_dataset, is_stream, stream_reader_factory
from fusedit.data.packed import PackedStrings, Packer
from fusedit.data.plan import PlannedDataset
from fusedit.data.skips import SkipCounter, no_usable_samples
from fusedit.data.transforms import NOT_UTF8, SampleDecoder, SkipSample, pick_caption
from fusedit.files import (
    as_json_reads_back,
    check_output_folder,
    counted,
    read_json,
    readable,
    readable_by_all,
    readable_size,
    remove_folder,
    replace_folder,
    tensors_fingerprint,
    write_atomic,
    write_text_atomic,
)

log = logging.getLogger(__name__)

FORMAT = 2  # 2: the VAE noise seeded per sample (1: per encoding batch)
INDEX, META = "index.json", "meta.json"
COLUMNS = "index"  # the folder of the index's columns (_IndexColumns)
# The DataConfig fields each source reads, which change what a cache holds: a rerun with other values must
# not mix into it. The others are recorded but never compared: a rerun must not be refused over a setting
# that changes nothing, such as data.kinds for a folder or data.crop for shapes.
_IMAGE_KEYS = (
    "image_field",
    "caption_fields",
    "image_size",
    "min_image_size",
    "max_aspect_ratio",
    "crop",
    "buckets",
)
# What a cache made before a setting was recorded was made with, where that is known: before
# data.max_aspect_ratio existed no image was skipped for its shape. (Others, such as data.hf_streaming, are
# not compared for such a cache.)
_BEFORE_RECORDED = {"max_aspect_ratio": None}
_READ_KEYS = {
    "shapes": ("image_size", "max_objects", "num_samples", "kinds"),
    "folder": ("root", "index_file", *_IMAGE_KEYS),
    "webdataset": ("shards", *_IMAGE_KEYS),
    # A stream names rows "#N" where the table names them N, and seeds each one's random crop by that name
    # where the table seeds it by N: the two must not share a cache.
    "hf": ("hf_path", "hf_name", "hf_split", "hf_streaming", *_IMAGE_KEYS),
}
# What meta.json records: the source and every field some source reads.
_DATA_KEYS = ("source", *dict.fromkeys(key for keys in _READ_KEYS.values() for key in keys))
# vae.model_id and vae.subfolder together name the folder the VAE loads from: compared as one place.
_VAE_PLACE = ("model_id", "subfolder")


def _shard_name(j: int) -> str:
    return f"latents-{j:06d}"


def _write_json(path: Path, data: Any) -> None:
    write_text_atomic(path, json.dumps(data, indent=1))  # a killed run never leaves half a file


# --------------------------------------------------------------------------------------------------
# What to encode: one enumeration per source kind


class _Items:
    """The samples of a source in natural order: ``total`` (None for a stream, known only at its end),
    ``sample_id(position)`` where random access exists, and ``iterate(start, end)`` yielding (position,
    id, result) with result = (image tensor, bucket, captions) or SkipSample. ``refused``: the (reason,
    id, detail) of entries the source dropped before giving them a position (an index's bad rows)."""

    total: int | None = None
    refused: tuple = ()

    def sample_id(self, position: int) -> str | None:
        return None

    def iterate(self, start: int, end: int | None) -> Iterator[tuple[int, str, Any]]:
        raise NotImplementedError


class _CatalogItems(_Items):
    def __init__(self, catalog: Any, decoder: SampleDecoder, workers: int, chunk: int):
        self.catalog, self.decoder, self.workers, self.chunk = catalog, decoder, workers, chunk
        self.total = len(catalog)
        self.refused = tuple(getattr(catalog, "skipped", ()))  # counted by training's report too

    def sample_id(self, position: int) -> str:
        return self.catalog.sample_id(position)

    def _one(self, i: int) -> Any:
        try:
            fields, image = self.catalog.record(i)
            out = self.decoder(fields, image, key=i, epoch=0)
        except SkipSample as e:
            return e
        return out.image, out.bucket, out.captions

    def iterate(self, start: int, end: int | None) -> Iterator[tuple[int, str, Any]]:
        end = self.total if end is None else min(end, self.total)
        # In chunks, so at most `chunk` decoded images are held at once whatever the shard size.
        pool = ThreadPoolExecutor(self.workers) if self.workers else None
        try:
            for lo in range(start, end, self.chunk):
                positions = range(lo, min(end, lo + self.chunk))
                results = pool.map(self._one, positions) if pool else map(self._one, positions)
                for i, result in zip(positions, results):
                    yield i, self.catalog.sample_id(i), result
        finally:
            if pool:
                pool.shutdown(cancel_futures=True)


class _ShapesItems(_Items):
    def __init__(self, cfg: DataConfig, seed: int):
        self.dataset = build_dataset(cfg, seed)
        self.total = len(self.dataset)

    def sample_id(self, position: int) -> str:
        return str(position)

    def iterate(self, start: int, end: int | None) -> Iterator[tuple[int, str, Any]]:
        for i in range(start, self.total if end is None else min(end, self.total)):
            item = self.dataset[i]
            yield i, str(i), (item["image"], 0, (item["caption"],))


class _StreamItems(_Items):
    """A streaming hf dataset: one pass (epoch 0) as rank 0 of 1; finished positions are read, not decoded."""

    def __init__(self, cfg: DataConfig, decoder: SampleDecoder):
        self.make_reader, self.decoder = stream_reader_factory(cfg, decoder.seed, 0, 1), decoder
        self.reader, self.position = None, 0

    def iterate(self, start: int, end: int | None) -> Iterator[tuple[int, str, Any]]:
        if self.reader is None or self.position > start:
            self.reader, self.position = self.make_reader(), 0
        while end is None or self.position < end:
            record = self.reader.next()
            if record.epoch > 0:
                self.total = self.position
                return
            position = self.position
            self.position += 1
            if position < start:
                continue
            try:
                if record.error is not None:
                    raise record.error
                out = self.decoder(record.fields, record.image, key=record.key, epoch=0)
                result: Any = (out.image, out.bucket, out.captions)
            except SkipSample as e:
                result = e
            yield position, record.id, result


def _items(cfg: DataConfig, seed: int, batch_size: int, progress: bool) -> _Items:
    if cfg.source == "latents":
        raise ConfigError(
            "data.source=latents is already a latent cache (allowed: shapes, folder, webdataset, hf)"
        )
    if cfg.source == "shapes":
        return _ShapesItems(cfg, seed)
    decoder = SampleDecoder.from_config(cfg, seed)
    if is_stream(cfg) and cfg.source == "hf":
        return _StreamItems(cfg, decoder)
    # webdataset is cached through its index-addressable view (all shards, listed order, no mixing).
    catalog = build_catalog(cfg, progress=progress)
    return _CatalogItems(catalog, decoder, cfg.num_workers, chunk=max(4 * batch_size, 64))


# --------------------------------------------------------------------------------------------------
# Encoding


def _meta(data_cfg: DataConfig, vae_cfg: VAEConfig, seed: int, shard_size: int, dtype: torch.dtype) -> dict:
    data = dataclasses.asdict(data_cfg)
    data["max_aspect_ratio"] = data["max_aspect_ratio"] or None  # 0 and None are the same: no limit
    return {
        "format": FORMAT,
        "data": as_json_reads_back({k: data[k] for k in _DATA_KEYS}),
        "vae": as_json_reads_back(dataclasses.asdict(vae_cfg)),
        "vae_identity": _vae_identity(vae_cfg),
        "seed": seed,
        "shard_size": shard_size,
        "dtype": str(dtype).removeprefix("torch."),
    }


def _cache_meta(out: Path) -> dict | None:
    """The META of the latent cache in ``out`` (which records its format), finished or not; None where
    ``out`` holds none."""
    try:
        meta = json.loads((out / META).read_text())
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) and "format" in meta else None


def _is_cache(out: Path) -> bool:
    return _cache_meta(out) is not None


def cached_data(latents_dir: str | Path) -> dict | None:
    """The data settings the latent cache in ``latents_dir`` was made with (its source, and a shapes
    cache's data.kinds), for what a run trained on it learnt; None where the folder holds no readable cache
    (moved or deleted since)."""
    meta = _cache_meta(Path(latents_dir))
    data = None if meta is None else meta.get("data")
    return data if isinstance(data, dict) else None


def _vae_identity(vae_cfg: VAEConfig) -> dict | None:
    """The kind and shapes (``model_identity``) of the VAE ``vae_cfg`` names, from its folder's config.json
    or a hub id's copy of it in the Hugging Face cache (there once the VAE has been loaded), with a
    fingerprint of its weights under "weights" where the folder holds them (``tensors_fingerprint``: VAEs of
    one config, such as SDXL's and its fp16 fix, differ there); None for the identity autoencoder and a hub
    id not in the cache."""
    place, subfolder = vae_cfg.model_id, vae_cfg.subfolder
    if vae_cfg.kind == "identity" or not place:
        return None
    if written_as_path(place):
        folder = Path(place) / subfolder
    else:
        from huggingface_hub import try_to_load_from_cache

        try:
            file = try_to_load_from_cache(place, f"{subfolder}/config.json" if subfolder else "config.json")
        except ValueError:  # not a hub id either (HFValidationError): a folder that does not exist
            return None
        if not isinstance(file, str):
            return None
        folder = Path(file).parent
    identity = model_identity(str(folder))
    if not identity:
        return None
    weights = tensors_fingerprint(folder) if folder.is_dir() else None
    return {**identity, **({"weights": weights} if weights else {})}


def _vae_place(settings: dict) -> str:
    """The folder the VAE loads from, as the vae.* settings naming it."""
    subfolder = settings.get("subfolder")
    return f"vae.model_id={settings.get('model_id')!r}" + (
        f" with vae.subfolder={subfolder!r}" if subfolder else ""
    )


def _vae_change(meta: dict, settings: dict, now: dict | None, where: str) -> tuple[str, str] | None:
    """How the VAE the config names now (``settings``: its vae.* settings as meta.json records them; ``now``:
    its identity, _vae_identity) differs from the one the cache ``where`` was made with (``meta``, its
    meta.json), as (what the cache was made with, what the config has now); None when it is the same.

    A VAE folder moves, or a hub id is replaced by its downloaded folder, or a pipeline folder with
    vae.subfolder=vae by that subfolder itself: with the VAE's kind, shapes and weights recorded at caching
    time (``vae_identity``), vae.model_id and vae.subfolder may name another place holding the same ones,
    and a place holding others is refused even under the same name. Caches written before the record, and
    VAEs whose identity is unknown now (a hub id not in the cache), compare both settings as written."""
    cached = meta.get("vae", {})
    for key, value in settings.items():
        if key not in _VAE_PLACE and cached.get(key) != value:
            return f"vae.{key}={cached.get(key)!r}", f"the config has vae.{key}={value!r}"
    recorded = meta.get("vae_identity")
    place = _vae_place(settings)
    moved = any(cached.get(key) != settings[key] for key in _VAE_PLACE)
    if recorded is None or now is None:
        return (_vae_place(cached), f"the config has {place}") if moved else None
    field = identity_difference(recorded, now)
    if field:
        return (
            f"a VAE whose config.json has {field}={recorded[field]!r}",
            f"{place} holds another, whose config.json has {field}={now[field]!r}",
        )
    # Caches written before the fingerprint, and hub snapshots without weight files, compare shapes only.
    weighed = "weights" in recorded and "weights" in now
    if weighed and recorded["weights"] != now["weights"]:
        return (
            f"a VAE whose weights have the fingerprint {recorded['weights']}",
            f"{place} holds other weights of the same config ({now['weights']})",
        )
    if moved:
        log.info(
            "%s was encoded with the VAE at %s; %s holds the same kind and shapes (config.json)%s: taken as "
            "that VAE, moved",
            where,
            _vae_place(cached),
            place,
            " and weights" if weighed else "",
        )
    return None


def _check_meta(out: Path, meta: dict) -> dict | None:
    """Refuse a rerun into ``out`` with settings other than its meta.json's; returns that record (None for
    a new cache). A cache without one encoded sample (killed before its first shard, or every sample
    skipped, as with a wrong data.caption_fields or missing caption files) has nothing to lose: a rerun
    starts it over, with the settings and data as they are now."""
    path = out / META
    if not path.is_file():
        return None
    # Read only up to the first shard holding a sample (a large cache's records are read again by the loop).
    if not any(shard["samples"] for shard in finished_shards(out)):
        log.info("%r holds no encoded sample yet: started over", str(out))
        for stale in [path, out / INDEX, *out.glob("latents-*")]:
            stale.unlink(missing_ok=True)
        remove_folder(out / COLUMNS)
        return None
    old = read_json(path, COPY_CACHE_AGAIN)
    change = _vae_change(old, meta["vae"], meta["vae_identity"], repr(str(out)))
    if change:
        change = f"{change[0]}, but {change[1]}"
    else:
        data, recorded = meta["data"], old.get("data", {})
        read = ("source", *_READ_KEYS.get(data["source"], _DATA_KEYS))
        # A setting recorded only since a later version (data.hf_streaming) is unknown for an older cache,
        # unless what it was then is known (_BEFORE_RECORDED).
        recorded = {**_BEFORE_RECORDED, **recorded}
        differences = [(f"data.{key}", recorded.get(key), data[key]) for key in read if key in recorded]
        differences += [(key, old.get(key), meta[key]) for key in ("format", "seed", "shard_size", "dtype")]
        change = next(
            (f"{key}={before!r}, not {now!r}" for key, before, now in differences if before != now), None
        )
    if change is None:
        return old
    raise ConfigError(
        f"{str(out)!r} holds latents made with {change}: use another folder (or delete this one)"
    )


def finished_shards(out: Path) -> Iterator[dict]:
    """The records of the finished shards in ``out``, in shard order (read one at a time: a caller may stop
    at the first it needs)."""
    for record in sorted(out.glob("latents-*.json")):
        shard = _finished_shard(record)
        if shard is not None:
            yield shard


def _finished_shard(record: Path) -> dict | None:
    """The shard record ``record`` (a ``latents-NNNNNN.json``) if its shard is finished: the record is
    written after the tensors, so the two together mark it (module docstring)."""
    if record.is_file() and record.with_suffix(".safetensors").is_file():
        return read_json(record, COPY_CACHE_AGAIN)
    return None


def _check_disk(out: Path, total: int | None, data_cfg: DataConfig, vae_cfg: VAEConfig, dtype) -> None:
    """Refuse a cache that cannot fit on the disk before encoding any of it: the procedural source's
    default 10M samples are about 120 GB of float32 latents at 32 px, found out otherwise when the disk is
    full hours later. A stream of unknown length is not checked. Shards already written count as done."""
    if total is None:
        return
    side = data_cfg.image_size // vae_cfg.downsample  # buckets keep about image_size**2 pixels
    per_sample = vae_cfg.latent_channels * side * side * dtype.itemsize
    written = sum(f.stat().st_size for f in out.glob("*.safetensors")) if out.is_dir() else 0
    need = total * per_sample - written
    where = next(p for p in (out, *out.parents) if p.exists())
    # A read-only mount reports its free space all the same: it is the mount that refuses the cache.
    if hasattr(os, "statvfs") and os.statvfs(where).f_flag & os.ST_RDONLY:
        raise ConfigError(
            f"{str(where)!r} is on a read-only file system, so the cache cannot be written into {str(out)!r} "
            "(allowed: an --out on a writable disk)"
        )
    free = shutil.disk_usage(where).free
    if need > free:
        ways = [f"data.num_samples={(free + written) // per_sample}"] if data_cfg.source == "shapes" else []
        if dtype.itemsize == 4:
            ways.append("--dtype bfloat16 (half the bytes)")
        ways += ["more free disk space", "another disk"]
        raise ConfigError(
            f"caching {total:,} samples needs about {readable_size(need)} more ({per_sample:,} bytes of "
            f"{str(dtype).removeprefix('torch.')} latents each) but {str(where)!r} has {readable_size(free)} "
            f"free (allowed: a cache that fits: {', '.join(ways)})"
        )


def _noise_seed(seed: int, shard: int, position: int) -> int:
    return ((seed * 1_000_003 + shard) * 1_000_003 + position) % 2**63


class _ShardEncoder:
    """Encodes one shard's decoded images batch by batch (one latent shape per batch)."""

    def __init__(self, autoencoder, device: torch.device, batch_size: int, seed: int, shard: int, dtype):
        self.ae, self.device, self.batch_size = autoencoder, device, batch_size
        self.seed, self.shard, self.dtype = seed, shard, dtype
        self.pending: dict[int, list[tuple[int, torch.Tensor]]] = {}
        self.latents: dict[int, torch.Tensor] = {}

    def add(self, position: int, image: torch.Tensor, bucket: int) -> None:
        entries = self.pending.setdefault(bucket, [])
        entries.append((position, image))
        if len(entries) == self.batch_size:
            self._flush(bucket)

    def finish(self) -> dict[int, torch.Tensor]:
        for bucket in sorted(self.pending):
            if self.pending[bucket]:
                self._flush(bucket)
        return self.latents

    def _flush(self, bucket: int) -> None:
        entries = self.pending.pop(bucket)
        x = torch.stack([image for _, image in entries]).to(self.device)
        # Each sample's posterior draw from a CPU generator of its own: the same latent on any device, in any
        # batch (size or neighbours), and after a rerun.
        generators = [
            torch.Generator().manual_seed(_noise_seed(self.seed, self.shard, position))
            for position, _ in entries
        ]
        with torch.inference_mode():
            z = self.ae.encode(x, generators)
        for (position, _), latent in zip(entries, z.detach().cpu()):
            self.latents[position] = latent.to(self.dtype).contiguous()


def cache_latents(
    data_cfg: DataConfig,
    vae_cfg: VAEConfig,
    out_dir: str | Path,
    batch_size: int,
    shard_size: int,
    device: torch.device | str = "cpu",
    progress: bool = True,
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> dict:
    """Encode every sample of ``data_cfg`` into ``out_dir`` (see the module docstring); resumable.

    ``seed`` fixes the random crops, caption-independent choices and the VAE's sampling noise; ``dtype``
    is what the latents are stored as (float16/bfloat16 halve the disk). Returns {"samples", "shards",
    "skipped" (counts by reason), "report", "index" (path)}.
    """
    from fusedit.vae import load_autoencoder

    check_whole("batch_size", batch_size)
    check_whole("shard_size", shard_size)
    check_data_locations(data_cfg)
    out = Path(out_dir)
    if not _is_cache(out):
        check_output_folder(out, "a latent cache", "an earlier cache's folder (resumed)")
    meta = _meta(data_cfg, vae_cfg, seed, shard_size, dtype)
    old = _check_meta(out, meta)
    if old and old.get("vae_identity"):
        # The VAE was taken as the recorded one on what can be seen of it here: by its settings where its
        # identity is unknown (its folder unmounted, a hub id not in this machine's cache), by its config.json
        # where its weights are. The record keeps what it knew, so later checks still compare it.
        meta["vae_identity"] = {**old["vae_identity"], **(meta["vae_identity"] or {})}
    items = _items(data_cfg, seed, batch_size, progress)
    _check_disk(out, items.total, data_cfg, vae_cfg, dtype)
    _write_json(out / META, meta)
    device = torch.device(device)
    autoencoder = None  # loaded only when a shard needs encoding: a finished cache reruns in no time
    total = items.total
    bar = None  # made at the first shard to encode, starting at the samples kept before it
    tally = _Tally(items.refused)
    kept = 0  # the samples of the shards an earlier run finished
    kept_skipped = 0  # and the samples it skipped in them, which are not tried again
    not_utf8 = NOT_UTF8.count  # captions met so far that are not UTF-8: those after are this cache's
    j = 0
    try:
        while total is None or j * shard_size < total:
            start, end = j * shard_size, (j + 1) * shard_size
            if total is not None:
                end = min(end, total)
            shard = _kept_shard(items, out, j, end, total)
            if shard is not None:
                tally.add(shard)
                kept += len(shard["samples"])
                kept_skipped += len(shard["skipped"])
                if bar is not None:  # a shard after one encoded again (its files were lost)
                    bar.update(shard["end"] - shard["start"])
                j += 1
                if shard["end"] - shard["start"] < shard_size:
                    break  # a short shard is the last one of a stream
                continue
            if autoencoder is None:
                autoencoder = load_autoencoder(vae_cfg, device)
            if bar is None:
                # The kept shards' samples are where the bar starts, not progress: counted as encoded, they
                # made the rate and time left of a resumed cache many times too fast (tqdm rates n - initial).
                bar = tqdm(total=total, initial=start, desc="cache latents", unit="img", disable=not progress)
            encoder = _ShardEncoder(autoencoder, device, batch_size, seed, j, dtype)
            shard = _encode_shard(items, encoder, out, j, start, end, bar)
            if shard is None:
                break  # a stream that ended exactly at a shard boundary
            tally.add(shard)
            j += 1
            if total is None and shard["end"] - start < shard_size:
                break
    finally:
        # On an error too: a shard that raises (a full disk, a failing VAE) must not leave the bar open.
        if bar is not None:
            bar.close()
    if not tally.samples:
        # An index of nothing would only fail later, in training; a corrected rerun into ``out`` starts over
        # (_check_meta).
        raise no_usable_samples(tally.skips, task=f"to cache into {str(out)!r}")
    if autoencoder is not None and meta["vae_identity"] is None:
        # A hub id's config.json is in the Hugging Face cache now that the VAE has loaded.
        meta["vae_identity"] = _vae_identity(vae_cfg)
        _write_json(out / META, meta)
    # A rerun that encoded nothing leaves an index that is already this one as it is (_index_kept).
    summary = (_index_kept(out, meta, tally) if autoencoder is None else None) or _write_index(
        out, meta, tally
    )
    log.info("%s", _cached_line(summary, kept, out, kept_skipped))
    if NOT_UTF8.count > not_utf8:
        # The first was warned about when met (NotUTF8); the count is known only now.
        log.warning(
            "data: %s encoded now %s not UTF-8 (e.g. %s): cached with their bad bytes as U+FFFD",
            counted(NOT_UTF8.count - not_utf8, "caption"),
            "was" if NOT_UTF8.count - not_utf8 == 1 else "were",
            NOT_UTF8.last,
        )
    return summary


def _kept_shard(items: _Items, out: Path, j: int, end: int, total: int | None) -> dict | None:
    """Shard ``j``'s record in ``out`` if an earlier run finished it (checked against the data:
    _check_shard) and it reaches ``end``, else None: the shard is encoded (again). ``total``: the data's
    sample count when the cache started (None for a stream, whose items.total is set once it ends)."""
    shard = _finished_shard(out / f"{_shard_name(j)}.json")
    if shard is None:
        return None
    _check_shard(items, shard, out)
    # A short last shard of a dataset that has grown since (images added after it in the order) is
    # encoded again, up to the new end.
    return shard if total is None or shard["end"] >= end else None


def _encode_shard(
    items: _Items, encoder: _ShardEncoder, out: Path, j: int, start: int, end: int, bar: tqdm
) -> dict | None:
    """Encode positions ``start``..``end`` - 1 as shard ``j`` of ``out``: its safetensors written
    atomically, then its record (which marks it finished: module docstring). Returns the record, or None
    for a stream that had nothing left at ``start``."""
    samples, skipped, seen = {}, [], 0
    for position, sample_id, result in items.iterate(start, end):
        seen += 1
        bar.update(1)
        if isinstance(result, SkipSample):
            skipped.append([result.reason, sample_id, result.detail])
            continue
        image, bucket, captions = result
        samples[position] = {"id": sample_id, "captions": list(captions)}
        encoder.add(position, image, bucket)
    if seen == 0:
        return None
    latents = encoder.finish()
    tensors = {str(p): latents[p] for p in sorted(latents)}
    tmp = out / f"{_shard_name(j)}.safetensors.tmp"
    save_file(tensors, str(tmp), metadata={"format": str(FORMAT), "shard": str(j)})
    readable_by_all(tmp)  # save_file leaves it readable by its owner only: a cache is shared data
    os.replace(tmp, out / f"{_shard_name(j)}.safetensors")
    shard = {
        "shard": j,
        "start": start,
        "end": start + seen,
        "samples": [
            {**samples[p], "key": str(p), "position": p, "shape": list(latents[p].shape)}
            for p in sorted(samples)
        ],
        "skipped": skipped,
    }
    _write_json(out / f"{_shard_name(j)}.json", shard)
    return shard


def _cached_line(summary: dict, kept: int, out: Path, kept_skipped: int = 0) -> str:
    """What a cache-latents run leaves in ``out``: the samples cached (of those in the data, the rest
    skipped) and in how many shards; after a rerun, how many an earlier run had cached, which are not read
    again: a caption edited since they were cached stays as it was (said for a partial rerun too), and how
    many it skipped in its finished shards (``kept_skipped``), which are not tried again either: an image
    repaired since stays out of the cache. (Retrying them would mean rewriting those shards.)"""
    cached, tried = summary["samples"], summary["samples"] + sum(summary["skipped"].values())
    shards = summary["shards"]
    line = f"cached {cached:,} of {counted(tried, 'sample')} in {counted(shards, 'shard')} into {str(out)!r}"
    if not (kept or kept_skipped):
        return line
    verb = "is" if kept_skipped == 1 else "are"
    retried = (
        f", nor {verb} the {counted(kept_skipped, 'sample')} skipped then retried" if kept_skipped else ""
    )
    unread = (
        f"captions edited since are not read again{retried}: to re-read them, delete the folder or cache into "
        "another one"
    )
    if kept < cached:  # said apart, or a rerun reads as if it had encoded everything again
        return f"{line}: {kept:,} already cached ({unread}), {cached - kept:,} encoded now"
    return f"{line}: all already cached, none encoded now ({unread})"


def _check_shard(items: _Items, shard: dict, out: Path) -> None:
    """A finished shard must still describe the same samples at the same positions: every id is compared
    (a folder may have gained, lost or renamed files anywhere, keeping its first and last ones)."""
    if items.total is None:
        return
    start, end = shard["start"], shard["end"]
    now = [items.sample_id(p) for p in range(start, min(end, items.total))]
    # A cache made before an index's repeated paths were keyed by position ("a.png@7") recorded the bare path.
    bare = [i.removesuffix(f"@{p}") for p, i in enumerate(now, start)]
    was = {s["id"] for s in shard["samples"]} | {s[1] for s in shard["skipped"]}
    if bare != now and was == set(bare) and _id_change(shard, bare, lambda: _whereabouts(items, out)) is None:
        _rekey(shard, now)
        return
    change = _id_change(shard, now, lambda: _whereabouts(items, out))
    if change:
        raise ConfigError(
            f"{str(out)!r}: the dataset changed since shard {shard['shard']} (positions {start}..{end - 1}) "
            f"was cached: {change}{_newly_read(shard, now)}; use another folder (allowed: only samples added "
            "after the last cached one)"
        )


# The image extensions a folder scan reads since the h-data audit's fixes (image_extensions); before them, a
# folder's files of these kinds were not samples.
_NEWLY_READ = {"jfif", "jpe", "avif", "heic", "heif"}


def _newly_read(shard: dict, now: list[str]) -> str:
    """Where the ids new to a shard's positions (``now``) are files of an extension fusedit did not read
    before, a note that the files may be old and fusedit's reading of them new; else ""."""
    was = {s["id"] for s in shard["samples"]} | {s[1] for s in shard["skipped"]}
    kinds = sorted({i.rpartition(".")[2].lower() for i in now if i not in was} & _NEWLY_READ)
    if not kinds:
        return ""
    return (
        f"; {'/'.join(f'.{k}' for k in kinds)} files are images to fusedit since its data-edge fixes "
        "(docs/train-your-own-data.md), so a cache made before them left out any that were there already"
    )


def _rekey(shard: dict, now: list[str]) -> None:
    """An old shard's ids replaced by those the data gives its positions now (``now``), so that its repeated
    paths' samples and skips count once per row, as a shard cached now does. Every position is one sample
    or one skip, and the skips are in position order (``_encode_shard``)."""
    start = shard["start"]
    for s in shard["samples"]:
        s["id"] = now[s["position"] - start]
    taken = {s["position"] for s in shard["samples"]}
    free = [p for p in range(start, shard["end"]) if p not in taken]
    for skip, position in zip(shard["skipped"], free):
        skip[1] = now[position - start]


def _whereabouts(items: _Items, out: Path) -> tuple[dict[str, int], set[str]]:
    """Where each id of the dataset is now ({id: its first position}) and the ids every finished shard in
    ``out`` was made from: what tells an id gone from one shard's positions from one that moved."""
    positions: dict[str, int] = {}
    for p in range(items.total or 0):
        positions.setdefault(items.sample_id(p), p)
    cached: set[str] = set()
    for shard in finished_shards(out):
        cached.update(s["id"] for s in shard["samples"])
        cached.update(s[1] for s in shard["skipped"])
    return positions, cached


def _id_change(shard: dict, now: list[str], whereabouts) -> str | None:
    """How the ids at a shard's positions now (``now``) differ from those it was made from (its samples',
    each at its position, and its skipped ones'), or None. ``whereabouts()`` (``_whereabouts``) tells an id
    missing from the positions but still in the dataset (moved along by an insertion or a removal before
    it) from one that is gone, and an id new to the positions from one cached in another shard."""
    was = [s["id"] for s in shard["samples"]] + [s[1] for s in shard["skipped"]]
    was_set, now_set = set(was), set(now)
    removed = [i for i in was if i not in now_set]
    added = [i for i in now if i not in was_set]
    if removed or added:
        positions, cached = whereabouts()
        gone = [i for i in removed if i not in positions]
        new = [i for i in added if i not in cached]
        moved = [i for i in removed + added if i in positions and i in cached]
        parts = [f"{_some(gone)} {'is' if len(gone) == 1 else 'are'} gone"] if gone else []
        if new and moved:
            verb = "was" if len(new) == 1 else "were"
            parts.append(
                f"{_some(new)} {verb} added at position {positions[new[0]]}, before the last cached sample"
            )
        elif new:
            parts.append(f"{_some(new)} {'is' if len(new) == 1 else 'are'} new")
        if not moved:
            return " and ".join(parts)
        where = f"{moved[0]!r} is now at position {positions[moved[0]]}"
        if not parts:  # reordered: the same samples, some in other shards' positions
            return f"the samples moved ({where})"
        them = "it" if len(gone) + len(new) == 1 else "them"
        return f"{' and '.join(parts)}: the samples after {them} moved ({where})"
    start = shard["start"]
    if len(now) < shard["end"] - start:  # the same ids, fewer positions: ids that were not unique
        return f"the dataset now ends at position {start + len(now) - 1}"
    for s in shard["samples"]:
        if now[s["position"] - start] != s["id"]:
            return f"{s['id']!r}, at position {s['position']} then, is now at {start + now.index(s['id'])}"
    return None


def _some(ids: list[str]) -> str:
    return repr(ids[0]) + (f" (and {len(ids) - 1} more)" if len(ids) > 1 else "")


class _Tally:
    """What cache-latents keeps of its shards while it runs, for the index written at the end: counts, the
    skips, and a hash of every sample's id (8 bytes a sample). The shard records themselves stay on disk:
    held, they were ~640 bytes a sample (6.4 GB over 10M samples for the whole encode)."""

    def __init__(self, refused=()):
        self.shards = self.samples = 0
        self.skips = SkipCounter.of(refused)  # the source's skips first, then each shard's, in order
        self.id_hashes = array("q")  # hash(id) of each sample in shard order: what finds a repeated id

    def add(self, shard: dict) -> None:
        self.shards += 1
        self.samples += len(shard["samples"])
        self.skips.add_all(tuple(s) for s in shard["skipped"])
        self.id_hashes.extend(hash(s["id"]) for s in shard["samples"])


class _Column:
    """One 1-D array of the index's columns, written as a .npy file piece by piece, each value once: the
    header first, then the values as they come, then the header again, in place, with the length, known only
    then. numpy's header (since 1.24, the oldest fusedit takes) leaves room for the length's digits
    (GROWTH_AXIS_MAX_DIGITS) so that it keeps its size: the file is np.save's byte for byte. So the writer
    holds no column (the fixed-size ones alone are 32 bytes a sample, 320 MB at 10M samples) and writes it
    once (a raw file copied behind the header at the end wrote ~1.3 GB more at 10M)."""

    def __init__(self, path: Path, dtype: str):
        self.path, self.dtype, self.count = path, np.dtype(dtype), 0
        self.file = open(path, "wb")  # noqa: SIM115 (closed by finish or close)
        self.reserved = self.file.write(self._header())

    def _header(self) -> bytes:
        """The .npy header of the values written so far, as np.save writes it (format 1.0)."""
        header = io.BytesIO()
        np.lib.format.write_array_header_1_0(
            header,
            {
                "descr": np.lib.format.dtype_to_descr(self.dtype),
                "fortran_order": False,
                "shape": (self.count,),
            },
        )
        return header.getvalue()

    def write(self, values) -> None:
        array = np.ascontiguousarray(values, dtype=self.dtype)
        self.file.write(array.data)
        self.count += len(array)

    def finish(self) -> None:
        header = self._header()
        if len(header) != self.reserved:  # a numpy without the header's room: it would overwrite values
            self.file.close()
            raise RuntimeError(
                f"numpy {np.__version__} writes a .npy header of {len(header)} bytes for {self.count} values "
                f"of {self.path.name}, not the {self.reserved} it wrote for none: a numpy >= 1.24 keeps it"
            )
        self.file.seek(0)
        self.file.write(header)
        self.file.close()

    def close(self) -> None:
        self.file.close()


class _IndexColumns:
    """The index as columns, in the folder COLUMNS: ``head.json`` (format, num_samples, meta, skipped and
    report as in INDEX; "shard_files": the shard files holding samples and "shapes": the latent shapes,
    each in order of first appearance; "index_bytes": the size of the INDEX written with them) and one 1-D
    .npy array each over the samples, in INDEX's order (shard order, so by position):

    * ``ids.ends.npy`` (int64) and ``ids.data.npy`` (uint8): each sample's key in INDEX, packed as
      ``PackedStrings`` holds them (end offsets, UTF-8);
    * ``captions.ends.npy`` and ``captions.data.npy``: likewise, each sample's captions as the JSON text of
      their list (json.dumps);
    * ``positions.npy`` (int64): its position, also its tensor's key (INDEX's "key" is its str);
    * ``shards.npy`` (int32): its shard, into "shard_files";
    * ``shapes.npy`` (int32): its latent shape, into "shapes".

    A reader maps them (np.load(mmap_mode="r")): nothing is parsed or copied at the start, and the ranks
    and DataLoader workers of a machine share one copy of what they read, in the page cache."""

    FORMAT = 1
    HEAD = "head.json"
    # name -> dtype; each ``ends`` before its ``data``, whose length is its last end.
    ARRAYS = {
        "ids.ends": "<i8",
        "ids.data": "|u1",
        "captions.ends": "<i8",
        "captions.data": "|u1",
        "positions": "<i8",
        "shards": "<i4",
        "shapes": "<i4",
    }

    def __init__(self, folder: Path):
        """A writer into ``folder`` (made here): ``add`` each shard's samples, then ``finish``."""
        folder.mkdir()
        self.folder = folder
        self.columns = {name: _Column(folder / f"{name}.npy", dtype) for name, dtype in self.ARRAYS.items()}
        self.sizes = {"ids": 0, "captions": 0}  # the bytes of each text column so far
        self.shard_files: dict[str, int] = {}
        self.shapes: dict[tuple[int, ...], int] = {}

    def _strings(self, name: str, items: list[str]) -> None:
        packer = Packer()  # the encoding PackedStrings reads back
        for item in items:
            packer.append(item)
        self.columns[f"{name}.data"].write(np.frombuffer(packer.data, dtype=np.uint8))
        self.columns[f"{name}.ends"].write(np.frombuffer(packer.ends, dtype=np.int64) + self.sizes[name])
        self.sizes[name] += len(packer.data)

    def add(self, shard_file: str, ids: list[str], samples: list[dict]) -> None:
        """One shard's samples (its record's), keyed ``ids`` in INDEX."""
        if not samples:
            return
        self._strings("ids", ids)
        self._strings("captions", [json.dumps(s["captions"]) for s in samples])
        self.columns["positions"].write([s["position"] for s in samples])
        shard = self.shard_files.setdefault(shard_file, len(self.shard_files))
        self.columns["shards"].write(np.full(len(samples), shard))
        self.columns["shapes"].write(
            [self.shapes.setdefault(tuple(s["shape"]), len(self.shapes)) for s in samples]
        )

    def finish(self, head: dict) -> None:
        for column in self.columns.values():
            column.finish()
        shapes = [list(shape) for shape in self.shapes]
        _write_json(
            self.folder / self.HEAD,
            {"format": self.FORMAT, **head, "shard_files": list(self.shard_files), "shapes": shapes},
        )

    def close(self) -> None:
        for column in self.columns.values():
            column.close()

    @classmethod
    def read(cls, latents_dir: str | Path) -> tuple[dict, dict[str, np.ndarray]] | None:
        """(head, {name: array}) of the finished cache in ``latents_dir``, its arrays memory-mapped and
        checked against head's counts; None where it has no columns (made before them) or columns of
        another format (a later fusedit's; its INDEX still reads)."""
        folder = Path(latents_dir) / COLUMNS
        if not (folder / cls.HEAD).is_file():
            return None
        remedy = _rerun(latents_dir)
        head = read_json(folder / cls.HEAD, remedy)
        if not isinstance(head, dict) or head.get("format") != cls.FORMAT:
            return None
        index = Path(latents_dir) / INDEX
        if head.get("index_bytes") != index.stat().st_size:
            # INDEX written anew without them (by a fusedit before the columns, which leaves COLUMNS as it
            # was): they may be of other samples. The size changes with any sample added or removed.
            log.warning(
                "%r was written with another %s (of %s bytes, not %s): reading %s instead, which takes "
                "longer and ~1.5 GB per 1M samples; a rerun of `fusedit cache-latents CONFIG --out %s` "
                "writes both anew",
                str(folder),
                INDEX,
                head.get("index_bytes"),
                index.stat().st_size,
                INDEX,
                latents_dir,
            )
            return None
        n, arrays = head["num_samples"], {}
        if not n:
            return head, arrays
        for name, dtype in cls.ARRAYS.items():
            path = folder / f"{name}.npy"
            kind, part = name.partition(".")[::2]
            length = int(arrays[f"{kind}.ends"][-1]) if part == "data" else n
            with readable(path, "a readable column of a latent index", (OSError, ValueError), remedy):
                array = np.load(path, mmap_mode="r", allow_pickle=False)
                if array.dtype != np.dtype(dtype) or array.shape != (length,):
                    raise ValueError(
                        f"{array.dtype} of shape {array.shape}, not {np.dtype(dtype)} of shape ({length},)"
                    )
            arrays[name] = array.view(np.ndarray)  # the map stays open while the view is held
        return head, arrays


def _write_index(out: Path, meta: dict, tally: _Tally) -> dict:
    """Write INDEX from shards 0..tally.shards - 1 of ``out``, streamed one shard record at a time (one
    json.dumps of every sample with indent=1 peaked at ~3 GB per 1M samples). Compact JSON: no reader
    needs the indent, which made it ~15% larger and slow to write (the pure-Python encoder)."""
    # Ids are unique in every source here; an id column of a streamed table might not be, and a duplicate
    # must not silently replace the earlier sample: it is keyed "id@position". Only ids whose hash repeats
    # are remembered as text.
    hashes, counts = np.unique(np.frombuffer(tally.id_hashes, dtype=np.int64), return_counts=True)
    repeated, seen = set(hashes[counts > 1].tolist()), set()
    names = [f"{_shard_name(j)}.safetensors" for j in range(tally.shards)]
    skips = tally.skips
    # The columns go first, and come back only after INDEX: columns there are always those of the INDEX
    # beside them (a kill in between leaves INDEX alone, which reads as a cache made before columns).
    remove_folder(out / COLUMNS)
    partial = out / f".{COLUMNS}.partial"
    remove_folder(partial)  # a killed run's
    columns = _IndexColumns(partial)

    def write(handle) -> None:
        head = {"meta": meta, "num_samples": tally.samples, "shards": names}
        handle.write(json.dumps(head, separators=(",", ":"))[:-1].encode() + b',"samples":{')
        first = True
        for j, name in enumerate(names):
            samples = {}
            record = _finished_shard(out / f"{_shard_name(j)}.json")
            if record is None:  # encoded in this run, gone since: only something outside the run removes it
                raise ConfigError(
                    f"{str(out / name)!r} or its record was removed while cache-latents ran; run it again "
                    "to encode that shard anew (the others are kept)"
                )
            ids = []
            for s in record["samples"]:
                sample_id = s["id"]
                # A repeated id, or one a renamed repeat took ("x@1" given after "x" was renamed so).
                if hash(sample_id) in repeated or sample_id in seen:
                    if sample_id in seen:
                        sample_id = f"{sample_id}@{s['position']}"
                    seen.add(sample_id)
                ids.append(sample_id)
                samples[sample_id] = {
                    "shard": name,
                    "key": s["key"],
                    # captions[0] again, as every index has had it: a reader of index.json may use it.
                    "caption": s["captions"][0],
                    "captions": s["captions"],
                    "shape": s["shape"],
                    "position": s["position"],
                }
            columns.add(name, ids, record["samples"])
            if samples:
                text = json.dumps(samples, separators=(",", ":"))[1:-1]  # the members, without the braces
                handle.write((text if first else "," + text).encode())
                first = False
        tail = {"skipped": skips.counts(), "report": skips.report()}
        handle.write(b"}," + json.dumps(tail, separators=(",", ":"))[1:].encode())

    try:
        write_atomic(out / INDEX, write)
        head = {
            "num_samples": tally.samples,
            "meta": meta,
            "skipped": skips.counts(),
            "report": skips.report(),
        }
        columns.finish({**head, "index_bytes": (out / INDEX).stat().st_size})
    except BaseException:
        columns.close()
        remove_folder(partial)
        raise
    readable_by_all(partial)  # a cache is shared data, as its shards are
    replace_folder(partial, out / COLUMNS)
    return _index_summary(out, tally)


def _index_summary(out: Path, tally: _Tally) -> dict:
    """What cache_latents returns of the index of ``tally``'s shards in ``out``."""
    return {
        "samples": tally.samples,
        "shards": tally.shards,
        "skipped": tally.skips.counts(),
        "report": tally.skips.report(),
        "index": out / INDEX,
    }


def _index_kept(out: Path, meta: dict, tally: _Tally) -> dict | None:
    """``_index_summary`` where ``out``'s index is already the one ``_write_index`` would write for a rerun
    that encoded nothing (its columns' head has the same samples, meta and skips, beside their own INDEX),
    else None. It is then left as it is: writing it anew costs ~2.8 GB of JSON per 10M samples, and would
    replace columns that a training job (on another node of a network file system) has mapped."""
    try:
        head = json.loads((out / COLUMNS / _IndexColumns.HEAD).read_text())
        index_bytes = (out / INDEX).stat().st_size
    except (OSError, ValueError):
        return None
    same = {
        "format": _IndexColumns.FORMAT,
        "index_bytes": index_bytes,
        "num_samples": tally.samples,
        "meta": json.loads(json.dumps(meta)),  # as head.json holds it
        "skipped": tally.skips.counts(),
        "report": tally.skips.report(),
    }
    if not isinstance(head, dict) or any(head.get(key) != value for key, value in same.items()):
        return None
    return _index_summary(out, tally)


# --------------------------------------------------------------------------------------------------
# Reading


def _finished_index(latents_dir: str | Path) -> Path:
    """The INDEX of the cache in ``latents_dir``; refused where there is none (not a cache, or one whose
    cache-latents has not run to the end)."""
    if not latents_dir:
        raise ConfigError(
            "data.source=latents needs data.latents_dir (a folder written by `fusedit cache-latents`)"
        )
    path = Path(latents_dir) / INDEX
    if not path.is_file():
        raise ConfigError(
            f"data.latents_dir={str(latents_dir)!r} has no {INDEX}: write it with `fusedit cache-latents "
            f"CONFIG --out {latents_dir}` first (an interrupted cache-latents writes it when rerun to "
            "the end)"
        )
    return path


def read_index(latents_dir: str | Path) -> dict:
    # cache-latents writes the index last, from the shard records, so a rerun to the end writes it anew.
    return read_json(_finished_index(latents_dir), _rerun(latents_dir))


def read_meta(latents_dir: str | Path) -> dict:
    """The meta of the finished cache in ``latents_dir``, from its small META (the whole INDEX is ~300 MB
    of JSON per 1M samples, parsed in 6-8 s to a peak of +1 GB); for a cache copied without its META, from
    its columns' head, else from INDEX. Refused like ``read_index`` where the cache is unfinished."""
    index = _finished_index(latents_dir)
    meta = index.with_name(META)
    if not meta.is_file():
        columns = _IndexColumns.read(latents_dir)
        return columns[0]["meta"] if columns else read_index(latents_dir)["meta"]
    # The same record as the index's "meta" (cache-latents writes both from one dict); a rerun writes META
    # first, with only what _check_meta accepts as the same cache.
    return read_json(meta, COPY_CACHE_AGAIN)


# What mends a damaged file of a cache: the meta and shard records are read by a rerun too.
COPY_CACHE_AGAIN = "a damaged copy? copy the cache again"


def _rerun(out) -> str:
    """What mends a damaged index of the cache in ``out``: written last, from the shard records, a rerun to
    the end writes it anew."""
    return f"{COPY_CACHE_AGAIN}, or rerun `fusedit cache-latents CONFIG --out {out}`"


def check_latents(data_cfg: DataConfig, vae_cfg: VAEConfig) -> None:
    """Raise ConfigError when the cache in data.latents_dir was made with another VAE (_vae_change: the
    same one moved is accepted) or image size."""
    meta = read_meta(data_cfg.latents_dir)
    where = f"data.latents_dir={data_cfg.latents_dir!r}"
    # The VAE's identity (a fingerprint of its weights) only where the cache recorded one to compare.
    now = _vae_identity(vae_cfg) if meta.get("vae_identity") else None
    change = _vae_change(meta, as_json_reads_back(dataclasses.asdict(vae_cfg)), now, where)
    if change:
        raise ConfigError(f"{where} was encoded with {change[0]}, but {change[1]}")
    cached_size = meta["data"]["image_size"]
    if not meta["data"].get("buckets") and cached_size != data_cfg.image_size:
        raise ConfigError(
            f"data.latents_dir={data_cfg.latents_dir!r} holds {cached_size} px images, "
            f"but data.image_size={data_cfg.image_size}"
        )


def _open_files_cap() -> int:
    """How many shard files a reader keeps open: a random epoch order over thousands of shards reopened one
    for almost every sample with 8 (0.81 ms a read against 0.021 ms from an open one). A quarter of the
    open-file limit at most, leaving the rest to the process (an open shard is a memory map; safetensors
    0.8 keeps no descriptor for it, but a later version or a network file system may)."""
    try:
        import resource
    except ImportError:  # Windows: no such limit to share
        return 256
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return 256 if soft == resource.RLIM_INFINITY else max(1, min(256, soft // 4))


def _columns_stamp(latents_dir: str | Path) -> tuple[int, int]:
    """Which writing of the index's columns ``latents_dir`` holds: its head's inode and modification time."""
    stat = (Path(latents_dir) / COLUMNS / _IndexColumns.HEAD).stat()
    return stat.st_ino, stat.st_mtime_ns


# The tables LatentDataset maps from the index's columns (_from_columns): not pickled (__getstate__).
_MAPPED = ("ids", "captions", "positions", "shard_of")


class LatentDataset(PlannedDataset):
    """The cached latents (module docstring). ``len`` = cached samples; sample i = i-th by position.

    What it keeps per sample is packed: ids and captions (a JSON list each) as ``PackedStrings``, position,
    shard and shape group as numpy arrays; all but the groups are the index's columns (``_IndexColumns``),
    memory-mapped, where the cache has them, else packed as INDEX is parsed. Measured at 1M samples (ids and
    captions of ~45 and ~60 characters): as a list of dicts it held 930 MB, and a forked DataLoader worker
    copied 533 MB of it by reading every entry (288 MB by one GC pass alone: reference counts and GC
    headers written into shared pages); packed, it holds about 200 MB and a worker copies none of it; from
    the columns, parsing INDEX's peak (~1.5 GB) is gone too, and the ranks of a machine share the 200 MB."""

    def __init__(self, latents_dir: str | Path, seed: int = 0, caption_pick: str = "random"):
        _finished_index(latents_dir)  # the mark of a finished cache, with or without columns
        self.dir = Path(latents_dir)
        self.seed, self.caption_pick = seed, caption_pick
        columns = _IndexColumns.read(latents_dir)
        shape_of, shapes = (
            self._from_columns(*columns, latents_dir) if columns else self._from_index(latents_dir)
        )
        # Groups numbered in sorted shape order, as the plan names them.
        self.shapes = sorted(shapes)
        rank = np.array([self.shapes.index(shape) for shape in shapes], dtype=np.int32)
        self.group_of = rank[shape_of]
        # Columns mapped as they are (a stamp): a spawned DataLoader worker maps them again (__getstate__), the
        # same files (a rerun that writes the index replaces them: another inode); None when not mapped.
        self._stamp = _columns_stamp(latents_dir) if columns is not None else None
        if np.any(self.positions[1:] < self.positions[:-1]):  # cache-latents writes them in position order
            self._stamp = None
            order = np.argsort(self.positions, kind="stable")
            self.ids = PackedStrings(self.ids[int(k)] for k in order)
            self.captions = PackedStrings(self.captions[int(k)] for k in order)
            self.positions, self.shard_of = self.positions[order], self.shard_of[order]
            self.group_of = self.group_of[order]
        self._handles: OrderedDict[int, Any] = OrderedDict()  # shard -> open file, least recently read first
        self._pid: int | None = None
        self._cap = _open_files_cap()

    def _none_held(self, latents_dir: str | Path) -> ConfigError:
        return ConfigError(f"data.latents_dir={str(latents_dir)!r} holds no samples ({self.report})")

    def _from_columns(
        self, head: dict, arrays: dict[str, np.ndarray], latents_dir: str | Path
    ) -> tuple[np.ndarray, list[tuple]]:
        """The tables from the index's columns, as they are (mapped); returns (each sample's shape, (n,)
        into the shapes in order of appearance, those shapes)."""
        self.meta, self.report = head["meta"], head.get("report", "")
        if not head["num_samples"]:
            raise self._none_held(latents_dir)
        self.ids = PackedStrings.of_arrays(arrays["ids.data"], arrays["ids.ends"])
        self.captions = PackedStrings.of_arrays(arrays["captions.data"], arrays["captions.ends"])
        self.positions, self.shard_of = arrays["positions"], arrays["shards"]
        self.shards = PackedStrings(head["shard_files"])
        return arrays["shapes"], [tuple(shape) for shape in head["shapes"]]

    def _from_index(self, latents_dir: str | Path) -> tuple[np.ndarray, list[tuple]]:
        """The tables from INDEX (a cache made before its columns), packed as it is parsed; returns as
        ``_from_columns``."""
        index = read_index(latents_dir)
        self.meta = index["meta"]
        self.report = index.get("report", "")
        samples = index.pop("samples")
        del index
        if not samples:
            raise self._none_held(latents_dir)
        n = len(samples)
        ids, captions = Packer(), Packer()
        self.positions = np.empty(n, dtype=np.int64)  # (n,): the sample's position, also its tensor's key
        self.shard_of = np.empty(n, dtype=np.int32)  # (n,): into self.shards
        shape_of = np.empty(n, dtype=np.int32)  # (n,): into shapes, in order of appearance
        shards: dict[str, int] = {}
        shapes: dict[tuple[int, ...], int] = {}
        for k, sample_id in enumerate(list(samples)):
            entry = samples.pop(sample_id)  # each dict freed as it is packed: no second copy at the peak
            ids.append(sample_id)
            captions.append(json.dumps(entry["captions"]))
            self.positions[k] = entry["position"]
            self.shard_of[k] = shards.setdefault(entry["shard"], len(shards))
            shape_of[k] = shapes.setdefault(tuple(entry["shape"]), len(shapes))
        self.ids, self.captions = ids.packed(), captions.packed()
        # One name per shard file (N / shard_size), packed too: the parsed names, kept, would each pin a
        # block of the freed parse's memory (1000 names held 1 GB of it in RSS at 1M samples).
        self.shards = PackedStrings(shards)
        return shape_of, list(shapes)

    def __len__(self) -> int:
        return len(self.positions)

    def __getstate__(self) -> dict:
        # Open safetensors handles cannot be pickled (DataLoader workers under "spawn"); workers reopen.
        state = {**self.__dict__, "_handles": OrderedDict(), "_pid": None}
        if self._stamp is not None:
            # A spawned worker (macOS; forkserver, Linux's default from Python 3.14) maps the columns again
            # rather than receive a copy of them in the pickle: ~1.2 GB per worker at 10M samples.
            for name in _MAPPED:
                del state[name]
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        if self._stamp is None:
            return
        # The stamp first: columns written anew are refused before read() warns of anything in them.
        columns = _IndexColumns.read(self.dir) if _columns_stamp(self.dir) == self._stamp else None
        if columns is None:
            raise ConfigError(
                f"data.latents_dir={str(self.dir)!r} was written anew while training read it (a DataLoader "
                "worker found another index than the run's); allowed: a cache that stays as it is while a run "
                "reads it"
            )
        self._from_columns(*columns, self.dir)

    def groups(self) -> tuple[np.ndarray | None, list[str]]:
        """A group per latent shape, so every batch holds one shape (None when all shapes agree), and each
        group's name."""
        names = ["latents " + "x".join(map(str, shape)) for shape in self.shapes]
        if len(self.shapes) == 1:
            return None, names
        return self.group_of, names  # int32, as StepPlan keeps them: no copy

    def sample_id(self, i: int) -> str:
        return self.ids[i]

    def _handle(self, shard: int) -> Any:
        if self._pid != os.getpid():
            # File handles are per process: a forked DataLoader worker opens its own (the parent's dict is
            # dropped, not closed: closing would unmap nothing of the parent's, which keeps its own).
            self._handles, self._pid = OrderedDict(), os.getpid()
        handle = self._handles.get(shard)
        if handle is not None:
            self._handles.move_to_end(shard)
            return handle
        while len(self._handles) >= self._cap:
            self._handles.popitem(last=False)[1].__exit__(None, None, None)  # the least recently read
        handle = self._handles[shard] = safe_open(str(self.dir / self.shards[shard]), framework="pt")
        return handle

    def load(self, i: int, epoch: int, group: int) -> dict:
        position = int(self.positions[i])
        # cache-latents keys every tensor by its sample's position (_encode_shard).
        latent = self._handle(int(self.shard_of[i])).get_tensor(str(position)).float()
        captions = json.loads(self.captions[i])
        caption = pick_caption(captions, self.caption_pick, self.seed, epoch, position)
        return {"latent": latent, "caption": caption, "index": position, "id": self.ids[i]}

    def skipped_report(self) -> str:
        """What was skipped when the cache was made."""
        return self.report
