"""Scaling charts and tables for benchmarks/RESULTS.md from the raw output of `fusedit bench`.

Reads JSON lines (``--json``) and, for runs cut short before JSON was written as it went, the printed
table lines of a log. Records with a ``tag`` come from exploratory scripts, not `fusedit bench`, and are not
scaling points. Each preset's training (and sampling) figures come from one file, the one with most points
of that kind for it, so that a chart or row never mixes two runs. Writes training images/s and peak memory
per (resolution, batch) for each preset, and sampling seconds per image against steps for each sampling
batch; ``--tables`` also prints the markdown tables.
Usage: ``python benchmarks/plot_scaling.py benchmarks/raw/2026-11-23-h200 --out benchmarks --tables``.
"""

from __future__ import annotations

import argparse
import json
import math
import re
from collections import Counter
from pathlib import Path

from fusedit.imaging import plot_grouped_bars

# "peak mem" was GiB (2**30 bytes) in every version, written "GB" before 2026-11-24 and "GiB (.. GB)" since.
TRAIN = re.compile(
    r"^train\s+(\S+)\s+(\d+)px b(\d+)\s+([\d.]+) img/s\s+([\d.]+) TFLOP/s\s+MFU\s+([\d.]+)%"
    r"(?:\s+peak mem ([\d.]+) Gi?B)?"
)
SAMPLE = re.compile(
    r"^sample\s+(\S+)\s+(\d+)px n(\d+)\s+([\d.]+) img/s\s+([\d.]+) s/img\s+(\d+) steps .* (cached|uncached)\b"
)


def memory_gib(row: dict) -> float | None:
    """Peak memory in GiB: ``peak_memory_gib``, or ``peak_memory_gb``, its name (in GiB) before 2026-11-24."""
    value = row.get("peak_memory_gib", row.get("peak_memory_gb"))
    return float(value) if value is not None else None


def read_rows(folder: Path) -> list[dict]:
    """Every measurement under ``folder``, each with the file it came from as ``source``."""
    rows = []
    for path in sorted(folder.glob("*.jsonl")):
        records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        rows += [r | {"source": path.name} for r in records if "tag" not in r]
    for path in sorted(folder.glob("*.log")):
        for line in path.read_text().splitlines():
            if m := TRAIN.match(line):
                rows.append(
                    {
                        "kind": "train",
                        "preset": m[1],
                        "resolution": int(m[2]),
                        "batch": int(m[3]),
                        "images_per_s": float(m[4]),
                        "mfu": float(m[6]) / 100,
                        "peak_memory_gib": float(m[7]) if m[7] else None,
                        "source": path.name,
                    }
                )
            elif m := SAMPLE.match(line):
                rows.append(
                    {
                        "kind": "sample",
                        "preset": m[1],
                        "resolution": int(m[2]),
                        "prompts": int(m[3]),
                        "s_per_image": float(m[5]),
                        "steps": int(m[6]),
                        "text_cache": m[7] == "cached",
                        "source": path.name,
                    }
                )
    return [r for r in rows if "preset" in r and "error" not in r]


def one_run_each(rows: list[dict]) -> list[dict]:
    """Per (kind, preset), the rows of the file with most of them (JSON before a log on a tie)."""
    counts = Counter((r["kind"], r["preset"], r["source"]) for r in rows)
    best = {}
    ranked = sorted(counts, key=lambda key: (counts[key], key[2].endswith(".jsonl")))
    for kind, preset, source in ranked:
        best[(kind, preset)] = source  # the last (largest) one wins
    return [r for r in rows if best[(r["kind"], r["preset"])] == r["source"]]


def train_table(train: dict, presets: list[str]) -> str:
    points = sorted({(res, b) for (p, res, b) in train if p in presets})
    lines = [
        "| preset (file) | " + " | ".join(f"{res} px b{b}" for res, b in points) + " |",
        "|---" * (len(points) + 1) + "|",
    ]
    for p in presets:
        cells = []
        for pt in points:
            r = train.get((p, *pt))
            gib = memory_gib(r) if r else None
            mem = f", {gib:.1f} GiB" if gib is not None else ""
            ips = r and (
                f"{r['images_per_s']:.1f}" if r["images_per_s"] >= 10 else f"{r['images_per_s']:.2f}"
            )
            cells.append(f"{ips}, {100 * r['mfu']:.1f}%{mem}" if r else "")
        source = next((train[k]["source"] for k in train if k[0] == p), "")
        lines.append(f"| {p} ({source}) | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def batches(sample: dict, presets: list[str]) -> list[tuple[str, int]]:
    """The (preset, prompts) pairs measured, in the order of ``presets``."""
    found = {(p, n) for (p, n, _, _) in sample if p in presets}
    return sorted(found, key=lambda pn: (presets.index(pn[0]), pn[1]))


def sample_table(sample: dict, presets: list[str]) -> str:
    steps = sorted({s for (_, _, s, _) in sample})
    lines = ["| preset, prompts (file) | " + " | ".join(f"{s} steps" for s in steps) + " |"]
    lines.append("|---" * (len(steps) + 1) + "|")
    for p, n in batches(sample, presets):
        cells = []
        for s in steps:
            got = [sample.get((p, n, s, cached)) for cached in (True, False)]
            cells.append(" / ".join(f"{r['s_per_image']:.3f}" if r else "-" for r in got) if any(got) else "")
        source = next(r["source"] for k, r in sample.items() if k[:2] == (p, n))
        lines.append(f"| {p}, {n} ({source}) | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("raw", type=Path)
    p.add_argument("--out", type=Path, default=Path("benchmarks"))
    p.add_argument(
        "--presets", nargs="+", default=["fusedit-gemma2b", "dit-self-gemma2b", "dit-cross-gemma2b"]
    )
    p.add_argument(
        "--resolution", type=int, default=512, help="the sampling resolution charted (default 512)"
    )
    p.add_argument("--tables", action="store_true", help="also print the markdown tables (cached / uncached)")
    args = p.parse_args()
    rows = one_run_each(read_rows(args.raw))
    train = {(r["preset"], r["resolution"], r["batch"]): r for r in rows if r["kind"] == "train"}
    points = sorted({(res, b) for (preset, res, b) in train if preset in args.presets})
    shared = [pt for pt in points if all((p, *pt) in train for p in args.presets)]
    for name, what, unit, value in [
        ("scaling_train.png", "training images/s", "images/s", lambda r: r["images_per_s"]),
        ("scaling_memory.png", "training peak memory (GiB, allocated)", "GiB", memory_gib),
    ]:
        plot_grouped_bars(
            [f"{res}px b{b}" for res, b in shared],
            {p: [value(train[(p, *pt)]) or math.nan for pt in shared] for p in args.presets},
            args.out / name,
            title=f"{what} on one H200 (bf16 autocast, fp32 master weights)",
            ylabel=unit,
        )
    sample = {
        (r["preset"], r["prompts"], r["steps"], r["text_cache"]): r
        for r in rows
        if r["kind"] == "sample" and r["resolution"] == args.resolution
    }
    steps = sorted({s for (_, _, s, _) in sample})
    # A batch measured at some of the step counts only has no bar at the others (NaN is not drawn).
    series = {
        f"{p} n{n}": [
            sample[(p, n, s, True)]["s_per_image"] if (p, n, s, True) in sample else math.nan for s in steps
        ]
        for p, n in batches(sample, args.presets)
    }
    plot_grouped_bars(
        [f"{s} steps" for s in steps],
        series,
        args.out / "scaling_sample.png",
        title=f"sampling seconds per {args.resolution} px image (guidance 6, text cache) on one H200",
        ylabel="s/image",
    )
    if args.tables:
        print(train_table(train, args.presets), end="\n\n")
        print(sample_table(sample, args.presets))


if __name__ == "__main__":
    main()
