"""Issue 6's targets read off the raw JSON of `fusedit bench` (what benchmarks/gpu_session.sh writes): one
row per target and per record that measures it, naming the record (file:line) and the settings it ran with,
so that RESULTS.md's table of targets is written from, and can be read against, the raw output.

Usage: ``python benchmarks/check_targets.py benchmarks/raw/2026-11-24-h200 [more folders or .jsonl files]``
(``--json`` prints one object per row instead of the markdown table).

A record counts for a target when it measures the target's configuration: its preset, kind and shape, the
issue's 256 full-length text tokens (no ``--min-text-tokens``), and no exploratory ``tag``. Records of the
same configuration with other settings (``train.ema_offload``, ``activation_memory_budget``, compile mode,
CUDA graphs) are rows of their own, their settings named: the issue asks that each target be met by one
configuration, and the table shows which. A variant's MFU is judged against the fusedit-gemma2b 512 px
batch 16 record of the same folder, commit and settings nearest to it in time (most likely the same card:
cards of one model, and each process's measured matmul peak, differ by a few percent), named in its row.
"""

from __future__ import annotations

import argparse
import datetime
import json
from dataclasses import dataclass
from pathlib import Path

GB = 1e9  # the memory targets are in GB (10**9 bytes); the bench records bytes and GiB


@dataclass(frozen=True)
class Target:
    name: str
    match: dict  # record keys and the values the target's configuration has
    value: str  # the record key measured: images_per_s, mfu, peak_memory_bytes, or "fits"
    at_least: float | None = None
    at_most: float | None = None
    # The public FuseDiT code's images/s at this configuration on an H200, as the issue gives it: each
    # measured figure is also given as a multiple of it.
    public: float | None = None


def _train(preset: str, resolution: int, batch: int) -> dict:
    return {"kind": "train", "preset": preset, "resolution": resolution, "batch": batch}


def _sample(preset: str) -> dict:
    return {"kind": "sample", "preset": preset, "resolution": 512, "prompts": 4, "steps": 25, "guidance": 6.0}


GEMMA_512 = _train("fusedit-gemma2b", 512, 16)
TARGETS = [
    Target("train 512 px b16: >= 38 img/s", GEMMA_512, "images_per_s", at_least=38, public=22.5),
    Target("train 512 px b16: MFU >= 60%", GEMMA_512, "mfu", at_least=0.60),
    Target("train 512 px b16: memory <= 64 GB", GEMMA_512, "peak_memory_bytes", at_most=64 * GB),
    Target(
        "train 256 px b32: >= 110 img/s",
        _train("fusedit-gemma2b", 256, 32),
        "images_per_s",
        at_least=110,
        public=64,
    ),
    Target("train 256 px b64 fits", _train("fusedit-gemma2b", 256, 64), "fits"),
    Target(
        "large model trains 512 px b16 within 90 GB",
        _train("fusedit-large", 512, 16),
        "peak_memory_bytes",
        at_most=90 * GB,
    ),
    Target(
        "sample 512 px, 4 prompts, 25 steps, cfg 6: >= 2.8 img/s",
        {**_sample("fusedit-gemma2b"), "text_cache": True},
        "images_per_s",
        at_least=2.8,
        public=1.77,  # with its text cache (1.35 without)
    ),
    Target(
        "large model samples >= 1.9 img/s",
        {**_sample("fusedit-large"), "text_cache": True},
        "images_per_s",
        at_least=1.9,
    ),
]
# design-space.md's variants and the two shallow baselines: MFU within 5 points of fusedit-gemma2b's.
VARIANTS = ["fusedit-2d-rope", "fusedit-no-timestep", "dit-self-gemma2b", "dit-cross-gemma2b"]
MFU_POINTS = 0.05

# The settings that may differ between records of one configuration, named in each row.
SETTINGS = {
    "ema_offload": False,
    "activation_memory_budget": 0.9,  # the paper presets'; records before it existed have none
    "compile": "auto",
    "sample_compile": "auto",
    "cuda_graphs": False,
    "trim_padding": True,
}


@dataclass
class Record:
    where: str  # file:line, and the commit the record names
    folder: str
    data: dict


def read_records(paths: list[Path]) -> list[Record]:
    """Every JSON line of the .jsonl files in ``paths`` (folders or files), in name order."""
    files = []
    for path in paths:
        if path.is_dir():
            files += sorted(path.glob("*.jsonl"))
        elif path.is_file():
            files.append(path)
        else:
            raise SystemExit(f"check_targets: no such folder or file: {str(path)!r}")
    records = []
    for file in files:
        for number, line in enumerate(file.read_text().splitlines(), 1):
            if line.strip():
                data = json.loads(line)
                commit = f" @{data['commit'][:7]}" if data.get("commit") else ""
                records.append(Record(f"{file}:{number}{commit}", str(file.parent), data))
    return records


def _counts(record: dict, match: dict) -> bool:
    """Whether ``record`` measures the configuration ``match`` names, as the issue measures it."""
    if (
        record.get("tag")
        or record.get("min_text_tokens") is not None
        or record.get("text_tokens", 256) != 256
    ):
        return False
    return all(record.get(key) == value for key, value in match.items())


def _settings(record: dict) -> str:
    """The record's settings that are not the defaults (SETTINGS), or "defaults"."""
    changed = [
        f"{key}={record[key]}" for key, default in SETTINGS.items() if record.get(key, default) != default
    ]
    return ", ".join(changed) or "defaults"


def _memory(record: dict) -> float | None:
    """Peak bytes: ``peak_memory_bytes``, or the GiB of older records (``peak_memory_gib``; before
    2026-11-24 ``peak_memory_gb``, which held GiB too, as plot_scaling.py notes)."""
    if record.get("peak_memory_bytes") is not None:
        return record["peak_memory_bytes"]
    gib = record.get("peak_memory_gib", record.get("peak_memory_gb"))
    return gib * 2**30 if gib is not None else None


def _measured(target: Target, record: dict) -> tuple[str, bool | None]:
    """The record's figure for ``target`` as text, and whether it meets it (None: not measured there)."""
    if target.value == "fits":
        fits = "error" not in record
        return ("fits" if fits else f"does not fit ({record['error']})"), fits
    if "error" in record:
        return record["error"], False
    if target.value == "peak_memory_bytes":
        value = _memory(record)
        if value is None:
            return "not recorded", None
        text = f"{value / 2**30:.1f} GiB ({value / GB:.1f} GB)"
    else:
        value = record[target.value]
        text = f"{100 * value:.1f}%" if target.value == "mfu" else f"{value:.2f}"
        if target.public:
            text += f" ({value / target.public:.2f}x the public code's {target.public})"
    met = (target.at_least is None or value >= target.at_least) and (
        target.at_most is None or value <= target.at_most
    )
    return text, met


def _row(target: str, record: Record | None, measured: str = "not measured", met: bool | None = None) -> dict:
    """A table row: a target, the record measuring it (None: no record does) and its figure."""
    settings = _settings(record.data) if record is not None else None
    where = record.where if record is not None else None
    return {"target": target, "record": where, "settings": settings, "measured": measured, "met": met}


def rows(records: list[Record]) -> list[dict]:
    """One row per (target, record measuring it); a target no record measures gets one "not measured" row."""
    out = []
    for target in TARGETS:
        found = [r for r in records if _counts(r.data, target.match)]
        out += [_row(target.name, r, *_measured(target, r.data)) for r in found] or [_row(target.name, None)]
    for preset in VARIANTS:
        name = f"{preset}: MFU within 5 points of fusedit-gemma2b's (512 px b16)"
        found = [r for r in records if _counts(r.data, {**GEMMA_512, "preset": preset})]
        for r in found:
            if "error" in r.data:
                out.append(_row(name, r, r.data["error"], False))
                continue
            reference = _reference(r, records)
            mfu = r.data["mfu"]
            if reference is None:
                out.append(_row(name, r, f"{100 * mfu:.1f}% (no fusedit-gemma2b record beside it)"))
                continue
            gemma = reference.data["mfu"]
            text = f"{100 * mfu:.1f}% against {100 * gemma:.1f}% ({reference.where})"
            out.append(_row(name, r, text, abs(mfu - gemma) <= MFU_POINTS))
        if not found:
            out.append(_row(name, None))
    return out


def _reference(variant: Record, records: list[Record]) -> Record | None:
    """The fusedit-gemma2b 512 px batch 16 record a variant's MFU is judged against: of the same folder,
    commit and settings, the nearest in time (records without a date: the first)."""
    same = [
        g
        for g in records
        if g.folder == variant.folder
        and _counts(g.data, GEMMA_512)
        and "error" not in g.data
        and g.data.get("commit") == variant.data.get("commit")
        and _settings(g.data) == _settings(variant.data)
    ]

    def distance(g: Record) -> float:
        when = [r.data.get("date") for r in (g, variant)]
        if None in when:
            return 0.0
        a, b = (datetime.datetime.fromisoformat(w) for w in when)
        return abs((a - b).total_seconds())

    return min(same, key=distance, default=None)


def markdown(table: list[dict]) -> str:
    lines = ["| target | measured | met | settings | record |", "|---|---|---|---|---|"]
    for row in table:
        met = {True: "yes", False: "**no**", None: "-"}[row["met"]]
        lines.append(
            f"| {row['target']} | {row['measured']} | {met} | {row['settings'] or '-'} | {row['record'] or '-'} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("paths", nargs="+", type=Path, help="folders of .jsonl files, or .jsonl files")
    parser.add_argument("--json", action="store_true", help="one JSON object per row instead of a table")
    args = parser.parse_args()
    table = rows(read_records(args.paths))
    print("\n".join(json.dumps(row) for row in table) if args.json else markdown(table))


if __name__ == "__main__":
    main()
