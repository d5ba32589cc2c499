"""Step plans for index-addressable sources: which samples fill each slot of the batch a rank reads at a
step, and the datasets read through them.

:class:`StepPlan` addresses every batch by its step alone, in the order ``fusedit.data.loader``'s docstring
describes (epochs permuted by (seed, epoch), or aspect-ratio buckets cut into single-bucket global batches),
and names the replacements to try for a sample that cannot be used; :class:`PlanBatches` hands its slots to a
DataLoader; a :class:`PlannedDataset` (the shapes world, a catalog's decoded images, the latent cache) loads
a slot's first usable candidate. A module of its own: the latent cache's dataset is one of them.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Iterator
from typing import Any

import numpy as np
from torch.utils.data import Dataset, Sampler

from fusedit.data.transforms import NOT_UTF8, SampleDecoder, SkipSample, make_rng
from fusedit.files import counted

log = logging.getLogger(__name__)


def check_rank(rank: int, world_size: int) -> None:
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(
            f"rank={rank}, world_size={world_size}: need world_size >= 1 and 0 <= rank < world_size"
        )


def index_dtype(n: int) -> np.dtype:
    """The dtype of a plan's epoch orders over ``n`` samples: int32 whenever every index fits (n <= 2**31),
    half of numpy's default int64 (a plan holds two orders: 80 MB, not 160 MB, at 10M samples, in every
    process); int64 only beyond."""
    return np.dtype(np.int32) if n <= 2**31 else np.dtype(np.int64)


class StepPlan:
    """Which dataset positions fill each slot of the batch a rank reads at a step (fusedit.data.loader's
    docstring gives the order).

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
        check_rank(rank, world_size)
        if n < 1:
            raise ValueError("cannot plan batches over an empty dataset")
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.rank, self.world_size, self.shuffle = rank, world_size, shuffle
        # Without buckets, step s reads from position offset + s * G: a run resumed at another global batch
        # goes on after the samples it has read (``position``), not at s times the new batch.
        self.offset = offset
        self.index_dtype = index_dtype(n)  # of the epoch orders and members (dataset indices)
        # Bucket numbers index data.buckets (or a cache's latent shapes): a few, int32 like the orders.
        self.groups = None if groups is None else np.asarray(groups).astype(np.int32, copy=False)
        self.global_batch = batch_size * world_size  # every rank's rows of one step
        self._cache: dict[int, Any] = {}
        # The last global batch whose samples a replacement search needed (_own_batch): the slots of one
        # batch are searched one after another, and each would otherwise rebuild it (and, across an epoch's
        # end, evict and rebuild an epoch's order for it).
        self._own: tuple[tuple[int, int, int], set[int]] | None = None
        if self.groups is None and n < self.global_batch and rank == 0:
            # One endless stream of n: a global batch of more wraps around it, so its slots (the processes'
            # and micro-steps' shares alike) read samples twice, which multi-node.md says they do not.
            split = f" ({batch_size} per process x {world_size} processes)" if world_size > 1 else ""
            log.warning(
                "data: %s, fewer than the global batch of %d%s: each batch repeats samples%s (more data, or a "
                "smaller batch, avoid it)",
                counted(n, "sample"),
                self.global_batch,
                split,
                ", and the processes may read the same ones" if world_size > 1 else "",
            )
        if self.groups is not None:
            self.members = np.flatnonzero(self.groups >= 0).astype(self.index_dtype)
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

    def _shuffled(self, n: int, epoch: int) -> np.ndarray:
        """(n,) of self.index_dtype: make_rng(seed, 0, epoch).permutation(n), which is an int64 arange
        shuffled in place. The shuffle's draws do not depend on the item size, so an arange of int32
        shuffled by the same generator is the same order (tests/test_latent_index.py pins it)."""
        order = np.arange(n, dtype=self.index_dtype)
        make_rng(self.seed, 0, epoch).shuffle(order)
        return order

    def _build(self, epoch: int) -> Any:
        if self.groups is None:
            return self._shuffled(self.n, epoch)
        order = self.members[self._shuffled(len(self.members), epoch)]
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
        # The item carries the names of the captions that are not UTF-8 its reading met ("not_utf8"): in a
        # DataLoader worker the process's NOT_UTF8 count never reaches the main process, a batch does.
        bad = self.__dict__.setdefault("_bad", {})
        skipped = []
        for i, epoch in self.plan.candidates(slot):
            if i in bad:
                skipped.append((bad[i][0], self.sample_id(i), bad[i][1]))
                continue
            with NOT_UTF8.scope() as not_utf8:  # a skipped candidate's are read into no batch
                try:
                    item = self.load(i, epoch, slot[1])
                except SkipSample as e:
                    bad[i] = (e.reason, e.detail)
                    skipped.append((e.reason, self.sample_id(i), e.detail))
                    continue
            item["skipped"], item["not_utf8"] = skipped, not_utf8
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
