"""Scaling charts for benchmarks/RESULTS.md from the raw output of `fusedit bench`.

Reads JSON lines (``--json``) and, for runs cut short before JSON was written as it went, the printed
table lines of a log. Writes training images/s per (resolution, batch) for each preset, and sampling
seconds per image against steps for each sampling batch.
Usage: ``python benchmarks/plot_scaling.py benchmarks/raw/2026-11-23-h200 --out benchmarks``.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from fusedit.imaging import plot_grouped_bars

TRAIN = re.compile(r"^train\s+(\S+)\s+(\d+)px b(\d+)\s+([\d.]+) img/s\s+([\d.]+) TFLOP/s\s+MFU\s+([\d.]+)%")
SAMPLE = re.compile(
    r"^sample\s+(\S+)\s+(\d+)px n(\d+)\s+([\d.]+) img/s\s+([\d.]+) s/img\s+(\d+) steps .* (cached|uncached)$"
)


def read_rows(folder: Path) -> list[dict]:
    rows = []
    for path in sorted(folder.glob("*.jsonl")):
        rows += [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    for path in sorted(folder.glob("*.log")):
        for line in path.read_text().splitlines():
            if m := TRAIN.match(line):
                preset, res, batch, ips = m[1], int(m[2]), int(m[3]), float(m[4])
                rows.append(
                    {
                        "kind": "train",
                        "preset": preset,
                        "resolution": res,
                        "batch": batch,
                        "images_per_s": ips,
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
                    }
                )
    return [r for r in rows if "preset" in r and "error" not in r]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("raw", type=Path)
    p.add_argument("--out", type=Path, default=Path("benchmarks"))
    p.add_argument(
        "--presets", nargs="+", default=["fusedit-gemma2b", "dit-self-gemma2b", "dit-cross-gemma2b"]
    )
    args = p.parse_args()
    rows = read_rows(args.raw)
    train = {
        (r["preset"], r["resolution"], r["batch"]): r["images_per_s"] for r in rows if r["kind"] == "train"
    }
    points = sorted({(res, b) for (preset, res, b) in train if preset in args.presets})
    shared = [pt for pt in points if all((p, *pt) in train for p in args.presets)]
    plot_grouped_bars(
        [f"{res}px b{b}" for res, b in shared],
        {p: [train[(p, *pt)] for pt in shared] for p in args.presets},
        args.out / "scaling_train.png",
        title="training images/s on one H200 (bf16 autocast, fp32 master weights)",
        ylabel="images/s",
    )
    sample = {
        (r["preset"], r["prompts"], r["steps"]): r["s_per_image"]
        for r in rows
        if r["kind"] == "sample" and r["text_cache"] and r["resolution"] == 512
    }
    steps = sorted({s for (_, _, s) in sample})
    series = {
        f"{p} n{n}": [sample.get((p, n, s), 0.0) for s in steps]
        for p, n in sorted({(p, n) for (p, n, _) in sample})
        if all((p, n, s) in sample for s in steps)
    }
    plot_grouped_bars(
        [f"{s} steps" for s in steps],
        series,
        args.out / "scaling_sample.png",
        title="sampling seconds per 512 px image (guidance 6, text cache) on one H200",
        ylabel="s/image",
    )


if __name__ == "__main__":
    main()
