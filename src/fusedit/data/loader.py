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
order (the same bucket's with buckets) that is not in the same global batch (``StepPlan.candidates``), so
batches are always full, without one image twice, and the replacement is deterministic; the skip is
counted, and ``loader.skipped_report()`` summarises the counts by reason (the state's ``"skips"`` keep
every skipped id with its detail, which ``skipped_jsonl`` lists; under torchrun, ``merged_skip_report``
sums the ranks' ``loader.skipped_tally()``, counting the skips found while planning the data, which every
rank finds alike, once). Rank 0 warns once, early, when more than a fifth of the data looks unusable
(``SkipWatch``). When no usable sample is left (every one skipped), reading raises a ConfigError with the
counts.
Caption dropout is not applied here: the training loop does it from its per-step generator.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm.auto import tqdm

from fusedit.config import ConfigError, DataConfig, VAEConfig, check_data_locations
from fusedit.data.transforms import SampleDecoder, SkipSample, StreamRecord, make_rng

log = logging.getLogger(__name__)

STREAM_SOURCES = ("webdataset",)
# Skipped samples the report shows per reason (every id is counted, and kept for the list of them).
_EXAMPLES = 3
# Image headers read in parallel when planning buckets (I/O bound: threads, not processes).
_HEADER_THREADS = 16
# The early warning about skipped samples (SkipWatch): above this share of the data. Scraped or exported
# image sets commonly lose a few percent to broken files, odd formats or thumbnails, which the report at the
# end of training covers; past a fifth the run learns from markedly less (and repeats it more often) than
# the data suggests, which is usually a setting (data.caption_fields, data.min_image_size) or a broken copy:
# worth saying at once rather than after the run.
_WARN_SHARE = 0.2
# The share of the distinct samples met in batches is judged as if at least this many (or all, when the data
# has fewer) had been met, the missing ones usable: one bad sample among the first three is then 1 in 50,
# not a third, and only more than 10 bad ones warn before 50 are met. Data that is 10% bad then warns by
# chance in about 2% of runs, 5% bad practically never (simulated); mostly bad data still warns within the
# first steps.
_WARN_MIN_TRIED = 50
# The share is judged over the first this many distinct samples met, then no longer tracked: the data's
# order is shuffled (but for an hf stream's), so they estimate it to about 1%, and tracking every id met
# would cost memory in proportion to the data. The end-of-training report and skipped list cover the run.
_WARN_WINDOW = 10_000


def is_stream(cfg: DataConfig) -> bool:
    """Whether ``cfg`` reads a stream (position in a state dict) rather than an index-addressable set."""
    return cfg.source in STREAM_SOURCES or (cfg.source == "hf" and cfg.hf_streaming)


def _check_rank(rank: int, world_size: int) -> None:
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(
            f"rank={rank}, world_size={world_size}: need world_size >= 1 and 0 <= rank < world_size"
        )


# --------------------------------------------------------------------------------------------------
# Skip accounting


def _shown(examples) -> str:
    """The first ``_EXAMPLES`` of (sample id, detail) pairs, for a report."""
    return "; ".join(f"{i}: {d}" if d else i for i, d in itertools.islice(examples, _EXAMPLES))


class SkipCounter:
    """Skipped samples by reason: distinct sample ids with the detail of why (kept for the run's list of
    skipped samples), and occurrences (a bad sample is met again every epoch, and by every batch slot
    whose candidates pass it).

    Everything only grows, in order (ids are kept in insertion-ordered dicts), so ``mark()`` is an O(1)
    snapshot that ``state_dict(mark)`` later expands into the exact state at that moment: loaders take a
    mark every step without copying every id each time.
    """

    def __init__(self) -> None:
        self.ids: dict[str, dict[str, str]] = {}  # reason -> {sample id: detail}, in the order first met
        self.times: dict[str, int] = {}

    def add(self, reason: str, sample_id: str, detail: str = "") -> None:
        self.times[reason] = self.times.get(reason, 0) + 1
        self.ids.setdefault(reason, {}).setdefault(sample_id, detail)

    def add_all(self, events) -> None:
        for event in events:
            self.add(*event)

    @classmethod
    def of(cls, events) -> SkipCounter:
        counter = cls()
        counter.add_all(events)
        return counter

    def counts(self) -> dict[str, int]:
        """Distinct skipped samples per reason."""
        return {reason: len(ids) for reason, ids in sorted(self.ids.items())}

    def total(self) -> int:
        return sum(len(ids) for ids in self.ids.values())

    def report(self) -> str:
        if not self.ids:
            return "skipped samples: none"
        parts = [
            f"{reason} {n} (e.g. {_shown(self.ids[reason].items())})" for reason, n in self.counts().items()
        ]
        times = sum(self.times.values())
        return f"skipped {self.total()} samples ({times} times): " + ", ".join(parts)

    def tally(self, shared: SkipCounter | None = None) -> dict:
        """The counts to merge with other processes' (``merged_skip_report``), apart for the skips of
        ``shared`` (those found while planning the data, which every process finds alike) and the others
        (this process's own reads): ``{"shared": share, "own": share}``, a share being ``{reason: {"ids":
        distinct ids, "times": occurrences, "examples": [[id, detail], ...]}}`` with the first
        ``_EXAMPLES`` ids. A planned skip counts among the shared ones where this counter holds it (a run
        resumed onto changed data holds the planning skips of its start): planning looks at each sample once
        (one occurrence), and the samples it leaves out are never read."""
        planned = {} if shared is None else shared.ids
        out: dict[str, dict] = {"shared": {}, "own": {}}
        for reason, ids in self.ids.items():
            common = [i for i in planned.get(reason, ()) if i in ids]
            if common:
                examples = [[i, ids[i]] for i in common[:_EXAMPLES]]
                out["shared"][reason] = {"ids": len(common), "times": len(common), "examples": examples}
            if len(ids) > len(common):
                known = set(common)
                own = ((i, d) for i, d in ids.items() if i not in known)
                out["own"][reason] = {
                    "ids": len(ids) - len(common),
                    "times": self.times[reason] - len(common),
                    "examples": [list(e) for e in itertools.islice(own, _EXAMPLES)],
                }
        return out

    def mark(self) -> dict[str, tuple[int, int]]:
        return {reason: (len(ids), self.times[reason]) for reason, ids in self.ids.items()}

    def state_dict(self, mark: dict[str, tuple[int, int]] | None = None) -> dict:
        mark = self.mark() if mark is None else mark
        return {
            "ids": {r: list(itertools.islice(self.ids[r], n)) for r, (n, _) in mark.items()},
            "details": {r: list(itertools.islice(self.ids[r].values(), n)) for r, (n, _) in mark.items()},
            "times": {r: t for r, (_, t) in mark.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        details = state.get("details")
        if details is None:  # saved before every detail was kept: those of the first few ids (the examples)
            details = {r: [d for _, d in ex] for r, ex in state.get("examples", {}).items()}
        self.ids = {
            r: dict(itertools.zip_longest(ids, details.get(r, [])[: len(ids)], fillvalue=""))
            for r, ids in state.get("ids", {}).items()
        }
        self.times = {r: int(n) for r, n in state.get("times", {}).items()}


def merged_skip_report(tallies: list[dict]) -> str:
    """The skips of several processes (each one's ``SkipCounter.tally``, in rank order) in one line: those
    found while planning the data, the same in every process, once; those each process met while reading its
    share, summed over the processes. Distinct ids are counted per process (no process holds the others'
    ids), so a sample two processes met (in different epochs) counts once in each: the line says so. The
    examples are the planned ones first, then each process's in rank order."""
    shared = tallies[0]["shared"]  # the same in every process
    own = [tally["own"] for tally in tallies]
    where = f"over the {len(tallies)} processes"
    reasons = sorted({*shared, *(reason for share in own for reason in share)})
    if not reasons:
        return f"skipped samples: none {where}"
    parts, planned, read, times = [], 0, 0, 0
    for reason in reasons:
        first = [shared[reason]] if reason in shared else []
        reads = [share[reason] for share in own if reason in share]
        planned += sum(share["ids"] for share in first)
        read += sum(share["ids"] for share in reads)
        times += sum(share["times"] for share in first + reads)
        examples: dict[str, str] = {}
        for share in first + reads:
            for sample_id, detail in share["examples"]:
                examples.setdefault(sample_id, detail)
        count = sum(share["ids"] for share in first + reads)
        parts.append(f"{reason} {count} (e.g. {_shown(examples.items())})")
    how = [f"{planned} found while planning the data, counted once"] if planned else []
    how += [f"{read} met while reading, counted in each process that met them"] if read else []
    return f"skipped {planned + read} samples ({times} times) {where} ({'; '.join(how)}): " + ", ".join(parts)


def skipped_jsonl(skips: dict) -> str:
    """The skipped samples of a loader state's ``"skips"``, one JSON object per line ({"id", "reason",
    "detail"}, the detail left out where none is known), by reason, each reason's in the order first met;
    "" when none was skipped."""
    lines = []
    for reason, ids in sorted(skips.get("ids", {}).items()):
        details = skips.get("details", {}).get(reason, [])
        for k, sample_id in enumerate(ids):
            detail = details[k] if k < len(details) else ""
            record = {"id": sample_id, "reason": reason, **({"detail": detail} if detail else {})}
            lines.append(json.dumps(record, ensure_ascii=False) + "\n")
    return "".join(lines)


class SkipWatch:
    """One early warning when a large share of the data cannot be used (the counts alone come at the end of
    training, by when every step has trained on the remainder).

    The share is this process's estimate. Of ``total`` samples, ``checked`` were judged before the first
    batch (rows a catalog read, and with buckets every sample, whose header planning read), the unusable
    ones among them ``known`` exactly; the fate of the others is estimated from the distinct samples met in
    batches, the share of them skipped. A stream's size is unknown (``total`` None): its share is that of
    the distinct samples read so far. The samples met are tracked over the first ``_WARN_WINDOW``.
    ``see()`` returns the warning's text once, then None. ``unit`` names what is counted: "rows" for an
    index file, whose unreadable rows count among the unusable (as _epoch_summary counts them).
    """

    def __init__(
        self, total: int | None = None, known=(), checked: int = 0, where: str = "", unit: str = "samples"
    ):
        self.total, self.checked, self.where, self.unit = total, checked, where, unit
        self.known = {sample_id: reason for reason, sample_id, *_ in known}
        unknown = None if total is None else total - len(self.known)
        self.min_tried = _WARN_MIN_TRIED if unknown is None else max(1, min(_WARN_MIN_TRIED, unknown))
        self.used: set[str] = set()
        self.skipped: dict[str, str] = {}  # sample id -> reason, met in batches
        self.done = False

    def see(self, used=(), skipped=()) -> str | None:
        """Take one batch's used sample ids and skip events; the warning's text when the share is first
        found above ``_WARN_SHARE``."""
        if self.done:
            return None
        self.used.update(used)
        for reason, sample_id, *_ in skipped:
            if sample_id not in self.known:
                self.skipped.setdefault(sample_id, reason)
        tried = len(self.used) + len(self.skipped)
        # As if the samples still missing to the minimum were usable (see _WARN_MIN_TRIED).
        if self._share(len(self.skipped) / max(tried, self.min_tried)) > _WARN_SHARE:
            self.done = True
            return self._message(tried)
        if tried >= _WARN_WINDOW:
            self.done = True  # judged: the sets are dropped (see _WARN_WINDOW)
            self.used, self.skipped = set(), {}
        return None

    def _share(self, met: float) -> float:
        """The data's share that cannot be used, given the share ``met`` of the samples met in batches."""
        if self.total is None:
            return met
        return (len(self.known) + (self.total - len(self.known)) * met) / max(1, self.total)

    def _message(self, tried: int) -> str:
        reasons: dict[str, int] = {}
        for reason in itertools.chain(self.known.values(), self.skipped.values()):
            reasons[reason] = reasons.get(reason, 0) + 1
        skipped = len(self.known) + len(self.skipped)
        counts = ", ".join(f"{r} {n}" for r, n in sorted(reasons.items()))
        share = self._share(len(self.skipped) / tried if tried else 0.0)
        if self.total is None:
            head = f"{skipped} of the {tried} {self.unit} read so far cannot be used ({counts}): {share:.0%}"
        else:
            tried = min(self.total, self.checked + tried)
            head = (
                f"{skipped} of the {tried} {self.unit} tried so far cannot be used ({counts}): about {share:.0%} "
                f"of the {self.total} in the data"
            )
        where = f"; every skipped id is listed in {self.where}" if self.where else ""
        return (
            f"data: {head} (warned above {_WARN_SHARE:.0%}); training goes on with the rest, repeating it "
            f"more often{where}"
        )


def _warn(watch: SkipWatch | None, used=(), skipped=()) -> None:
    message = None if watch is None else watch.see(used, skipped)
    if message:
        log.warning("%s", message)


def no_usable_samples(
    counter: SkipCounter, where: str = "", task: str = "left to fill a batch"
) -> ConfigError:
    """The error for data whose every sample was skipped (``where``: which of several mixed sources; ``task``:
    what the samples were for): the skip counts, and which setting to change for the reasons a setting can
    cause (no-caption, tiny)."""
    counts = counter.counts()
    hints = []
    if "no-caption" in counts:
        hints.append(
            "if the captions are under other fields, list them in data.caption_fields "
            '(e.g. [txt, json.caption] for a "caption" key in .json sidecars, or a column name)'
        )
    if "tiny" in counts:
        hints.append("lower data.min_image_size to keep smaller images")
    hint = f"; {'; '.join(hints)}" if hints else ""
    where = f" ({where} has none)" if where else ""
    return ConfigError(f"no usable sample {task}{where}; {counter.report()}{hint}")


# --------------------------------------------------------------------------------------------------
# Step plans for index-addressable sources


class StepPlan:
    """Which dataset positions fill each slot of the batch a rank reads at a step (module docstring).

    A slot is a tuple ``(epoch, group, position)``; ``candidates(slot)`` are the samples to try for it, in
    order (the later ones only when the earlier ones had to be skipped). ``groups`` gives each sample's
    bucket (-1: unusable, never planned); None means one group of every sample, addressed as one endless
    stream. ``names`` names each bucket for messages.
    """

    def __init__(
        self,
        n: int,
        batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        groups: np.ndarray | None = None,
        shuffle: bool = True,
        names: list[str] | None = None,
        offset: int = 0,
    ):
        _check_rank(rank, world_size)
        if n < 1:
            raise ValueError("cannot plan batches over an empty dataset")
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.rank, self.world_size, self.shuffle = rank, world_size, shuffle
        # Without buckets, step s reads from position offset + s * G: a run resumed at another global batch
        # goes on after the samples it has read (``position``), not at s times the new batch.
        self.offset = offset
        self.groups = None if groups is None else np.asarray(groups, dtype=np.int64)
        self.global_batch = batch_size * world_size  # every rank's rows of one step
        self._cache: dict[int, Any] = {}
        # The last global batch whose samples a replacement search needed (_own_batch): the slots of one
        # batch are searched one after another, and each would otherwise rebuild it (and, across an epoch's
        # end, evict and rebuild an epoch's order for it).
        self._own: tuple[tuple[int, int, int], set[int]] | None = None
        if self.groups is not None:
            self.members = np.flatnonzero(self.groups >= 0)
            if len(self.members) == 0:
                raise RuntimeError("no usable samples to plan batches over (every sample was skipped)")
            ids, sizes = np.unique(self.groups[self.members], return_counts=True)
            self.group_sizes = dict(zip(ids.tolist(), sizes.tolist()))
            # Global batches per epoch: every bucket's samples cut into batches of batch_size x world_size,
            # the last batch of a bucket wrapping around. A step's global batch is one bucket, each rank
            # reading its rows of it: so any split of the same global batch reads the same samples (1 x 8
            # and 2 x 4 alike, and a resume on another split goes on exactly), and no rank waits at a step
            # on another's larger images.
            self.batches_per_epoch = sum(math.ceil(s / self.global_batch) for s in self.group_sizes.values())
            small = [g for g, size in self.group_sizes.items() if size < self.global_batch]
            if small and rank == 0:
                log.warning(
                    "data: bucket(s) %s hold fewer usable samples than the global batch of %d: each of their "
                    "batches repeats samples (fewer buckets, or more data in them, avoid it)",
                    ", ".join(f"{names[g] if names else g} ({self.group_sizes[g]})" for g in small),
                    self.global_batch,
                )

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._cache:
            # Neighbouring epochs only: a slot's replacements come from the next. (A batch across an epoch's
            # end that needs one touches three: its own samples are found once per batch, _own_batch, so an
            # order is built again a few times an epoch, not once per skipped slot.)
            if len(self._cache) >= 2:
                self._cache.pop(next(iter(self._cache)))
            self._cache[epoch] = self._build(epoch)
        return self._cache[epoch]

    def _build(self, epoch: int) -> Any:
        if self.groups is None:
            return make_rng(self.seed, 0, epoch).permutation(self.n)
        order = self.members[make_rng(self.seed, 0, epoch).permutation(len(self.members))]
        lists = {g: order[self.groups[order] == g] for g in self.group_sizes}
        batches = [
            (g, c) for g, size in self.group_sizes.items() for c in range(math.ceil(size / self.global_batch))
        ]
        batches = [batches[i] for i in make_rng(self.seed, 6, epoch).permutation(len(batches))]
        return lists, batches

    def position(self, step: int) -> int | None:
        """The position of the endless sequence that ``step`` reads from (the samples read before it), or
        None with buckets, whose epochs are cut into batches of the global batch: addressed by step alone."""
        if self.groups is not None:
            return None
        return self.offset + step * self.global_batch

    def slots(self, step: int) -> list[tuple[int, int, int]]:
        b = self.batch_size
        if self.groups is None:
            first = self.position(step) + self.rank * b
            return [(-1, -1, first + j) for j in range(b)]
        epoch, t = divmod(step, self.batches_per_epoch)
        group, chunk = self._perm(epoch)[1][t]
        first = chunk * self.global_batch + self.rank * b
        return [(epoch, group, first + j) for j in range(b)]

    def _sample(self, epoch: int, group: int, position: int) -> int:
        """The dataset index at ``position`` of ``epoch``'s order (of ``group``'s, with buckets; wrapping)."""
        if self.groups is None:
            return int(self._perm(epoch)[position]) if self.shuffle else position
        members = self._perm(epoch)[0][group]
        return int(members[position % len(members)])

    def candidates(self, slot: tuple[int, int, int]) -> Iterator[tuple[int, int]]:
        """(dataset index, epoch) of the samples to try for ``slot``, in order: its own, then replacements
        from the next epoch's order (its bucket's, with buckets), never the next samples of this epoch's,
        which are the neighbour slots' (one image twice in a batch). Of the next epoch's places, first those
        congruent to the slot's column of the global batch modulo its size, from the slot's row on: the
        slots of one batch are in different columns, so they never draw the same replacement; then every
        other place from the slot's on; samples of the slot's own global batch are tried last. So a usable
        sample is found whenever one exists, and the order depends on the plan alone (not on which samples
        were found unusable): the batches are the same however they are split over ranks and resumes."""
        epoch, group, position = slot
        g = self.global_batch
        if self.groups is None:
            epoch, place = divmod(position, self.n)
            size, column = self.n, (position - self.offset) % g
        else:
            size = self.group_sizes[group]
            place, column = position % size, position % g
        yield self._sample(epoch, group, place), epoch
        mine = range(column, size, g)
        first = max(0, -(-(place - column) // g))  # the slot's row: its column's first place from its own on
        others = (q % size for q in range(place, place + size) if q % size % g != column)
        own, later = self._own_batch(slot), []
        for q in itertools.chain(mine[first:], mine[:first], others):
            i = self._sample(epoch + 1, group, q)
            if i in own:
                later.append(i)
            else:
                yield i, epoch + 1
        for i in later:
            yield i, epoch + 1

    def _own_batch(self, slot: tuple[int, int, int]) -> set[int]:
        """The dataset indices of the global batch ``slot`` belongs to (every rank's rows of its step)."""
        epoch, group, position = slot
        g = self.global_batch
        if self.groups is not None:
            first = position - position % g  # a bucket's batch: a chunk of g of its order
            key = (epoch, group, first)
            if self._own is None or self._own[0] != key:
                self._own = key, {self._sample(epoch, group, first + t) for t in range(g)}
            return self._own[1]
        first = position - (position - self.offset) % g
        key = (-1, group, first)
        if self._own is None or self._own[0] != key:
            self._own = key, {self._sample(p // self.n, group, p % self.n) for p in range(first, first + g)}
        return self._own[1]


class PlanBatches(Sampler[list]):
    """The batch sampler: the slots of each step in [start_step, end_step)."""

    def __init__(self, plan: StepPlan, start_step: int, end_step: int):
        self.plan, self.start_step, self.end_step = plan, start_step, end_step

    def __iter__(self) -> Iterator[list]:
        for step in range(self.start_step, self.end_step):
            yield self.plan.slots(step)

    def __len__(self) -> int:
        return self.end_step - self.start_step


class PlannedDataset(Dataset):
    """A map-style dataset indexed by plan slots: item = the first usable candidate of the slot, with the
    skips met on the way (so skips counted in worker processes reach the main process's counter), or
    ``{"unusable": skips}`` when no candidate is usable."""

    plan: StepPlan

    def sample_id(self, i: int) -> str:
        raise NotImplementedError

    def load(self, i: int, epoch: int, group: int) -> dict:
        """Item of sample ``i``; raises SkipSample when it cannot be used."""
        raise NotImplementedError

    def __getitem__(self, slot: tuple[int, int, int]) -> dict:
        # Per process (each DataLoader worker has its own): a sample found unusable is not opened again.
        # Its outcome cannot change within a run (the same file, caption fields and sizes), so the batches
        # are those without this shortcut. It starts empty in every loader: a run resumed after the files
        # were fixed reads them again.
        bad = self.__dict__.setdefault("_bad", {})
        skipped = []
        for i, epoch in self.plan.candidates(slot):
            if i in bad:
                skipped.append((bad[i][0], self.sample_id(i), bad[i][1]))
                continue
            try:
                item = self.load(i, epoch, slot[1])
            except SkipSample as e:
                bad[i] = (e.reason, e.detail)
                skipped.append((e.reason, self.sample_id(i), e.detail))
                continue
            item["skipped"] = skipped
            return item
        # Reported, not raised: this may run in a DataLoader worker, whose exceptions reach the main process
        # with the worker's whole traceback as their message. collate passes the report on and
        # IndexedStepLoader raises the one-line error.
        return {"unusable": skipped}


class ShapesItems(PlannedDataset):
    """The procedural shapes world behind a plan (it never skips)."""

    def __init__(self, dataset: Dataset, plan: StepPlan):
        self.dataset, self.plan = dataset, plan

    def __len__(self) -> int:
        return len(self.dataset)

    def sample_id(self, i: int) -> str:
        return str(i)

    def load(self, i: int, epoch: int, group: int) -> dict:
        item = dict(self.dataset[i])
        item["id"] = str(i)
        return item


class CatalogItems(PlannedDataset):
    """Decoded images of a catalog (folder, hf, webdataset index) behind a plan."""

    def __init__(self, catalog: Any, decoder: SampleDecoder, plan: StepPlan):
        self.catalog, self.decoder, self.plan = catalog, decoder, plan

    def __len__(self) -> int:
        return len(self.catalog)

    def sample_id(self, i: int) -> str:
        return self.catalog.sample_id(i)

    def load(self, i: int, epoch: int, group: int) -> dict:
        fields, image = self.catalog.record(i)
        bucket = group if len(self.decoder.targets) > 1 else None
        out = self.decoder(fields, image, key=i, epoch=epoch, bucket=bucket)
        return {"image": out.image, "caption": out.caption, "index": i, "id": self.catalog.sample_id(i)}


def collate(items: list[dict]) -> dict:
    """A batch of dataset items: "image" (B, 3, H, W) and/or "latent" (B, C, h, w) stacked, "caption" and
    "id" lists, "index" (B,) long, "skipped" the samples skipped on the way; or {"unusable": skips} when an
    item found no usable candidate (PlannedDataset)."""
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
    return out


# --------------------------------------------------------------------------------------------------
# Building sources


def check_data_paths(cfg: DataConfig, vae_cfg: VAEConfig) -> None:
    """The checks of a data source that read nothing big (its paths, a latent cache's index): made before a
    run builds its model, so that a mistyped folder fails at once rather than after an LLM has loaded."""
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


def bucket_groups(catalog: Any, decoder: SampleDecoder, progress: bool = False) -> tuple[np.ndarray, list]:
    """Each sample's bucket from its size (-1 when unusable), and the skips found on the way.

    Planning needs every sample's size before the first batch; the captions are checked in the same pass
    so that unusable samples are left out of the plan rather than replaced batch by batch. Sizes come from
    the catalog when it knows them (index columns), otherwise from the image headers (pixels not decoded):
    ``progress`` shows a bar, as millions of headers on a network file system take a while.
    """
    n = len(catalog)
    groups = np.full(n, -1, dtype=np.int64)
    events: list = []
    known = getattr(catalog, "sizes_known", None)

    def size_of(i: int):
        try:
            fields, value = catalog.record(i)
            decoder.captions(fields)
            if known is not None:
                width, height = int(known[i][0]), int(known[i][1])
                decoder.check_size(width, height)
                return width, height
            return decoder.header(value)
        except SkipSample as e:
            return e

    log.info("checking %d samples to assign aspect-ratio buckets", n)
    with (
        ThreadPoolExecutor(_HEADER_THREADS) as pool,
        tqdm(total=n, desc="bucket images", unit="img", disable=not progress, leave=False) as bar,
    ):
        for i, result in enumerate(pool.map(size_of, range(n))):
            bar.update(1)
            if isinstance(result, SkipSample):
                events.append((result.reason, catalog.sample_id(i), result.detail))
            else:
                groups[i] = decoder.bucket_for(*result)
    return groups, events


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
) -> tuple[PlannedDataset, list, int]:
    """(dataset over plan slots, skips found while building, the number of samples those are out of: the
    dataset's and those the catalog refused) for an index-addressable source; ``progress`` shows bars over
    the folder scan and the bucket planning; ``offset`` is StepPlan's."""
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
    catalog = build_catalog(cfg, progress)
    decoder = SampleDecoder.from_config(cfg, seed)
    events = list(getattr(catalog, "skipped", []))
    total = len(catalog) + len(events)
    groups = None
    if len(decoder.targets) > 1:
        groups, found = bucket_groups(catalog, decoder, progress)
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
    ):
        self.dataset, self.start_step, self.end_step = dataset, start_step, end_step
        self.num_workers, self.skips, self.watch = num_workers, skips, watch
        # The skips found while planning the data (``skips`` counts them too): the same in every process,
        # so a summary over the processes counts them once (``skipped_tally``).
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
        _warn(self.watch)  # what building the plan found may be enough
        for step, batch in zip(range(self.start_step, self.end_step), loader):
            if "unusable" in batch:
                raise no_usable_samples(SkipCounter.of(batch["unusable"]))
            skipped = batch.pop("skipped")
            self.skips.add_all(skipped)
            self.step, self._mark = step + 1, self.skips.mark()
            _warn(self.watch, batch["id"], skipped)
            yield batch

    def state_dict(self) -> dict:
        """Position after the last yielded batch (index sources only need the step; the skip counts
        travel along so a resumed run's report covers the whole run, the size so a resume can tell that
        the dataset changed; without buckets the position, the samples read, so a resume at another global
        batch goes on after them)."""
        mark = getattr(self, "_mark", None)
        position = self.dataset.plan.position(self.step)
        return {
            "kind": "index",
            "step": self.step,
            "samples": len(self.dataset),
            **({} if position is None else {"position": position}),
            "skips": self.skips.state_dict(mark),
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
            out = self.decoder(record.fields, record.image, key=record.key, epoch=record.epoch)
        except SkipSample as e:
            return e
        item = {"image": out.image, "caption": out.caption, "index": record.key, "id": record.id}
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
    ):
        self.make_reader, self.decoder, self.batch_size = make_reader, decoder, batch_size
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
                    next(batches)
                batcher.skips = self.skips
            for step in range(self.start_step, self.end_step):
                batch = next(batches)
                skipped = batch.pop("skipped")
                self._state = {"kind": "stream", "step": step + 1, "stream": batcher.state_dict()}
                self._mark = self.skips.mark()
                _warn(self.watch, batch["id"], skipped)
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
        return {**self._state, "skips": self.skips.state_dict(self._mark)}

    def skipped_report(self) -> str:
        return self.skips.report()

    def skipped_tally(self) -> dict:
        """The skip counts to merge with the other processes' (``merged_skip_report``): a stream plans
        nothing, every skip is of this process's reads."""
        return self.skips.tally()


def _stream_reader_factory(cfg: DataConfig, seed: int, rank: int, world_size: int) -> Callable[[], Any]:
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
        return f"{total:,} {unit} {where}" + (f", {refused:,} of them unusable" if refused else "")
    buckets = len(plan.group_sizes)
    of = f"the {total:,} rows" if unit == "rows" else f"{total:,}"
    return (
        f"{len(plan.members):,} usable samples of {of} {where} ({buckets} bucket{'s' if buckets > 1 else ''})"
    )


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
    rank 0 takes on (``step_loader``), so the run's skip report and list still cover the whole run."""
    first = states[0]
    step = int(first["step"])
    position = first.get("position", step * global_batch) if first.get("kind") == "index" else None
    return {
        "kind": "resplit",
        "step": step,
        **({"samples": first["samples"]} if "samples" in first else {}),
        **({} if position is None else {"position": int(position)}),
        "skips": [state.get("skips", {}) for state in states],
    }


def merged_skips(skip_states: list[dict], planned=()) -> SkipCounter:
    """The skip records of several ranks (their loader states' ``"skips"``, in rank order) as one: each
    reason's ids in rank order, each once, and their occurrences summed, but for the ``planned`` skips
    (found while planning the data, which every rank counted once): those count once, as in a run on one
    process. The ids a run on one process would hold, but listed rank by rank, not in the order met."""
    counters = []
    for state in skip_states:
        counter = SkipCounter()
        counter.load_state_dict(state)
        counters.append(counter)
    merged = SkipCounter()
    for counter in counters:
        for reason, ids in counter.ids.items():
            for sample_id, detail in ids.items():
                merged.ids.setdefault(reason, {}).setdefault(sample_id, detail)
            merged.times[reason] = merged.times.get(reason, 0) + counter.times.get(reason, 0)
    for reason, sample_id, *_ in planned:
        holders = sum(sample_id in counter.ids.get(reason, {}) for counter in counters)
        if holders > 1:
            merged.times[reason] -= holders - 1
    return merged


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
) -> IndexedStepLoader | StreamStepLoader:
    """Batches for steps [start_step, end_step) of this rank (see the module docstring).

    ``state`` is a previous loader's ``state_dict()`` at ``start_step``: required for an exact and fast
    stream resume, optional for index-addressable sources (it carries the skip counts and the position).
    A ``resplit_state`` (a run resumed on another split of the batch) carries the old ranks' skips, which
    rank 0 takes on (the other ranks start without), and the position of an index-addressable source
    without buckets, which goes on after the samples read; a stream is read through from its start
    (the skips met doing so are not counted: the old ranks' are the run's). ``skip_list`` names the file
    the caller writes the skipped samples to (``skipped_jsonl``), for the early warning. ``progress``
    shows bars over what is read before the first batch (rank 0's only).
    """
    _check_rank(rank, world_size)
    if state is not None and int(state.get("step", -1)) != start_step:
        raise ValueError(
            f"data state is for step {state.get('step')!r}, but the loader starts at step {start_step}"
        )
    resplit = state is not None and state.get("kind") == "resplit"
    skips = SkipCounter()
    if is_stream(cfg):
        if state is not None and not resplit and state.get("kind") != "stream":
            raise ValueError(
                f"data state of kind {state.get('kind')!r} cannot resume data.source={cfg.source!r}"
            )
        if resplit and rank == 0:
            skips = merged_skips(state["skips"])
        decoder = SampleDecoder.from_config(cfg, seed)
        factory = _stream_reader_factory(cfg, seed, rank, world_size)
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
        )
    position = None if state is None else state.get("position")
    # 0 at the global batch the position was saved at (the step gives it); another after a change of it.
    offset = 0 if position is None else int(position) - start_step * batch_size * world_size
    dataset, events, total = planned_dataset(
        cfg, seed, batch_size, rank, world_size, progress and rank == 0, offset
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
    else:
        skips.add_all(events)
    # Bucket planning read every sample's header: all are checked; otherwise the rows a catalog refused.
    checked = total if dataset.plan.groups is not None else len(events)
    watch = SkipWatch(total, events, checked, skip_list, _unit(cfg)) if rank == 0 else None
    planned = SkipCounter.of(events)
    return IndexedStepLoader(dataset, start_step, end_step, cfg.num_workers, skips, watch, planned)
