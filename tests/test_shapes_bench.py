import json

import pytest
import torch
import yaml

import fusedit.eval.shapes_bench as shapes_bench
from conftest import TINY
from fusedit.cli import main
from fusedit.config import ConfigError
from fusedit.data.shapes import is_heldout
from fusedit.eval.shapes_bench import benchmark_prompts


def test_benchmark_prompts_are_held_out_fixed_and_balanced():
    prompts = benchmark_prompts(per_category=7, max_objects=4, seed=3)
    assert prompts == benchmark_prompts(per_category=7, max_objects=4, seed=3)
    assert all(is_heldout(p) for p in prompts)
    kinds = {p.kind for p in prompts}
    assert all(sum(p.kind == k for p in prompts) == 7 for k in kinds) and len(kinds) >= 4


def test_eval_cli_writes_scores_and_failures(tmp_path, capsys):
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(TINY))
    run = tmp_path / "run"
    assert main(["train", str(tmp_path / "tiny.yaml"), "train.steps=1", "--out", str(run), "--quiet"]) == 0
    out = tmp_path / "eval"
    assert main(["eval", str(run), "--per-category", "2", "--steps", "2", "--out", str(out), "--quiet"]) == 0
    scores = json.loads((out / "scores.json").read_text())
    assert set(scores) >= {"overall", "per_category", "counts", "verdicts", "settings"}
    assert scores["num_images"] == 2 * len(scores["per_category"])
    assert abs(scores["overall"] - sum(scores["per_category"].values()) / len(scores["per_category"])) < 1e-9
    assert (out / "scores.md").read_text().startswith("| model | overall |")
    assert (out / "failures.png").is_file()  # a one-step model fails, and its failures are shown
    assert "held-out prompts" in capsys.readouterr().out


def test_bench_samples_with_the_given_settings_and_writes_results_atomically(tmp_path, monkeypatch):
    calls, written = [], []

    def fake_generate(model, prompts, **kw):
        calls.append(kw)
        return torch.ones(len(prompts), 3, 16, 16)  # white: nothing detected, every prompt fails

    def atomic(path, text):
        written.append(path.name)
        path.write_text(text)

    monkeypatch.setattr(shapes_bench, "generate", fake_generate)
    monkeypatch.setattr(shapes_bench, "write_text_atomic", atomic)
    scores = shapes_bench.run_shapes_bench(
        None,
        16,
        tmp_path,
        per_category=1,
        negative_prompt="blurry",
        precision="fp32",
        shift=2.0,
        schedule="diffusers",
        progress=False,
    )
    given = ("blurry", "fp32", 2.0, "diffusers")
    keys = ("negative_prompt", "precision", "shift", "schedule")
    assert {tuple(c[k] for k in keys) for c in calls} == {given}
    assert tuple(scores["settings"][k] for k in keys) == given
    assert written == ["scores.json", "scores.md"]
    assert json.loads((tmp_path / "scores.json").read_text())["overall"] == 0.0


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ({"per_category": 0}, r"per_category=0 is not allowed \(allowed: an integer >= 1\)"),
        ({"per_category": -3}, r"per_category=-3 is not allowed \(allowed: an integer >= 1\)"),
        ({"steps": 0}, r"steps=0 is not allowed \(allowed: an integer >= 1\)"),
        ({"guidance": -1.0}, r"guidance=-1.0 is not allowed \(allowed: a finite number >= 0\)"),
        ({"guidance": float("nan")}, r"guidance=nan is not allowed \(allowed: a finite number >= 0\)"),
    ],
)
def test_bench_rejects_bad_settings_in_one_line_before_sampling(tmp_path, setting, message):
    with pytest.raises(ConfigError, match=f"^{message}$"):
        shapes_bench.run_shapes_bench(None, 16, tmp_path, progress=False, **setting)
    assert not (tmp_path / "scores.json").exists()


def test_bench_records_the_model_and_marks_the_kinds_it_never_trained(tmp_path, monkeypatch):
    monkeypatch.setattr(
        shapes_bench, "generate", lambda model, prompts, **kw: torch.ones(len(prompts), 3, 16, 16)
    )
    source = {"checkpoint": "step_00000300", "weights": "0123456789abcdef", "ema": False, "model": "runA/x"}
    scores = shapes_bench.run_shapes_bench(
        None,
        16,
        tmp_path,
        name="runA@300 raw",
        per_category=1,
        max_objects=2,
        progress=False,
        source=source,
        trained_kinds=["single", "two", "position"],
    )
    assert scores["settings"] == {**scores["settings"], **source}
    assert scores["untrained"] == ["counting", "color_attr"]
    assert len(scores["per_category"]) == 5  # the overall stays over every category
    assert (tmp_path / "scores.md").read_text() == (
        "| model | overall | single | two | counting (untrained) | position | color_attr (untrained) |\n"
        "|---|---|---|---|---|---|---|\n"
        "| runA@300 raw | 0.000 | 0.000 | 0.000 | 0.000 | 0.000 | 0.000 |\n"
        "\n"
        "counting, color_attr untrained: not in the run's data.kinds; the overall is over all 5 categories, "
        "comparable across runs\n"
    )


def test_eval_cli_names_and_records_what_it_scored_and_a_fresh_run_drops_the_old_scores(tmp_path, capsys):
    """EMA and raw weights are scored into folders of their own, each recording its checkpoint, weights and
    EMA flag, and named by run and step in scores.md; `train --overwrite` deletes those of the old model."""
    from fusedit.checkpoints import weights_fingerprint

    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(TINY))
    run = tmp_path / "runA"
    train = ["train", str(tmp_path / "tiny.yaml"), "train.steps=1", "--out", str(run), "--quiet"]
    assert main(train) == 0
    ckpt = run / "checkpoints" / "step_00000001"
    for flags, folder, ema, row in [
        ([], "step_00000001", True, "runA@1"),
        (["--no-ema"], "step_00000001-raw", False, "runA@1 raw"),
    ]:
        capsys.readouterr()
        assert main(["eval", str(run), "--per-category", "1", "--steps", "1", "--quiet", *flags]) == 0
        out = run / "eval" / folder / "shapes"
        scores = json.loads((out / "scores.json").read_text())
        expected = {
            "checkpoint": "step_00000001",
            "weights": weights_fingerprint(ckpt),
            "ema": ema,
            "model": str(ckpt),
        }
        assert scores["settings"] == {**scores["settings"], **expected}
        assert (out / "scores.md").read_text().splitlines()[2].startswith(f"| {row} | ")
        printed = capsys.readouterr().out.splitlines()
        assert printed[0] == f"scoring {ckpt} ({'EMA' if ema else 'raw'} weights)"
        assert printed[-1] == (
            f"overall {scores['overall']:.3f} on {scores['num_images']} held-out prompts (counting, color_attr "
            "untrained: not in the run's data.kinds; the overall is over all 5 categories, comparable across "
            f"runs); details in {out}"
        )
    assert main([*train, "--overwrite"]) == 0
    assert not (run / "eval").exists()
