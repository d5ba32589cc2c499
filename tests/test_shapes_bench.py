import json

import yaml

from conftest import TINY
from fusedit.cli import main
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
