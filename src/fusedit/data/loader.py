"""Batches addressed by training step, so a resumed run reads exactly the samples it would have read.

``step_loader(cfg, seed, batch_size, start_step, end_step, rank=, world_size=, state=)`` yields one batch
per step in [start_step, end_step): ``{"image": (B, 3, H, W) in [-1, 1], "caption": [str], "index":
LongTensor, "id": [str]}`` (``"latent"`` instead of ``"image"`` for ``data.source=latents``). Every rank
yields exactly ``end_step - start_step`` batches (sources repeat in epochs, never run dry), so distributed
ranks never wait on one another at an epoch end.

Index-addressable sources (shapes, folder, hf without streaming, latents) need no state. Step s reads
global batch s, positions [s * G, (s + 1) * G) of an endless sequence of epochs (G = B x world_size, B the
per-rank batch), each epoch a permutation of the dataset by (seed, epoch) (shapes keeps its historical
unpermuted order: its samples are random already); rank r reads its rows [r * B, (r + 1) * B) of it. With
aspect-ratio buckets an epoch is instead a list of single-bucket global batches: each bucket's samples in
permuted order, cut into batches of G (the last one wrapping around), the batches shuffled by (seed,
epoch); step s reads batch s mod K of epoch s // K (K is the same every epoch). Either way, how a global
batch is split over processes does not change which samples it holds. Their ``loader.state_dict()``
carries the skip counts and the dataset's size: resumed onto a dataset of another size (images added or
removed), the epochs are permutations of the new size, so the resume warns that the current epoch's order
is a new one. Without buckets it carries the position too (the samples read): a run resumed at another
global batch (``resplit_state``) reads on from there, step s at position + (s - start) * G.

Streams (webdataset, hf with streaming) have a position instead: ``loader.state_dict()`` after a step is
what ``step_loader(..., start_step=that step, state=...)`` continues from exactly. Without a state a stream
is fast-forwarded by reading and decoding every sample before ``start_step`` (exact, but slow).

A sample that cannot be used (missing, corrupt, tiny, no caption) is replaced by one of the next epoch's
order (the same bucket's with buckets) that is not in the same global batch (``fusedit.data.plan``), so
batches are always full, without one image twice, and the replacement is deterministic; the skip is
counted, and ``loader.skipped_report()`` summarises the counts by reason (``fusedit.data.skips``: the
state's ``"skips"`` keep every skipped id with its detail, which ``skipped_jsonl`` lists; under torchrun,
the skips found while planning the data, which every rank finds alike, are counted by rank 0 alone, so the
ranks' states add up to the run's, and ``merged_skip_report`` sums the ranks' ``loader.skipped_tally()``).
Rank 0 warns once, early, when more than a fifth of the data looks unusable (``SkipWatch``). When no usable
sample is left (every one skipped), reading raises a ConfigError with the counts.

A caption whose bytes are not UTF-8 reads with U+FFFD and is warned about once per data-loading process
(``NOT_UTF8``). Each sample carries the names of such captions its reading met (``NOT_UTF8.scope()`` around
it, in whichever worker process or thread read it), ``collate`` puts them into the batch's "not_utf8", and
the loader sums them into ``loader.not_utf8`` (a ``NotUTF8Count``), which the training loop reports at the
end of each stage. A latent cache's captions were decoded (and counted) when it was made: none here.
Caption dropout is not applied here: the training loop does it from its per-step generator.
"""

from __future__ import annotations

import contextlib
import logging
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from itertools import islice
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from fusedit.config import ConfigError, DataConfig, VAEConfig, check_data_locations
from fusedit.data.plan import CatalogItems, PlanBatches, PlannedDataset, ShapesItems, StepPlan, check_rank
from fusedit.data.skips import NotUTF8Count, SkipCounter, SkipWatch, merged_skips, no_usable_samples, warn
from fusedit.data.transforms import NOT_UTF8, SampleDecoder, SkipSample, StreamRecord
from fusedit.files import counted

log = logging.getLogger(__name__)

STREAM_SOURCES = ("webdataset",)
# Image headers read in parallel when planning buckets (I/O bound: threads, not processes).
_HEADER_THREADS = 16
# Header reads queued at most at once: enough to keep the threads busy, bounded whatever the dataset's size.
_HEADER_AHEAD = 4096


def is_stream(cfg: DataConfig) -> bool:
    """Whether ``cfg`` reads a stream (position in a state dict) rather than an index-addressable set."""
    return cfg.source in STREAM_SOURCES or (cfg.source == "hf" and cfg.hf_streaming)


# --------------------------------------------------------------------------------------------------
# Building sources


def check_data_paths(cfg: DataConfig, vae_cfg: VAEConfig) -> None:
    """The checks of a data source that read nothing big (its paths, a latent cache's index, a local Hugging
    Face dataset's split and columns from its metadata): made before a run makes its folder and builds its
    model, so that a mistyped folder fails at once rather than after an LLM has loaded."""
    check_data_locations(cfg)
    if cfg.source == "folder":
        from fusedit.data.folder import check_folder_paths

        check_folder_paths(cfg.root, cfg.index_file)
    elif cfg.source == "latents":
        from fusedit.data.latents import check_latents

        check_latents(cfg, vae_cfg)
    elif cfg.source == "webdataset":
        from fusedit.data.webdataset_source import shard_lists

        shard_lists(cfg.shards, cfg.weights)  # every shard a pattern names must exist
    elif cfg.source == "hf":
        from fusedit.data.hf import check_hf_source

        check_hf_source(cfg)


def build_catalog(cfg: DataConfig, progress: bool = False) -> Any:
    """The index-addressable catalog of a folder, hf (map-style) or webdataset (all shards) source;
    ``progress`` shows a bar while a folder is scanned or the shards' headers are read."""
    if cfg.source == "folder":
        from fusedit.data.folder import FolderCatalog

        return FolderCatalog(
            cfg.root, cfg.index_file, cfg.image_field, keep_fields=cfg.caption_fields, progress=progress
        )
    if cfg.source == "hf":
        from fusedit.data.hf import HFCatalog

        return HFCatalog(cfg)
    if cfg.source == "webdataset":
        from fusedit.data.webdataset_source import WebDatasetCatalog, shard_lists

        datasets, _ = shard_lists(cfg.shards, cfg.weights)
        return WebDatasetCatalog(datasets, cfg.caption_fields, cfg.image_field, progress=progress)
    raise ConfigError(f"data.source={cfg.source!r} has no image catalog (allowed: folder, hf, webdataset)")


def bucket_groups(
    catalog: Any,
    decoder: SampleDecoder,
    progress: bool = False,
    *,
    rank: int = 0,
    world_size: int = 1,
    gather: Callable[[Any], list] | None = None,
) -> tuple[np.ndarray, list]:
    """Each sample's bucket from its size (-1 when unusable), and the skips found on the way.

    Planning needs every sample's size before the first batch; the captions are checked in the same pass
    so that unusable samples are left out of the plan rather than replaced batch by batch. Sizes come from
    the catalog when it knows them (index columns), otherwise from the image headers (pixels not decoded):
    ``progress`` shows a bar, as millions of headers on a network file system take a while.

    With ``gather`` (an all-gather of a picklable object over the ``world_size`` processes, in rank order)
    the pass is split: this rank checks its contiguous share of the samples, [N * rank // world_size,
    N * (rank + 1) // world_size), and the shares are exchanged as arrays, so every rank ends with the plan
    and skips one process finds alone, in 1/world_size of the time (10M headers: about 15 minutes alone),
    and the ranks no longer all read the same headers from the same disk at once.
    """
    check_rank(rank, world_size)
    n = len(catalog)
    split = gather is not None and world_size > 1
    start, stop = (n * rank // world_size, n * (rank + 1) // world_size) if split else (0, n)
    share = f", split over {world_size} processes (this one: {stop - start})" if split else ""
    log.info("checking %d samples to assign aspect-ratio buckets%s", n, share)
    if not split:
        groups, skipped = _bucket_share(catalog, decoder, start, stop, progress, "bucket images")
        return groups, [(reason, catalog.sample_id(i), detail) for i, reason, detail in skipped]
    try:
        groups, skipped = _bucket_share(
            catalog, decoder, start, stop, progress, f"bucket images (rank {rank}'s 1/{world_size})"
        )
        share = _packed_share(n, groups, skipped)
    except Exception:
        _fail_exchange(gather, world_size)
        raise
    return _joined_shares(catalog, gather(share), world_size)


def _fail_exchange(gather: Callable[[Any], list] | None, world_size: int) -> None:
    """Take part in bucket planning's exchange with a failure (None), for a rank that failed before its
    share was ready: the others, waiting in the exchange, fail too (PlanFailedElsewhere) rather than hang
    until torchrun stops them. Its own failure (a peer gone too) is dropped: the caller re-raises this rank's
    error, which says why."""
    if gather is not None and world_size > 1:
        with contextlib.suppress(Exception):
            gather(None)


class PlanFailedElsewhere(RuntimeError):
    """Another rank's share of a split bucket planning failed: that rank's own error says why (the train
    loop words this as another process's failure, in one line)."""


def _bucket_share(
    catalog: Any, decoder: SampleDecoder, start: int, stop: int, progress: bool, desc: str
) -> tuple[np.ndarray, list[tuple[int, str, str]]]:
    """Samples [start, stop)'s buckets (-1 when unusable), and (index, reason, detail) of the unusable."""
    groups = np.full(stop - start, -1, dtype=np.int32)  # StepPlan's dtype: no copy to narrow it
    skipped: list[tuple[int, str, str]] = []
    known = getattr(catalog, "sizes_known", None)
    with tqdm(total=stop - start, desc=desc, unit="img", disable=not progress, leave=False) as bar:
        if known is not None:
            results = _known_sizes(catalog, decoder, known, start, stop)
        else:
            results = _header_sizes(catalog, decoder, start, stop)
        for k, result in enumerate(results):
            bar.update(1)
            if isinstance(result, SkipSample):
                skipped.append((start + k, result.reason, result.detail))
            else:
                groups[k] = result
    return groups, skipped


def _packed_share(n: int, groups: np.ndarray, skipped: list[tuple[int, str, str]]) -> dict:
    """One rank's share of the plan as the exchange sends it: arrays, not a Python object per sample (10M
    samples over 8 ranks: 1.25M int8 buckets each), and the skips as indices, reason codes and details (the
    ids are the catalog's, which every rank holds). ``n``: the samples this rank's catalog holds."""
    reasons = sorted({reason for _, reason, _ in skipped})
    code = {reason: c for c, reason in enumerate(reasons)}
    return {
        "samples": n,
        # Buckets are few: int8 holds -1 and up to 127 of them (128 would wrap to -128, read as unusable).
        "groups": groups.astype(np.int8 if groups.max(initial=-1) <= np.iinfo(np.int8).max else np.int32),
        "at": np.array([i for i, _, _ in skipped], dtype=np.int64),
        "reason": np.array([code[r] for _, r, _ in skipped], dtype=np.int64),
        "reasons": reasons,
        "details": [detail for _, _, detail in skipped],
    }


def _joined_shares(catalog: Any, parts: list, world_size: int) -> tuple[np.ndarray, list]:
    """The whole plan from the ranks' ``_packed_share``s (rank order = sample order): buckets and skips."""
    if len(parts) != world_size:
        raise ValueError(
            f"gather returned {len(parts)} shares of the bucket plan, not world_size={world_size}"
        )
    failed = [r for r, part in enumerate(parts) if part is None]
    if failed:
        raise PlanFailedElsewhere(f"bucket planning failed on rank(s) {failed}: their log says why")
    sizes = [part["samples"] for part in parts]
    if len(set(sizes)) > 1:
        raise ConfigError(
            f"the processes see different data: their catalogs hold {sizes} samples (rank order); every rank "
            "must read the same data (was it being written to?)"
        )
    groups = np.concatenate([part["groups"] for part in parts]).astype(np.int32)
    events = [
        (part["reasons"][c], catalog.sample_id(i), detail)
        for part in parts
        for i, c, detail in zip(part["at"].tolist(), part["reason"].tolist(), part["details"])
    ]
    return groups, events


def _known_sizes(
    catalog: Any, decoder: SampleDecoder, known: Any, start: int, stop: int
) -> Iterator[int | SkipSample]:
    """Sample i's bucket, or why it is unusable, from the catalog's (N, 2) widths and heights, for i in
    [start, stop) in order.

    A plain loop: the work is pure Python (a row's captions), which threads only slow down under the GIL
    (1M index rows: 34 s and +1.7 GB peak through a 16-thread pool, 7 s and no extra peak like this).
    Size checks and buckets depend on the size alone, so they are worked out once per distinct size.
    """
    sizes = np.asarray(known, dtype=np.int64).reshape(-1, 2)[start:stop]  # (stop - start, 2): width, height
    distinct, which = np.unique(sizes, axis=0, return_inverse=True)
    per_size: list[int | SkipSample] = []
    for width, height in distinct.tolist():
        try:
            decoder.check_size(width, height)
            per_size.append(decoder.bucket_for(width, height))
        except SkipSample as e:
            per_size.append(e)
    for i, k in enumerate(which.reshape(-1).tolist(), start):
        try:
            fields, _ = catalog.record(i)
            decoder.captions(fields)
        except SkipSample as e:
            yield e
            continue
        yield per_size[k]


def _header_sizes(catalog: Any, decoder: SampleDecoder, start: int, stop: int) -> Iterator[int | SkipSample]:
    """Sample i's bucket, or why it is unusable, from its image header, for i in [start, stop) in order: the
    headers are read by ``_HEADER_THREADS`` threads (I/O bound) with at most ``_HEADER_AHEAD`` reads queued
    at once: a future per sample queued up front held about 1.7 KB each until the pass ended (100k headers:
    +170 MB peak and 10.7 s; this way +8 MB and 9.6 s; 10M: +17 GB)."""

    def bucket_of(i: int) -> int | SkipSample:
        try:
            fields, value = catalog.record(i)
            decoder.captions(fields)
            return decoder.bucket_for(*decoder.header(value))
        except SkipSample as e:
            return e

    with ThreadPoolExecutor(_HEADER_THREADS) as pool:
        indices = iter(range(start, stop))
        ahead = deque(pool.submit(bucket_of, i) for i in islice(indices, _HEADER_AHEAD))
        try:
            while ahead:
                result = ahead.popleft().result()
                following = next(indices, None)
                if following is not None:
                    ahead.append(pool.submit(bucket_of, following))
                yield result
        finally:
            # An error, Ctrl+C or a caller that stops early: the queued reads are dropped, not waited for
            # (up to _HEADER_AHEAD of them, seconds on a network file system); the running ones finish.
            for future in ahead:
                future.cancel()


def build_dataset(cfg: DataConfig, seed: int) -> Dataset:
    """The shapes world as a plain map-style dataset (item i = example i); kept for callers that index the
    procedural data directly. Real-data sources are read through :func:`step_loader`."""
    if cfg.source != "shapes":
        raise ConfigError(
            f"build_dataset is the shapes world only (data.source={cfg.source!r}); use step_loader"
        )
    from fusedit.data.shapes import ShapesDataset

    return ShapesDataset(
        size=cfg.image_size,
        length=cfg.num_samples,
        seed=seed,
        kinds=tuple(cfg.kinds),
        max_objects=cfg.max_objects,
    )


def planned_dataset(
    cfg: DataConfig,
    seed: int,
    batch_size: int,
    rank: int = 0,
    world_size: int = 1,
    progress: bool = False,
    offset: int = 0,
    gather: Callable[[Any], list] | None = None,
) -> tuple[PlannedDataset, list, int]:
    """(dataset over plan slots, skips found while building, the number of samples those are out of: the
    dataset's and those the catalog refused) for an index-addressable source; ``progress`` shows bars over
    the folder scan and the bucket planning; ``offset`` is StepPlan's; ``gather`` (an all-gather over the
    ranks, in rank order) splits bucket planning over them (``bucket_groups``); a rank whose catalog cannot
    be built takes part in that exchange with its failure, so the others raise PlanFailedElsewhere rather
    than wait, and then raises its own error."""
    if cfg.source == "shapes":
        shapes = build_dataset(cfg, seed)
        # Unpermuted: shapes examples are random already, and this keeps old runs' batches unchanged.
        plan = StepPlan(len(shapes), batch_size, seed, rank, world_size, shuffle=False, offset=offset)
        return ShapesItems(shapes, plan), [], len(shapes)
    if cfg.source == "latents":
        from fusedit.data.latents import LatentDataset

        latents = LatentDataset(cfg.latents_dir, seed=seed, caption_pick=cfg.caption_pick)
        groups, names = latents.groups()
        latents.plan = StepPlan(
            len(latents), batch_size, seed, rank, world_size, groups=groups, names=names, offset=offset
        )
        return latents, [], len(latents)
    decoder = SampleDecoder.from_config(cfg, seed)
    buckets = len(decoder.targets) > 1
    try:
        catalog = build_catalog(cfg, progress)
    except Exception:
        if buckets:  # the other ranks are waiting in bucket planning's exchange (bucket_groups)
            _fail_exchange(gather, world_size)
        raise
    events = list(getattr(catalog, "skipped", []))
    total = len(catalog) + len(events)
    groups = None
    if buckets:
        groups, found = bucket_groups(
            catalog, decoder, progress, rank=rank, world_size=world_size, gather=gather
        )
        events += found
        if (groups < 0).all():
            raise no_usable_samples(SkipCounter.of(events))
    names = [f"{w}x{h} px" for h, w in decoder.targets]
    plan = StepPlan(
        len(catalog), batch_size, seed, rank, world_size, groups=groups, names=names, offset=offset
    )
    return CatalogItems(catalog, decoder, plan), events, total


# --------------------------------------------------------------------------------------------------
# Loaders


def collate(items: list[dict]) -> dict:
    """A batch of dataset items: "image" (B, 3, H, W) and/or "latent" (B, C, h, w) stacked, "caption" and
    "id" lists, "index" (B,) long, "skipped" the samples skipped on the way, "not_utf8" the names of the
    captions read that are not UTF-8; or {"unusable": skips} when an item found no usable candidate
    (PlannedDataset)."""
    unusable = next((it["unusable"] for it in items if "unusable" in it), None)
    if unusable is not None:
        return {"unusable": unusable}
    out: dict[str, Any] = {}
    for name in ("image", "latent"):
        if name in items[0]:
            out[name] = torch.stack([it[name] for it in items])
    out["caption"] = [it["caption"] for it in items]
    out["index"] = torch.tensor([it["index"] for it in items], dtype=torch.long)
    out["id"] = [it.get("id", str(it["index"])) for it in items]
    out["skipped"] = [event for it in items for event in it.get("skipped", ())]
    out["not_utf8"] = [name for it in items for name in it.get("not_utf8", ())]
    return out


class IndexedStepLoader:
    """Step-addressed batches of an index-addressable source (a DataLoader over plan slots)."""

    def __init__(
        self,
        dataset,
        start_step,
        end_step,
        num_workers,
        skips: SkipCounter,
        watch: SkipWatch | None,
        planned: SkipCounter | None = None,
        not_utf8: NotUTF8Count | None = None,
    ):
        self.dataset, self.start_step, self.end_step = dataset, start_step, end_step
        self.not_utf8 = NotUTF8Count() if not_utf8 is None else not_utf8
        self.num_workers, self.skips, self.watch = num_workers, skips, watch
        # The skips found while planning the data (rank 0's ``skips`` count them too, and every rank's
        # saved before rank 0 alone did): the same in every process, so a summary over the processes counts
        # them once (``skipped_tally``).
        self.planned = planned
        self.step = start_step

    def __len__(self) -> int:
        return self.end_step - self.start_step

    def __iter__(self) -> Iterator[dict]:
        loader = DataLoader(
            self.dataset,
            batch_sampler=PlanBatches(self.dataset.plan, self.start_step, self.end_step),
            num_workers=self.num_workers,
            collate_fn=collate,
            persistent_workers=False,
            prefetch_factor=4 if self.num_workers else None,
            # The workers' base seed, which the data never reads (it draws from its own generators of the
            # seed): from a generator of its own, not torch's global one, which a caller (or another
            # thread's training) owns.
            generator=torch.Generator().manual_seed(0),
        )
        warn(self.watch)  # what building the plan found may be enough
        for step, batch in zip(range(self.start_step, self.end_step), loader):
            if "unusable" in batch:
                raise no_usable_samples(SkipCounter.of(batch["unusable"]))
            skipped = batch.pop("skipped")
            self.skips.add_all(skipped)
            self.not_utf8.add(batch.pop("not_utf8"))
            self.step, self._mark = step + 1, self.skips.mark()
            warn(self.watch, batch["id"], skipped)
            yield batch

    def state_dict(self) -> dict:
        """Position after the last yielded batch (index sources only need the step; the skip counts
        travel along so a resumed run's report covers the whole run, the size so a resume can tell that
        the dataset changed; without buckets the position, the samples read, so a resume at another global
        batch goes on after them; the count of captions not UTF-8 too, for the same reason as the skips)."""
        mark = getattr(self, "_mark", None)
        position = self.dataset.plan.position(self.step)
        return {
            "kind": "index",
            "step": self.step,
            "samples": len(self.dataset),
            **({} if position is None else {"position": position}),
            "skips": self.skips.state_dict(mark),
            "not_utf8": self.not_utf8.state_dict(),
        }

    def skipped_report(self) -> str:
        return self.skips.report()

    def skipped_tally(self) -> dict:
        """The skip counts to merge with the other processes' (``merged_skip_report``)."""
        return self.skips.tally(self.planned)


class _StreamBatcher:
    """Consumes a stream record by record (decoding in a thread pool, results taken in stream order so
    the outcome never depends on thread timing), keeps per-bucket pending samples and emits a batch when
    a bucket is full.

    Its state after a batch: the number of records consumed (``seq``), the seqs of pending samples, and
    the reader state before record ``from_seq`` = the oldest pending sample (or the last consumed record).
    Restoring re-reads records from ``from_seq`` (raw bytes only, no decoding except for the pending ones)
    up to ``seq``.
    """

    def __init__(self, reader, decoder: SampleDecoder, batch_size: int, workers: int, skips: SkipCounter):
        self.reader, self.decoder, self.batch_size = reader, decoder, batch_size
        self.workers, self.skips = workers, skips
        self.seq = 0
        self.pending: dict[int, list[tuple[int, dict, dict]]] = {}  # bucket -> [(seq, state before, item)]
        self.last: tuple[int, dict] | None = None  # (seq, state before) of the last consumed record
        # source -> [epoch, usable samples in it, whether this process read it from its start]: a source
        # whose whole epoch gave nothing usable would otherwise be read forever, a batch never filling.
        self.usable: dict[str, list] = {}

    def _decode(self, record: StreamRecord) -> dict | SkipSample:
        try:
            if record.error is not None:
                raise record.error
            # In a scope per record: records decode concurrently on the pool's threads.
            with NOT_UTF8.scope() as names:
                out = self.decoder(record.fields, record.image, key=record.key, epoch=record.epoch)
        except SkipSample as e:
            return e
        item = {
            "image": out.image,
            "caption": out.caption,
            "index": record.key,
            "id": record.id,
            "not_utf8": list(names),
        }
        return {"bucket": out.bucket, "item": item}

    def _records(self) -> Iterator[tuple[dict, StreamRecord]]:
        while True:
            before = self.reader.state_dict()
            yield before, self.reader.next()

    def _decoded(self) -> Iterator[tuple[dict, StreamRecord, Any]]:
        records = self._records()
        if self.workers == 0:
            for before, record in records:
                yield before, record, self._decode(record)
            return
        pool = ThreadPoolExecutor(self.workers)
        window: deque = deque()
        try:
            while True:
                while len(window) < 4 * self.workers:
                    before, record = next(records)
                    window.append((before, record, pool.submit(self._decode, record)))
                before, record, future = window.popleft()
                yield before, record, future.result()
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    def batches(self) -> Iterator[dict]:
        """Batches whose "skipped" are the skips met since the previous batch (already counted)."""
        skipped: list = []
        for before, record, result in self._decoded():
            seq = self.seq
            self.seq += 1
            self.last = (seq, before)
            self.skips.add_all(record.events)
            skipped += record.events
            self._count_usable(record, not isinstance(result, SkipSample))
            if isinstance(result, SkipSample):
                self.skips.add(result.reason, record.id, result.detail)
                skipped.append((result.reason, record.id, result.detail))
                continue
            bucket = self.pending.setdefault(result["bucket"], [])
            bucket.append((seq, before, result["item"]))
            if len(bucket) == self.batch_size:
                items = [item for _, _, item in bucket]
                self.pending[result["bucket"]] = []
                batch = collate(items)
                batch["skipped"], skipped = skipped, []
                yield batch

    def _count_usable(self, record: StreamRecord, usable: bool) -> None:
        seen = self.usable.get(record.source)
        if seen is None:
            # The first epoch met may start mid-way (a restored position): it is not judged.
            seen = self.usable[record.source] = [record.epoch, 0, False]
        elif record.epoch != seen[0]:
            if seen[2] and seen[1] == 0:
                raise no_usable_samples(self.skips, record.source)
            seen[:] = [record.epoch, 0, True]
        seen[1] += usable

    def state_dict(self) -> dict:
        marks = [(seq, before) for entries in self.pending.values() for seq, before, _ in entries]
        if self.last is not None:
            marks.append(self.last)
        if marks:
            from_seq, reader_state = min(marks, key=lambda m: m[0])
        else:
            from_seq, reader_state = self.seq, self.reader.state_dict()
        return {
            "seq": self.seq,
            "from_seq": from_seq,
            "reader": reader_state,
            "pending": {
                str(b): [seq for seq, _, _ in entries] for b, entries in self.pending.items() if entries
            },
        }

    def load_state_dict(self, state: dict) -> None:
        self.reader.load_state_dict(state["reader"])
        self.seq = int(state["from_seq"])
        self.pending, self.last = {}, None
        wanted = {int(s) for seqs in state["pending"].values() for s in seqs}
        end = int(state["seq"])
        while self.seq < end:
            before = self.reader.state_dict()
            record = self.reader.next()
            seq = self.seq
            self.seq += 1
            self.last = (seq, before)
            if seq in wanted:
                result = self._decode(record)
                if isinstance(result, SkipSample):
                    raise ConfigError(
                        f"restoring the data position: sample {record.id} decoded before but now fails "
                        f"({result.reason}: {result.detail}); the data changed since the state was saved"
                    )
                self.pending.setdefault(result["bucket"], []).append((seq, before, result["item"]))


class StreamStepLoader:
    """Step-addressed batches of a stream, with a restorable position (see the module docstring)."""

    def __init__(
        self,
        make_reader: Callable[[], Any],
        decoder,
        batch_size,
        start_step,
        end_step,
        workers,
        state,
        skips,
        watch: SkipWatch | None,
        count_skipped: bool = True,
        progress: bool = False,
        not_utf8: NotUTF8Count | None = None,
    ):
        self.make_reader, self.decoder, self.batch_size = make_reader, decoder, batch_size
        self.not_utf8 = NotUTF8Count() if not_utf8 is None else not_utf8
        self.start_step, self.end_step, self.workers = start_step, end_step, workers
        self.initial_state, self.skips, self.watch = state, skips, watch
        # Whether the skips met reading through the steps before start_step (without a state) count: for a
        # caller without a state they are those of the run; for a run resumed on another split of the
        # batch they are not (the old ranks' skips, in ``skips``, are).
        self.count_skipped, self.progress = count_skipped, progress
        self._state = state

    def __len__(self) -> int:
        return self.end_step - self.start_step

    def __iter__(self) -> Iterator[dict]:
        reader = self.make_reader()
        batcher = _StreamBatcher(reader, self.decoder, self.batch_size, self.workers, self.skips)
        if self.initial_state is not None:
            self.skips.load_state_dict(self.initial_state.get("skips", {}))
            batcher.load_state_dict(self.initial_state["stream"])
        batches = batcher.batches()
        try:
            if self.initial_state is None and self.start_step > 0:
                # A resume without the checkpoint's stream position (another split of the batch: the
                # training loop has said so; a library caller without ``state``). Info: not a problem itself.
                log.info(
                    "data stream: reading through the samples of the first %d steps to reach step %d",
                    self.start_step,
                    self.start_step,
                )
                if not self.count_skipped:
                    batcher.skips = SkipCounter()
                # Every sample is decoded (which ones are usable decides where a step's batch ends): steps x
                # batch decodes, long at scale.
                for _ in tqdm(
                    range(self.start_step),
                    desc="read stream to step",
                    unit="step",
                    disable=not self.progress,
                    leave=False,
                ):
                    passed = next(batches)
                    if self.count_skipped:  # like the skips met on the way
                        self.not_utf8.add(passed["not_utf8"])
                batcher.skips = self.skips
            for step in range(self.start_step, self.end_step):
                batch = next(batches)
                skipped = batch.pop("skipped")
                self.not_utf8.add(batch.pop("not_utf8"))
                self._state = {"kind": "stream", "step": step + 1, "stream": batcher.state_dict()}
                self._mark = self.skips.mark()
                warn(self.watch, batch["id"], skipped)
                yield batch
        finally:
            batches.close()
            reader.close()

    def state_dict(self) -> dict:
        """Position after the last yielded batch: pass it as ``state=`` with ``start_step=state["step"]``."""
        if self._state is None:
            raise RuntimeError("no position yet: state_dict() is available once a batch has been read")
        if self._state is self.initial_state:
            return self._state
        return {
            **self._state,
            "skips": self.skips.state_dict(self._mark),
            "not_utf8": self.not_utf8.state_dict(),
        }

    def skipped_report(self) -> str:
        return self.skips.report()

    def skipped_tally(self) -> dict:
        """The skip counts to merge with the other processes' (``merged_skip_report``): a stream plans
        nothing, every skip is of this process's reads."""
        return self.skips.tally()


def stream_reader_factory(cfg: DataConfig, seed: int, rank: int, world_size: int) -> Callable[[], Any]:
    if cfg.source == "webdataset":
        from fusedit.data.webdataset_source import WebDatasetReader, shard_lists

        datasets, weights = shard_lists(cfg.shards, cfg.weights)
        return lambda: WebDatasetReader(
            datasets,
            weights,
            seed=seed,
            rank=rank,
            world_size=world_size,
            caption_fields=cfg.caption_fields,
            image_field=cfg.image_field,
        )
    from fusedit.data.hf import HFStreamReader, _keep_columns, load_hf

    image_field = cfg.image_field or "image"
    load_hf(cfg, streaming=True)  # fail now, with a config error, rather than at the first batch
    return lambda: HFStreamReader(
        lambda: _keep_columns(load_hf(cfg, streaming=True), image_field, cfg.caption_fields),
        image_field=image_field,
        rank=rank,
        world_size=world_size,
    )


def _epoch_summary(cfg: DataConfig, dataset: PlannedDataset, total: int) -> str:
    """How many samples an epoch of an index-addressable source holds (of the ``total`` planned_dataset
    counts), where, and in how many buckets. With buckets the unusable samples are known already (planning
    read every header); without, they are found (and replaced) as batches meet them. An index file's count
    is of its rows, the unreadable ones (refused before any batch) included, as its skip warning counts."""
    place = {"folder": cfg.index_file or cfg.root, "hf": cfg.hf_path, "latents": cfg.latents_dir}.get(
        cfg.source
    )
    where = f"in {place!r}" if place else "of the procedural shapes world"
    plan = dataset.plan
    unit = _unit(cfg)
    if plan.groups is None:
        refused = total - len(dataset)
        noun = unit.removesuffix("s")  # counted adds the plural's s
        return f"{counted(total, noun)} {where}" + (f", {refused:,} of them unusable" if refused else "")
    buckets = len(plan.group_sizes)
    of = f"the {counted(total, 'row')}" if unit == "rows" else f"{total:,}"
    usable = counted(len(plan.members), "usable sample")
    return f"{usable} of {of} {where} ({buckets} bucket{'s' if buckets > 1 else ''})"


def _unit(cfg: DataConfig) -> str:
    """What the data's counts count: an index file's rows (a row that cannot be read is no sample, but
    counts among the unusable), or else samples."""
    return "rows" if cfg.source == "folder" and cfg.index_file else "samples"


def resplit_state(states: list[dict], global_batch: int) -> dict:
    """The data state a run resumes from on another split of the batch (another number of processes or
    per-process batch), from the loader states of the old run's ranks (``states``, in rank order: rank 0's
    alone will do for the new ranks other than 0) and the global batch it read at. The old ranks' positions
    cannot be mapped onto the new split; what carries over is the step, the dataset's size (to warn when it
    changed), the position of an index-addressable source without buckets (the samples read: from the step
    and ``global_batch`` where a state predates it) and every old rank's skipped samples, which the new
    rank 0 takes on (``step_loader``), so the run's skip report and list still cover the whole run; so does
    the old ranks' count of captions not UTF-8, summed."""
    first = states[0]
    step = int(first["step"])
    position = first.get("position", step * global_batch) if first.get("kind") == "index" else None
    return {
        "kind": "resplit",
        "step": step,
        **({"samples": first["samples"]} if "samples" in first else {}),
        **({} if position is None else {"position": int(position)}),
        "skips": [state.get("skips", {}) for state in states],
        "not_utf8": NotUTF8Count.of(state.get("not_utf8", {}) for state in states).state_dict(),
    }


def _say_resplit_position(plan: StepPlan, start_step: int, position: int | None) -> None:
    """Where a run resumed on another split of the batch goes on reading (rank 0 says it for all)."""
    at_step = start_step * plan.global_batch
    if position is None or position == at_step or plan.groups is None:
        log.info(
            "data: resumed on another split of the batch; reading goes on after the %d samples read before",
            plan.position(start_step) if plan.groups is None else at_step,
        )
        return
    # Buckets cut each epoch into batches of the global batch: another batch is another cut, which no
    # saved position maps onto.
    log.warning(
        "data: with aspect-ratio buckets a resume at another global batch (%d, not %d) goes on from the "
        "step: %d samples were read before it, step %d stands for %d at the new batch, so the current epoch "
        "%s",
        plan.global_batch,
        position // start_step,
        position,
        start_step,
        at_step,
        "may read some samples again" if at_step < position else "may leave some samples unread",
    )


def step_loader(
    cfg: DataConfig,
    seed: int,
    batch_size: int,
    start_step: int,
    end_step: int,
    *,
    rank: int = 0,
    world_size: int = 1,
    state: dict | None = None,
    skip_list: str = "",
    progress: bool = False,
    gather: Callable[[Any], list] | None = None,
) -> IndexedStepLoader | StreamStepLoader:
    """Batches for steps [start_step, end_step) of this rank (see the module docstring).

    ``state`` is a previous loader's ``state_dict()`` at ``start_step``: required for an exact and fast
    stream resume, optional for index-addressable sources (it carries the skip counts and the position).
    The skips found while planning the data are rank 0's alone (every rank finds them). A ``resplit_state``
    (a run resumed on another split of the batch) carries the old ranks' skips, which rank 0 takes on (the
    other ranks start without), and the position of an index-addressable source without buckets, which
    goes on after the samples read; a stream is read through from its start (the skips met doing so are not
    counted: the old ranks' are the run's). ``skip_list`` names the file the caller writes the skipped samples
    to (``skipped_jsonl``), for the early warning. ``progress`` shows bars over what is read before the first
    batch (rank 0's only). ``gather(obj)`` returns every rank's ``obj`` in rank order (an all-gather, called
    by every rank alike): given, the ranks split the reading of image headers that bucket planning does (each
    reads its share, all end with the same plan); without it every rank reads them all. The data layer takes
    it as a callable so that it never imports torch.distributed.
    """
    check_rank(rank, world_size)
    if state is not None and int(state.get("step", -1)) != start_step:
        raise ValueError(
            f"data state is for step {state.get('step')!r}, but the loader starts at step {start_step}"
        )
    resplit = state is not None and state.get("kind") == "resplit"
    skips = SkipCounter()
    # The count of captions not UTF-8 is part of the saved data state, as the skips are: a resumed run's
    # total covers the steps before the resume (a resplit one's old ranks' counts go to rank 0, like their
    # skips). A state saved before it was kept resumes at 0, the earlier steps' captions uncounted.
    not_utf8 = NotUTF8Count.of(
        [state.get("not_utf8", {})] if state is not None and (rank == 0 or not resplit) else []
    )
    if is_stream(cfg):
        if state is not None and not resplit and state.get("kind") != "stream":
            raise ConfigError(
                f"data state of kind {state.get('kind')!r} cannot resume data.source={cfg.source!r}"
            )
        if resplit and rank == 0:
            skips = merged_skips(state["skips"])
        decoder = SampleDecoder.from_config(cfg, seed)
        factory = stream_reader_factory(cfg, seed, rank, world_size)
        # Rank 0 warns for all: every rank reads its share of the same data.
        watch = SkipWatch(where=skip_list) if rank == 0 else None
        return StreamStepLoader(
            factory,
            decoder,
            batch_size,
            start_step,
            end_step,
            cfg.num_workers,
            None if resplit else state,
            skips,
            watch,
            count_skipped=not resplit,
            progress=progress and rank == 0,
            not_utf8=not_utf8,
        )
    position = None if state is None else state.get("position")
    # 0 at the global batch the position was saved at (the step gives it); another after a change of it.
    offset = 0 if position is None else int(position) - start_step * batch_size * world_size
    dataset, events, total = planned_dataset(
        cfg, seed, batch_size, rank, world_size, progress and rank == 0, offset, gather
    )
    if rank == 0:  # every rank plans the same dataset
        log.info("data: %s", _epoch_summary(cfg, dataset, total))
        if cfg.source == "latents" and cfg.crop != dataset.meta["data"].get("crop"):
            log.warning(
                "data.crop=%r has no effect with data.source=latents: the images in %r were cropped when "
                "they were cached (with data.crop=%r)",
                cfg.crop,
                cfg.latents_dir,
                dataset.meta["data"].get("crop"),
            )
    if state is not None:
        saved = state.get("samples")  # absent from states saved before it was recorded: nothing to check
        # Every rank sees the same dataset; the first says so for all.
        if rank == 0 and saved is not None and int(saved) != len(dataset):
            log.warning(
                "data: the dataset has %d samples, not the %d it had when the data position was saved; the "
                "run goes on at the same step in a new order of the %d, so the current epoch may repeat or "
                "miss samples read before the resume",
                len(dataset),
                int(saved),
                len(dataset),
            )
    if resplit and rank == 0:
        skips = merged_skips(state["skips"], events)
        _say_resplit_position(dataset.plan, start_step, position)
    elif state is not None and not resplit:
        skips.load_state_dict(state.get("skips", {}))
    elif rank == 0:
        # Planning finds the same skips on every rank (one catalog, one exchanged plan): rank 0 alone counts
        # them, so that the ranks' data states add up to the run's skips rather than hold a copy each.
        skips.add_all(events)
    # Bucket planning read every sample's header: all are checked; otherwise the rows a catalog refused.
    checked = total if dataset.plan.groups is not None else len(events)
    watch = SkipWatch(total, events, checked, skip_list, _unit(cfg)) if rank == 0 else None
    planned = SkipCounter.of(events)
    return IndexedStepLoader(dataset, start_step, end_step, cfg.num_workers, skips, watch, planned, not_utf8)
