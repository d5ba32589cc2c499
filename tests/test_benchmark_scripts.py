"""The scripts under benchmarks/ that RESULTS.md quotes still run at this commit (on CPU, tiny sizes), and
the scaling tables read the raw records as RESULTS.md says: one run per preset, exploratory records left out."""

import json
import runpy
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def run_script(name: str, argv: list[str], monkeypatch) -> dict:
    monkeypatch.setattr(sys, "argv", [name, *argv])
    return runpy.run_path(str(BENCHMARKS / name), run_name="__main__")


def test_check_fast_paths_runs_and_finds_the_fast_paths_equal(monkeypatch, capsys):
    run_script(
        "check_fast_paths.py",
        ["debug", "--device", "cpu", "--resolution", "16", "--layers", "1"],
        monkeypatch,
    )
    checks = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [c["check"] for c in checks] == [
        "compiled+auto vs eager+math: forward",
        "compiled+auto vs eager+math: grads",
        "sampling form vs training form",
    ]
    assert all(c["rel_err"] < 0.02 for c in checks)  # bf16 rounding, not another computation


def train_row(preset: str, res: int, batch: int, ips: float, **extra) -> dict:
    row = {"kind": "train", "preset": preset, "resolution": res, "batch": batch, "images_per_s": ips}
    return row | {"mfu": 0.5, "peak_memory_gib": 10.0} | extra


def test_plot_scaling_takes_each_presets_figures_from_one_run(tmp_path, monkeypatch, capsys):
    raw = tmp_path / "raw"
    raw.mkdir()
    rows = [train_row("a", 256, 8, 100.0), train_row("a", 512, 8, 30.0), train_row("b", 256, 8, 90.0)]
    sample = {
        "kind": "sample",
        "preset": "a",
        "resolution": 512,
        "prompts": 4,
        "steps": 25,
        "text_cache": True,
    }
    rows += [sample | {"s_per_image": 0.5}, train_row("b", 512, 8, 1.0, error="out of memory")]
    (raw / "runB.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    # An exploratory record (tagged) is not a scaling point; a log with more points of "a" is another run.
    (raw / "explore.jsonl").write_text(json.dumps(train_row("b", 512, 8, 999.0, tag="x")) + "\n")
    log = [
        "train  a    256px b8        99.00 img/s   1.00 TFLOP/s  MFU  60.0%  peak mem 9.5 GB",
        "train  a    512px b8        29.00 img/s   1.00 TFLOP/s  MFU  61.0%  peak mem 12.5 GiB (13.4 GB)  attention cudnn",
        "train  a   1024px b8         7.00 img/s   1.00 TFLOP/s  MFU  62.0%  peak mem 40.0 GiB (42.9 GB)",
        "sample a    512px n4         2.00 img/s    0.400 s/img  25 steps cfg 6.0  cached  attention cudnn",
    ]
    (raw / "runA.log").write_text("\n".join(log) + "\n")
    out = tmp_path / "charts"
    out.mkdir()
    run_script(
        "plot_scaling.py", [str(raw), "--out", str(out), "--presets", "a", "b", "--tables"], monkeypatch
    )
    tables = capsys.readouterr().out
    # "a" trains in runA.log (3 points against runB's 2); its one sampling point ties, and JSON wins it.
    # The log's "GB" was GiB before the unit was written out.
    assert tables.splitlines() == [
        "| preset (file) | 256 px b8 | 512 px b8 | 1024 px b8 |",
        "|---|---|---|---|",
        "| a (runA.log) | 99.0, 60.0%, 9.5 GiB | 29.0, 61.0%, 12.5 GiB | 7.00, 62.0%, 40.0 GiB |",
        "| b (runB.jsonl) | 90.0, 50.0%, 10.0 GiB |  |  |",
        "",
        "| preset, prompts (file) | 25 steps |",
        "|---|---|",
        "| a, 4 (runB.jsonl) | 0.500 / - |",
    ]
    assert sorted(p.name for p in out.iterdir()) == [
        "scaling_memory.png",
        "scaling_sample.png",
        "scaling_train.png",
    ]


@pytest.mark.parametrize("line", ["train  a  256px b8  oops", "sample a 512px n4 fast"])
def test_plot_scaling_ignores_lines_that_are_not_table_rows(line):
    module = runpy.run_path(str(BENCHMARKS / "plot_scaling.py"))
    assert not module["TRAIN"].match(line) and not module["SAMPLE"].match(line)
