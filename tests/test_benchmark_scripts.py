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


def target_rows(argv: list[str], monkeypatch, capsys) -> list[dict]:
    run_script("check_targets.py", [*argv, "--json"], monkeypatch)
    return [json.loads(line) for line in capsys.readouterr().out.splitlines()]


def test_check_targets_reads_run_c_as_results_md_states_it(monkeypatch, capsys):
    """The committed raw output of run C gives RESULTS.md's table: the two targets missed, the rest met."""
    rows = target_rows([str(BENCHMARKS / "raw" / "2026-11-24-h200")], monkeypatch, capsys)
    missed = sorted({r["target"] for r in rows if r["met"] is False})
    assert missed == [
        "sample 512 px, 4 prompts, 25 steps, cfg 6: >= 2.8 img/s",
        "train 512 px b16: >= 38 img/s",
    ]
    first = next(
        r
        for r in rows
        if r["record"].startswith(str(BENCHMARKS / "raw" / "2026-11-24-h200" / "gemma2b.jsonl:1"))
    )
    assert (first["measured"], first["settings"]) == (
        "36.04 (1.60x the public code's 22.5)",
        "defaults",
    ) and first["record"].endswith("@1ccf3db")
    graphs = [r for r in rows if "graphs.jsonl" in (r["record"] or "")]
    assert [(g["measured"], g["settings"]) for g in graphs] == [
        ("2.67 (1.51x the public code's 1.77)", "cuda_graphs=True")
    ]
    memory = [r["measured"] for r in rows if r["target"] == "train 512 px b16: memory <= 64 GB"]
    assert set(memory) == {"58.4 GiB (62.7 GB)"}
    assert all(r["met"] is not None for r in rows)  # every target measured, each variant beside gemma2b


def test_check_targets_says_what_was_not_measured_did_not_fit_or_moved_apart(tmp_path, monkeypatch, capsys):
    """An out-of-memory record fails "fits"; a padded-prompt or tagged record is not the issue's
    configuration; a variant whose session has no fusedit-gemma2b record cannot be judged."""
    lines = [
        train_row("fusedit-gemma2b", 256, 64, 0.0, error="out of memory"),
        train_row("fusedit-gemma2b", 512, 16, 40.0, min_text_tokens=32),
        train_row("fusedit-gemma2b", 512, 16, 41.0, tag="explore"),
        train_row("fusedit-2d-rope", 512, 16, 35.0, mfu=0.66),
        train_row("fusedit-gemma2b", 512, 16, 39.0, ema_offload=True, peak_memory_bytes=62e9, mfu=0.64),
    ]
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.jsonl").write_text("\n".join(json.dumps(line) for line in lines[:4]) + "\n")
    (tmp_path / "b.jsonl").write_text(json.dumps(lines[4]) + "\n")
    rows = target_rows([str(tmp_path / "a"), str(tmp_path / "b.jsonl")], monkeypatch, capsys)
    by_target = {}
    for r in rows:
        by_target.setdefault(r["target"], []).append(r)
    fits = by_target["train 256 px b64 fits"]
    assert [(r["measured"], r["met"]) for r in fits] == [("does not fit (out of memory)", False)]
    speed = by_target["train 512 px b16: >= 38 img/s"]
    assert [(r["measured"], r["met"], r["settings"]) for r in speed] == [
        ("39.00 (1.73x the public code's 22.5)", True, "ema_offload=True")
    ]
    assert [r["measured"] for r in by_target["train 512 px b16: memory <= 64 GB"]] == ["57.7 GiB (62.0 GB)"]
    assert by_target["large model samples >= 1.9 img/s"] == [
        {
            "target": "large model samples >= 1.9 img/s",
            "record": None,
            "settings": None,
            "measured": "not measured",
            "met": None,
        }
    ]
    (rope,) = by_target["fusedit-2d-rope: MFU within 5 points of fusedit-gemma2b's (512 px b16)"]
    assert (rope["measured"], rope["met"]) == ("66.0% (no fusedit-gemma2b record beside it)", None)


def test_check_targets_names_a_missing_folder(tmp_path, monkeypatch):
    with pytest.raises(SystemExit, match="no such folder or file: '.*nowhere'"):
        run_script("check_targets.py", [str(tmp_path / "nowhere")], monkeypatch)


def test_a_variant_is_judged_against_the_nearest_gemma_record_of_its_commit_and_settings(
    tmp_path, monkeypatch, capsys
):
    """Not a median over cards, commits and settings that matches no record: the nearest in time of the
    same commit and settings, named; a variant that ran out of memory fails."""

    def gemma(mfu, date, **extra):
        return train_row(
            "fusedit-gemma2b", 512, 16, 36.0, mfu=mfu, date=date, **{"commit": "aaaaaaa1", **extra}
        )

    def rope(mfu, date, **extra):
        return train_row(
            "fusedit-2d-rope", 512, 16, 35.0, mfu=mfu, date=date, **{"commit": "aaaaaaa1", **extra}
        )

    lines = [
        gemma(0.60, "2026-11-24T06:00:00+00:00"),
        gemma(0.70, "2026-11-24T07:00:00+00:00"),
        gemma(0.61, "2026-11-24T06:50:00+00:00", commit="bbbbbbb2"),  # another commit
        gemma(0.62, "2026-11-24T06:55:00+00:00", ema_offload=True),  # other settings
        rope(0.66, "2026-11-24T06:45:00+00:00"),
        rope(0.0, "2026-11-24T06:46:00+00:00", error="out of memory"),
    ]
    (tmp_path / "x.jsonl").write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    rows = target_rows([str(tmp_path)], monkeypatch, capsys)
    variant = [r for r in rows if r["target"].startswith("fusedit-2d-rope")]
    assert [(r["measured"], r["met"]) for r in variant] == [
        (f"66.0% against 70.0% ({tmp_path / 'x.jsonl'}:2 @aaaaaaa)", True),
        ("out of memory", False),
    ]


def test_profile_demo_step_splits_a_step_and_times_fusedit_trains_own_loop(monkeypatch, capsys):
    """RESULTS.md's CPU split: each part of a debug step, their sum, and `fusedit train`'s own loop per step
    (two real runs of the loop that differ in length), with its excess over the parts."""
    run_script("profile_demo_step.py", ["--steps", "1", "--loop-steps", "1", "--repeats", "1"], monkeypatch)
    lines = capsys.readouterr().out.splitlines()
    names = [line[:28].strip() for line in lines]
    assert names == [
        "data",
        "text",
        "dit fwd+bwd+adamw",
        "ema",
        "step (sum of the parts)",
        "fusedit train, per step",
    ]
    ms = [float(line[28:].split()[0]) for line in lines]
    # Printed to 0.1 ms. The loop's figure is a difference of two runs' times, one step apart here: on a
    # busy machine it may come out at or below 0, so only the parts (timed directly) must be positive.
    assert abs(sum(ms[:4]) - ms[4]) <= 0.25 and all(m > 0 for m in ms[:5])
    assert lines[-1].endswith(" ms over the parts)")
    with pytest.raises(SystemExit):
        run_script("profile_demo_step.py", ["--repeats", "0"], monkeypatch)
    assert "--repeats 0 is not allowed (allowed: 1 or more)" in capsys.readouterr().err
