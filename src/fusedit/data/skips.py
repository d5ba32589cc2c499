"""Skip accounting: which samples could not be used and why, counted, reported, listed and warned about.

A loader counts each skipped sample in a :class:`SkipCounter` (the reason, the id, the detail of why), which
travels in its state so that a resumed run's report covers the whole run; ``merged_skips`` and
``merged_skip_report`` put several ranks' skips together, ``skipped_jsonl`` lists the skipped ids for the run
folder, :class:`SkipWatch` warns once, early, when a large share of the data cannot be used, and
``no_usable_samples`` is the error when none can; :class:`NotUTF8Count` counts the captions read into
batches that are not UTF-8 (read with U+FFFD), over one process or (``NotUTF8Count.of``) several. A module
of its own: the latent cache counts its skips the same way, and the training loop reports and lists them,
without reading any data.
"""

from __future__ import annotations

import itertools
import json
import logging

from fusedit.config import ConfigError
from fusedit.files import counted

log = logging.getLogger(__name__)

# Skipped samples the report shows per reason (every id is counted, and kept for the list of them).
_EXAMPLES = 3
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
        return f"skipped {counted(self.total(), 'sample')} ({counted(times, 'time')}): " + ", ".join(parts)

    def tally(self, shared: SkipCounter | None = None) -> dict:
        """The counts to merge with other processes' (``merged_skip_report``), apart for the skips of
        ``shared`` (those found while planning the data, which every process finds alike) and the others
        (this process's own reads): ``{"shared": share, "own": share}``, a share being ``{reason: {"ids":
        distinct ids, "times": occurrences, "examples": [[id, detail], ...]}}`` with the first
        ``_EXAMPLES`` ids. A planned skip counts among the shared ones where this counter holds it (rank 0's
        alone holds them, but for a state saved before it alone did; a run resumed onto changed data holds
        the planning skips of its start): planning looks at each sample once (one occurrence), and the
        samples it leaves out are never read."""
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
    found while planning the data, rank 0's, once; those each process met while reading its share, summed
    over the processes. Distinct ids are counted per process (no process holds the others' ids), so a sample
    two processes met (in different epochs) counts once in each: the line says so. The examples are the
    planned ones first, then each process's in rank order."""
    shared = tallies[0]["shared"]  # rank 0 counts them (the others hold none, or the same ones)
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
    skipped = f"{counted(planned + read, 'sample')} ({counted(times, 'time')})"
    return f"skipped {skipped} {where} ({'; '.join(how)}): " + ", ".join(parts)


def merged_skips(skip_states: list[dict], planned=()) -> SkipCounter:
    """The skip records of several ranks (their loader states' ``"skips"``, in rank order) as one: each
    reason's ids in rank order, each once, and their occurrences summed, but for the ``planned`` skips
    (found while planning the data, which rank 0 counted, and every rank in states saved before rank 0 alone
    did): those count once, as in a run on one process. The ids a run on one process would hold, but listed
    rank by rank, not in the order met."""
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
            line = json.dumps(record, ensure_ascii=False)
            if not _is_utf8(line):
                # A tar member name in another encoding is held with its bytes surrogate-escaped; escaped
                # as \udcXX the line is UTF-8 and reads back to the same id.
                line = json.dumps(record)
            lines.append(line + "\n")
    return "".join(lines)


def _is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


class SkipWatch:
    """One early warning when a large share of the data cannot be used (the counts alone come at the end of
    training, by when every step has trained on the remainder).

    The share is this process's estimate. Of ``total`` samples, ``checked`` were judged before the first
    batch (rows a catalog read, and with buckets every sample, whose header planning read), the unusable
    ones among them ``known`` exactly; the fate of the others is estimated from the distinct samples met in
    batches, the share of them skipped. A stream's size is unknown (``total`` None): its share is that of
    the distinct samples read so far. The samples met are tracked over the first ``_WARN_WINDOW``.
    ``see()`` returns the warning's text once, then None. ``unit`` names what is counted: "rows" for an
    index file, whose unreadable rows count among the unusable (as the loader's epoch summary counts them).
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
        # Said early, when no checkpoint may have been saved yet: the list is written with each one.
        where = (
            f"; every skipped id is listed in {self.where}, written at each checkpoint and at the end of training"
            if self.where
            else ""
        )
        return (
            f"data: {head} (warned above {_WARN_SHARE:.0%}); training goes on with the rest, repeating it "
            f"more often{where}"
        )


def warn(watch: SkipWatch | None, used=(), skipped=()) -> None:
    message = None if watch is None else watch.see(used, skipped)
    if message:
        log.warning("%s", message)


def no_usable_samples(
    counter: SkipCounter, where: str = "", task: str = "left to fill a batch"
) -> ConfigError:
    """The error for data whose every sample was skipped (``where``: which of several mixed sources; ``task``:
    what the samples were for): the skip counts, and which setting to change for the reasons a setting can
    cause (no-caption, tiny, aspect-ratio)."""
    counts = counter.counts()
    hints = []
    if "no-caption" in counts:
        hints.append(
            "if the captions are under other fields, list them in data.caption_fields "
            '(e.g. [txt, json.caption] for a "caption" key in .json sidecars, or a column name)'
        )
    if "tiny" in counts:
        hints.append("lower data.min_image_size to keep smaller images")
    if "aspect-ratio" in counts:
        hints.append("raise data.max_aspect_ratio (or set it to 0, no limit) to keep more elongated images")
    hint = f"; {'; '.join(hints)}" if hints else ""
    where = f" ({where} has none)" if where else ""
    return ConfigError(f"no usable sample {task}{where}; {counter.report()}{hint}")


class NotUTF8Count:
    """The caption texts that are not UTF-8 (``NOT_UTF8``) read for the batches a loader yielded: how many,
    each time one was read for a batch (a file read every epoch counts every epoch; a skipped sample's never;
    every caption field data.caption_fields names is read, and a folder's sidecar files they name, also
    those ``caption_pick`` does not train on; a sidecar no field names is never read), and
    the first one's name as an example. A count and one name, not every name: a whole data set saved in
    another encoding would otherwise put every file into each checkpoint's data state."""

    def __init__(self, count: int = 0, example: str = "") -> None:
        self.count, self.example = count, example

    def add(self, names) -> None:
        if names and not self.example:
            self.example = names[0]
        self.count += len(names)

    def state_dict(self) -> dict:
        return {"count": self.count, "example": self.example}

    @classmethod
    def of(cls, states) -> NotUTF8Count:
        """Several processes' (or checkpointed) counts as one: summed, the first example in their order. A
        state saved before the count was kept (absent: ``{}``) adds nothing."""
        total = cls()
        for state in states:
            total.count += int(state.get("count", 0))
            total.example = total.example or state.get("example", "")
        return total

    def report(self, processes: int = 1) -> str | None:
        """The line for the end of a stage (None when every caption was UTF-8); ``processes``: how many
        processes' counts were summed into this one."""
        if not self.count:
            return None
        where = f" over the {processes} processes" if processes > 1 else ""
        return (
            f"data: {counted(self.count, 'caption text')} read for batches{where} "
            f"{'was' if self.count == 1 else 'were'} not UTF-8 (counted each time read, with a sample's caption "
            f"files and fields that were not picked; e.g. {self.example}): read with their bad bytes as U+FFFD; "
            "save captions as UTF-8 to keep every character"
        )
