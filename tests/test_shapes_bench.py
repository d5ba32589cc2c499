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
