"""WebDataset tar shards (the img2dataset layout), read with the standard library's ``tarfile``.

A shard is a tar whose members are grouped into samples by key: ``00001/000010042.jpg``,
``00001/000010042.txt`` and ``00001/000010042.json`` form the sample ``00001/000010042`` with fields
``jpg``, ``txt`` (text) and ``json`` (parsed). The key is the member path up to the first dot of its file
name, as in the ``webdataset`` package. Reading tars directly keeps this an optional-dependency-free path
and gives random access inside a shard (tar headers record each member's offset), which is what makes the
in-shard shuffle and the exact restore cheap.

:class:`WebDatasetReader` is the training stream of one rank:

* ``data.shards`` lists datasets; each is a brace pattern (``data-{0000..0009}.tar``) or glob
  (``data-*.tar``, sorted), or a list of them.
  Each draw picks a dataset with probability proportional to ``data.weights``, from a generator seeded by
  (seed, rank, draw number), so the mixture is reproducible.
* Per dataset and epoch, the shard list is permuted by (seed, dataset, epoch); rank r of w takes shards
  r, r + w, ... of that order, so the ranks' shares are disjoint and together cover the epoch. With fewer
  shards than ranks every rank reads every shard and keeps the samples at positions r, r + w, ... instead.
* Inside a shard the samples are visited in a permutation by (seed, dataset, epoch, shard).
* The position is ``state_dict()``: the draw count and, per dataset, (epoch, shard position, sample
  position). ``load_state_dict()`` of a saved state continues with exactly the sample that would have come
  next. The stream never ends (epochs repeat), so every rank can always take the same number of steps.

:class:`WebDatasetCatalog` is the same data index-addressable (every sample of every shard, in listed
order), for passes that visit each sample once, such as pre-encoding latents.
"""

from __future__ import annotations

import glob
import io
import os
import re
import tarfile
import threading
from array import array
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from fusedit.config import ConfigError, weights_fit
from fusedit.data.packed import PackedStrings
from fusedit.data.transforms import SkipSample, StreamRecord, _short, image_extensions, make_rng, stable_key
from fusedit.files import counted

_RANGE = re.compile(r"^(-?\d+)\.\.(-?\d+)(?:\.\.(-?\d+))?$")
# Draws of the dataset mixture are generated in blocks: one generator per block, not per draw.
_DRAW_BLOCK = 1024
_TAR_ERRORS = (tarfile.TarError, OSError, EOFError, ValueError)


# --------------------------------------------------------------------------------------------------
# Shard lists


def expand_braces(pattern: str) -> list[str]:
    """Shell-style brace expansion: ``a-{00..02}.tar`` -> a-00.tar, a-01.tar, a-02.tar; ``{x,y}`` -> x, y.

    As in bash: numeric ranges keep zero padding (to the wider endpoint when either starts with 0) and take
    a step (``{0..10..5}``: 0, 5, 10; its sign is ignored, the endpoints give the direction), several braces
    expand as a product, nested braces work, a brace with neither a range nor a comma (``{x}``) is kept as
    written, and a pattern without braces is returned as is.
    """
    start = pattern.find("{")
    if start < 0:
        return [pattern]
    depth, end = 0, -1
    for i in range(start, len(pattern)):
        depth += {"{": 1, "}": -1}.get(pattern[i], 0)
        if depth == 0:
            end = i
            break
    if end < 0:
        raise ConfigError(f"shard pattern {pattern!r} has an unclosed '{{'")
    head, body, tail = pattern[:start], pattern[start + 1 : end], pattern[end + 1 :]
    match = _RANGE.match(body)
    if match:
        lo, hi = match.group(1), match.group(2)
        # Padded when an endpoint is written with a leading zero, as in bash and the braceexpand package
        # that webdataset uses; a plain "0" is no padding: {0..10} is 0, 1, ..., 10.
        padded = any(len(d) > 1 and d.startswith("0") for d in (lo.lstrip("-"), hi.lstrip("-")))
        width = max(len(lo), len(hi)) if padded else 0
        a, b = int(lo), int(hi)
        size = abs(int(match.group(3) or 1)) or 1  # bash takes a step of 0 as 1
        step = size if b >= a else -size
        options = [str(n).zfill(width) for n in range(a, b + (1 if step > 0 else -1), step)]
    else:
        options, depth, current = [], 0, ""
        for ch in body:  # split on top-level commas only, so nested braces stay whole
            if ch == "," and depth == 0:
                options.append(current)
                current = ""
                continue
            depth += {"{": 1, "}": -1}.get(ch, 0)
            current += ch
        options.append(current)
        if len(options) == 1:  # no comma: bash keeps the braces ({x}), expanding any inside them
            options = ["{" + o + "}" for o in expand_braces(body)]
        else:
            options = [o for option in options for o in expand_braces(option)]
    return [head + option + rest for option in options for rest in expand_braces(tail)]


def _expand(pattern: str, entry: Any) -> list[str]:
    """The shard paths of one pattern of the data.shards ``entry``: its braces expanded, then any glob
    (``*``, ``?``, ``[...]``) that names no file as it stands matched, in sorted order (as HF paths take
    globs, people write them here too); a glob that matches no file is refused, naming it."""
    paths = []
    for path in expand_braces(pattern):
        if not any(c in path for c in "*?[") or Path(path).is_file():
            paths.append(path)
            continue
        matched = sorted(p for p in glob.glob(path) if Path(p).is_file())
        if not matched:
            raise ConfigError(f"data.shards entry {entry!r}: the glob {path!r} matches no file")
        paths += matched
    return paths


def shard_lists(spec: Any, weights: Any) -> tuple[list[list[str]], list[float]]:
    """``data.shards`` and ``data.weights`` -> (one shard list per dataset, normalised weights).

    Every expanded shard must exist: a missing shard is a configuration mistake (a typo in a range), not
    a data defect to skip. Globs are expanded (``_expand``).
    """
    if not isinstance(spec, list) or not spec:
        raise ConfigError(
            f"data.shards={spec!r} must be a non-empty list of shard patterns (one per dataset), "
            "e.g. ['data/{0000..0099}.tar']"
        )
    datasets = []
    for entry in spec:
        patterns = entry if isinstance(entry, list) else [entry]
        if not patterns or not all(isinstance(p, str) and p for p in patterns):
            raise ConfigError(f"data.shards entry {entry!r} must be a pattern string or a list of them")
        paths = [path for pattern in patterns for path in _expand(pattern, entry)]
        missing = [p for p in paths if not Path(p).is_file()]
        if missing:
            raise ConfigError(
                f"data.shards entry {entry!r}: {len(missing)} of {len(paths)} shards do not exist "
                f"(first: {missing[0]!r})"
            )
        datasets.append(list(dict.fromkeys(paths)))
    if weights in (None, []):
        weights = [1.0] * len(datasets)
    if not weights_fit(weights, len(datasets)):
        raise ConfigError(
            f"data.weights={weights!r} must list one finite non-negative number per data.shards entry "
            f"({len(datasets)}), not all zero"
        )
    total = float(sum(weights))
    return datasets, [float(w) / total for w in weights]


# --------------------------------------------------------------------------------------------------
# One shard


def split_key(name: str) -> tuple[str, str]:
    """Member path -> (sample key, field): the field is everything after the first dot of the file name."""
    folder, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


class ShardIndex(Sequence[tuple[str, dict[str, int]]]):
    """The samples of one shard, in file order, as numpy arrays rather than ``tarfile.TarInfo`` objects.

    Item i is (key, {extension: member row}); a member row names a member's data offset and size in the tar
    (its header records both), which is all a read needs. TarInfo objects took about 1.9 KB per sample of 3
    members, so a 10-million-sample catalog (CC12M's 1,242 shards) held about 19 GB of them; here a sample
    takes its key's characters and 8 bytes, plus 20 bytes per member. Reading an item writes no reference
    count into the arrays, so DataLoader workers keep sharing their pages (see data/packed.py).
    """

    def __init__(
        self,
        keys: Sequence[str] = (),
        ends: Sequence[int] = (),
        offsets: Sequence[int] = (),
        sizes: Sequence[int] = (),
        codes: Sequence[int] = (),
        extensions: Sequence[str] = (),
        sparse: Sequence[int] = (),
    ):
        self.keys = PackedStrings(keys)
        # (samples,): sample i's members are the rows ends[i-1]:ends[i] of the member arrays below.
        self.ends = np.asarray(ends, dtype=np.int64)
        # (members,): where each member's data starts in the tar and its size; for a sparse member (in
        # ``sparse``), whose data has holes that only its header's map places, the offset of its header.
        self.offsets = np.asarray(offsets, dtype=np.int64)
        self.sizes = np.asarray(sizes, dtype=np.int64)
        self.codes = np.asarray(codes, dtype=np.int32)  # (members,): index into ``extensions``
        self.extensions = tuple(ext.lower() for ext in extensions)  # the shard's distinct ones, lower-cased
        self.sparse = frozenset(int(row) for row in sparse)

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        key = self.keys[i]  # range-checked here
        i %= len(self)
        start, end = (int(self.ends[i - 1]) if i else 0), int(self.ends[i])
        return key, {self.extensions[self.codes[row]]: row for row in range(start, end)}


class TarShard:
    """An open tar shard: its samples (key -> members) in file order, readable in any order."""

    def __init__(self, path: str, samples: ShardIndex | None = None):
        """``samples`` from an earlier open of the same file skips re-reading the headers."""
        self.path = path
        self.error: str | None = None  # set when the shard is unreadable from some point on
        self.samples = ShardIndex()
        # (reason, id, detail) of the samples left out when the shard was indexed: repeated copies of a key.
        self.dropped: list[tuple[str, str, str]] = []
        self._lock = threading.Lock()  # one file position per tar: reads from threads take turns
        try:
            # Kept open across reads (random access into the shard); close() releases it.
            self.tar = tarfile.open(path, "r:*")  # noqa: SIM115
        except _TAR_ERRORS as e:
            # "r:*" tried every format it knows, and its "file could not be opened successfully:" names none.
            not_tar = isinstance(e, tarfile.ReadError) and str(e).startswith("file could not be opened")
            self.tar, self.error = None, "not a tar file, plain or compressed" if not_tar else _short(e)
            return
        if samples is not None:
            self.samples = samples
            return
        self._index()

    def _index(self) -> None:
        """Reads every header once into :class:`ShardIndex` arrays, keeping no TarInfo: tarfile keeps each
        member it reads in ``tar.members``, which is emptied as the scan goes. Measured on a shard of 20,000
        samples x (jpg, txt, json), WebDatasetCatalog of it: with the TarInfo objects kept, 41.4 MB more
        resident (35.9 MB held by Python objects) and 1.25 s; now 7.0-7.3 MB resident (1.9 MB held: 91 bytes
        a sample, the rest being the scan's freed memory that the allocator keeps) and 1.23-1.37 s, the same
        time within the noise of a shared machine."""
        offsets, sizes, codes = array("q"), array("q"), array("i")  # per member of every copy, in tar order
        extensions: dict[str, int] = {}  # the member extensions as written (JPG, jpg) -> code
        sparse: list[int] = []
        repeated_names: dict[int, str] = {}  # row -> member name, of the later copies of a key only
        # A key written twice (two samples given one name, or a writer restarted mid-sample) is split into
        # copies by occurrence: a member whose extension the key's latest copy already holds starts the next
        # copy, so each copy is one run of members and a sample never mixes one copy's image with another's
        # caption. The first copy is the sample, each later one a sample skipped under its own id, so the
        # counts still cover every sample. Copies map the lower-cased extension to the member's row.
        copies: dict[str, list[dict[str, int]]] = {}
        last = None  # the name of the last member read, for _check_end
        try:
            while (member := self.tar.next()) is not None:
                self.tar.members.clear()
                last = member.name
                if not member.isfile():
                    continue
                key, ext = split_key(member.name)
                stem = key.rpartition("/")[2]
                # Not samples, as in the webdataset package: __index__ and similar, and hidden files, whose
                # stem is empty (.DS_Store, the "._00001.jpg" resource forks a macOS tar adds beside each file).
                if not (ext and stem and not stem.startswith("__")):
                    continue
                # The extension as written (split_key lower-cases it), for the member's name below: after the
                # first dot of the file name, also when the name starts with "/" (tar -P), key "a" of "/a.jpg".
                written = member.name.rpartition("/")[2].partition(".")[2]
                found = copies.setdefault(key, [{}])
                if ext in found[-1]:
                    found.append({})
                found[-1][ext] = len(offsets)
                if len(found) > 1:  # a later copy's member: its skip names it as written
                    repeated_names[len(offsets)] = member.name
                if member.sparse is not None:
                    sparse.append(len(offsets))
                offsets.append(member.offset if member.sparse is not None else member.offset_data)
                sizes.append(member.size)
                codes.append(extensions.setdefault(written, len(extensions)))
        except _TAR_ERRORS as e:
            self.error = _short(e)
        else:
            self.error = self._check_end(last)
        written_as = list(extensions)
        # The samples' members in sample order, so that each sample's are contiguous rows of the index.
        rows = [row for found in copies.values() for row in found[0].values()]
        in_sparse = set(sparse)
        self.samples = ShardIndex(
            copies,
            np.cumsum([len(found[0]) for found in copies.values()], dtype=np.int64),
            np.frombuffer(offsets, dtype=np.int64)[rows],
            np.frombuffer(sizes, dtype=np.int64)[rows],
            np.frombuffer(codes, dtype=np.int32)[rows],
            written_as,
            [n for n, row in enumerate(rows) if row in in_sparse],
        )
        for key, found in copies.items():
            for n, copy in enumerate(found[1:], start=2):
                repeated = ", ".join(repeated_names[row] for row in copy.values())
                self.dropped.append(
                    (
                        "duplicate",
                        f"{self.path}/{key}@{n}",
                        f"duplicate member {repeated} in the shard (key {key!r} again); the first copy is used",
                    )
                )

    def _check_end(self, last: str | None) -> str | None:
        """tarfile stops quietly at a damaged header after the first one; the bytes after the last member
        (named ``last``) must be the zero blocks that end an archive, otherwise the rest of the shard was
        lost."""
        try:
            size = os.path.getsize(self.path)
            fileobj = self.tar.fileobj
            fileobj.seek(self.tar.offset)
            block = fileobj.read(tarfile.BLOCKSIZE)
        except _TAR_ERRORS:
            return None
        # "r:*" recognises a compressed shard by its content, whatever its name (a gzipped "x.tar", or a
        # ".tar.zst" on Python 3.14): only a plain file's offsets compare with its size on disk.
        if self.tar.offset > size and isinstance(fileobj, io.BufferedReader):
            # The last header announced more data than the file holds: the shard was cut short.
            return f"truncated: {size} bytes, the last member needs {self.tar.offset}"
        if block and block.strip(b"\0"):
            return f"unreadable tar header at byte {self.tar.offset}; the members after it are lost"
        if not block and last is not None:
            # A writer that stopped between two members (an interrupted img2dataset or tar) leaves no zero
            # blocks; what it would have written next is lost without a trace in the members read.
            return f"no end-of-archive marker: the shard may have been cut short after member {last}"
        return None

    def __len__(self) -> int:
        return len(self.samples)

    def close(self) -> None:
        if self.tar is not None:
            self.tar.close()

    def read(self, index: int, wanted: dict[str, str], image_field: str) -> tuple[str, dict, Any]:
        """(key, caption fields, image bytes) of sample ``index``; ``wanted`` is :func:`wanted_fields`.
        Only members that something reads are loaded (an img2dataset sample may also carry large unused
        members), as bytes: the caption decoder parses JSON and decodes text (transforms.caption_candidates).
        Raises SkipSample."""
        if self.tar is None:
            raise SkipSample("corrupt", f"shard unreadable: {self.error}")
        key, members = self.samples[index]
        # Member extensions are lower-cased when the shard is indexed, so the setting is too (image_field=JPG).
        # Without it, the first member whose extension a folder scan reads too (image_extensions, in its
        # order: jpg before png), so a shard and a folder of the same files hold the same samples.
        ext = image_field.lower() or next((e for e in image_extensions() if e in members), "")
        if ext not in members:
            raise SkipSample("missing", _no_image(members, image_field))
        loaded: dict[str, Any] = {}
        try:
            with self._lock:
                image = self._bytes(members[ext])
                for name in dict.fromkeys(wanted.values()):
                    if name in members and name != ext:
                        loaded[name] = self._bytes(members[name])
        except _TAR_ERRORS as e:
            raise SkipSample("corrupt", f"tar member unreadable: {_short(e)}") from None
        # Keyed as data.caption_fields spells them, which is how the decoder looks them up (TXT reads txt).
        fields = {field: loaded[name] for field, name in wanted.items() if name in loaded}
        return key, {"__key__": key, "__url__": self.path, **fields}, image

    def _bytes(self, row: int) -> bytes:
        """The data of member ``row``: one seek and read in the tar's (possibly decompressed) stream, which is
        what tarfile's extractfile does for a regular file. A sparse member is read through tarfile, from
        its header read again, as only the header's map places its data."""
        offset, size = int(self.samples.offsets[row]), int(self.samples.sizes[row])
        fileobj = self.tar.fileobj
        if row in self.samples.sparse:
            resume = self.tar.offset  # reading a header moves the scan position, which the tar keeps
            try:
                fileobj.seek(offset)
                member = self.tar.tarinfo.fromtarfile(self.tar)
            finally:
                self.tar.offset = resume
            f = self.tar.extractfile(member)
            data = f.read() if f is not None else b""
        elif size:
            fileobj.seek(offset)
            data = fileobj.read(size)
        else:
            data = b""
        if len(data) != size:
            raise tarfile.ReadError("unexpected end of data")  # as tarfile says of a member cut short
        return data


def _no_image(members: dict, image_field: str) -> str:
    """Why a sample has no image member to read: its members, and the extensions read as images (or the one
    data.image_field names)."""
    if image_field:
        return f"no {image_field} member (data.image_field; its members: {', '.join(members)})"
    return (
        f"no image member (its members: {', '.join(members)}; image extensions read: "
        f"{', '.join(image_extensions())}, or the one data.image_field names)"
    )


def wanted_fields(caption_fields: Sequence[str]) -> dict[str, str]:
    """Caption field (as configured, up to the key path of a ``json.`` field) -> the tar member extension
    it reads: ``json.caption`` reads the ``json`` member. Extensions are lower-cased when a shard is
    indexed, so the member part of a field is too (``TXT``, ``JSON.caption``), as for data.image_field;
    keys inside a JSON member keep their case, as a JSON document's keys do."""
    heads = (f.split(".", 1)[0] if f.lower().startswith("json.") else f for f in caption_fields)
    return {head: head.lower() for head in heads}


# --------------------------------------------------------------------------------------------------
# The training stream


class WebDatasetReader:
    """One rank's endless, restorable stream over several weighted shard sets (see the module docstring)."""

    def __init__(
        self,
        datasets: list[list[str]],
        weights: list[float],
        *,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        caption_fields: Sequence[str] = ("txt",),
        image_field: str = "",
    ):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} must be in [0, world_size={world_size})")
        self.datasets, self.weights = datasets, np.asarray(weights, dtype=np.float64)
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.wanted, self.image_field = wanted_fields(caption_fields), image_field
        self.draws = 0
        self.cursors = [[0, 0, 0] for _ in datasets]  # (epoch, shard position, sample position)
        self._open: dict[int, tuple[tuple[int, int], TarShard, np.ndarray]] = {}
        self._draw_block: tuple[int, np.ndarray] | None = None
        self._fresh = [True] * len(datasets)  # whether the current epoch was started here from its start
        self._found = [0] * len(datasets)  # samples produced in the current epoch

    # ----------------------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        return {"draws": self.draws, "cursors": [list(c) for c in self.cursors]}

    def load_state_dict(self, state: dict) -> None:
        cursors = state["cursors"]
        if len(cursors) != len(self.datasets):
            raise ConfigError(
                f"reader state has {len(cursors)} datasets but data.shards lists {len(self.datasets)}"
            )
        self.draws, self.cursors = int(state["draws"]), [list(map(int, c)) for c in cursors]
        self._fresh = [c[1] == 0 and c[2] == 0 for c in self.cursors]
        self._found = [0] * len(self.datasets)

    def close(self) -> None:
        for _, shard, _ in self._open.values():
            shard.close()
        self._open.clear()

    # ----------------------------------------------------------------------------------------------

    def _choose(self) -> int:
        if len(self.datasets) == 1:
            return 0
        block, offset = divmod(self.draws, _DRAW_BLOCK)
        if self._draw_block is None or self._draw_block[0] != block:
            rng = make_rng(self.seed, 5, self.rank, block)
            self._draw_block = (block, rng.choice(len(self.datasets), size=_DRAW_BLOCK, p=self.weights))
        return int(self._draw_block[1][offset])

    def _my_shards(self, d: int, epoch: int) -> tuple[list[int], int, int]:
        """(shard indices this rank reads in ``epoch``, sample stride, sample offset)."""
        n = len(self.datasets[d])
        order = make_rng(self.seed, 3, d, epoch).permutation(n)
        if n >= self.world_size:
            return [int(i) for i in order[self.rank :: self.world_size]], 1, 0
        return [int(i) for i in order], self.world_size, self.rank

    def _none_for_rank(self, path: str, stride: int) -> str:
        """Why a readable shard gave this rank no sample: it has none, or (fewer shards than ranks, each
        rank reading 1 sample in ``stride`` of every shard) it holds fewer samples than the ranks."""
        shard = TarShard(path)
        held = len(shard.samples)
        shard.close()
        if stride == 1 or held == 0:
            return f"e.g. {path!r} has none"
        return (
            f"e.g. {path!r} holds {counted(held, 'sample')}, fewer than the {stride} ranks: with fewer shards "
            f"than ranks each rank reads 1 sample in {stride} of every shard"
        )

    def _shard(self, d: int, epoch: int, position: int, events: list) -> tuple[TarShard, np.ndarray]:
        """The open shard at ``position`` of this rank's epoch list and its sample visiting order."""
        opened = self._open.get(d)
        if opened is not None and opened[0] == (epoch, position):
            return opened[1], opened[2]
        if opened is not None:
            opened[1].close()
        shards, stride, offset = self._my_shards(d, epoch)
        index = shards[position]
        shard = TarShard(self.datasets[d][index])
        if shard.error:
            events.append(("corrupt-shard", shard.path, shard.error))
        events += shard.dropped
        # The permutation does not depend on the rank, so with sample striding the ranks' shares of one
        # shard are disjoint.
        order = make_rng(self.seed, 4, d, epoch, index).permutation(len(shard))
        order = order[offset::stride]
        self._open[d] = ((epoch, position), shard, order)
        return shard, order

    def next(self) -> StreamRecord:
        d = self._choose()
        self.draws += 1
        events: list = []
        while True:
            epoch, position, k = self.cursors[d]
            shards, stride, _ = self._my_shards(d, epoch)
            if position >= len(shards):
                if self._fresh[d] and self._found[d] == 0:
                    # This epoch's shards were all opened in this call (none gave a sample): name the first
                    # that could not be read, or else the first, which holds no sample for this rank.
                    mine = [self.datasets[d][i] for i in shards]
                    bad = next(((path, error) for _, path, error in events if path in mine), None)
                    why = f"{bad[0]!r}: {bad[1]}" if bad else self._none_for_rank(mine[0], stride)
                    raise ConfigError(
                        f"data.shards entry {d} has no readable samples for rank {self.rank} of "
                        f"{self.world_size} ({len(self.datasets[d])} shards; {why})"
                    )
                self.cursors[d] = [epoch + 1, 0, 0]
                self._fresh[d], self._found[d] = True, 0
                continue
            shard, order = self._shard(d, epoch, position, events)
            if k >= len(order):
                self.cursors[d] = [epoch, position + 1, 0]
                continue
            self.cursors[d] = [epoch, position, k + 1]
            self._found[d] += 1
            index = int(order[k])
            key = shard.samples.keys[index]
            sample_id = f"{shard.path}/{key}"
            try:
                _, fields, image = shard.read(index, self.wanted, self.image_field)
                error = None
            except SkipSample as e:
                fields, image, error = {}, None, e
            source = f"data.shards entry {d}" if len(self.datasets) > 1 else ""
            return StreamRecord(fields, image, sample_id, stable_key(sample_id), epoch, error, events, source)


# --------------------------------------------------------------------------------------------------
# Index-addressable view


def _indexed_shard(path: str) -> TarShard:
    """A shard's index, its file closed at once: a catalog of thousands of shards (CC12M's 1,242) held one
    open file per shard until all were read, and past ``ulimit -n`` (often 1024) the rest failed as
    corrupt-shard and were left out."""
    shard = TarShard(path)
    shard.close()
    return shard


class WebDatasetCatalog:
    """Every sample of every shard once, in listed order (shards in data.shards order, samples in tar
    order): sample i is a fixed sample. Opening a catalog reads every shard's tar headers (not the data):
    ``progress`` shows a bar, as a shard of 20,000 samples takes about a second on a local disk, more on a
    network file system. Safe to read from several threads: each thread opens its own file handles."""

    def __init__(
        self,
        datasets: list[list[str]],
        caption_fields: Sequence[str] = ("txt",),
        image_field="",
        progress: bool = False,
    ):
        self.paths = list(dict.fromkeys(p for paths in datasets for p in paths))
        self.wanted, self.image_field = wanted_fields(caption_fields), image_field
        self.skipped: list[tuple[str, str, str]] = []
        self.sizes_known = None
        with ThreadPoolExecutor(max_workers=min(16, len(self.paths))) as pool:
            opened = pool.map(_indexed_shard, self.paths)
            scanned = list(
                tqdm(
                    opened,
                    total=len(self.paths),
                    desc="read shard headers",
                    unit="shard",
                    disable=not progress,
                    leave=False,
                )
            )
        self.samples: list[ShardIndex] = []
        for shard in scanned:
            if shard.error:
                self.skipped.append(("corrupt-shard", shard.path, shard.error))
            self.skipped += shard.dropped
            self.samples.append(shard.samples)
        self.offsets = np.cumsum([0] + [len(s) for s in self.samples])
        self._local = threading.local()

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_local": None}  # open handles stay with their process and thread

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, _local=threading.local())

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def _locate(self, i: int) -> tuple[int, int]:
        s = int(np.searchsorted(self.offsets, i, side="right")) - 1
        return s, i - int(self.offsets[s])

    def sample_id(self, i: int) -> str:
        s, j = self._locate(i)
        return f"{self.paths[s]}/{self.samples[s].keys[j]}"

    def record(self, i: int) -> tuple[dict, Any]:
        s, j = self._locate(i)
        opened = getattr(self._local, "shard", None)
        if opened is None or opened[0] != s:
            # Samples are read in order, so one open shard per thread is enough; it is this thread's own,
            # so closing it cannot pull a file from under another thread's read.
            if opened is not None:
                opened[1].close()
            opened = self._local.shard = (s, TarShard(self.paths[s], self.samples[s]))
        _, fields, image = opened[1].read(j, self.wanted, self.image_field)
        return fields, image
