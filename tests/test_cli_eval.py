"""`fusedit eval`: its flags are checked before the model loads, each bench's flags are refused with the
others, and the shapes bench samples with the run's sample section."""

import pytest

from conftest import tiny_config
from fusedit.cli import main
from fusedit.system import build_model
from fusedit.train.checkpoint import save_checkpoint


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A run folder (no training) whose sample section differs from the defaults."""
    root = tmp_path_factory.mktemp("eval")
    cfg = tiny_config(sample={"steps": 3, "guidance": 3.0, "negative_prompt": "a blur", "precision": "fp32"})
    model = build_model(cfg)
    save_checkpoint(root / "run", 0, cfg, model.denoiser, None, None, model.text.llm)
    return root / "run"


@pytest.fixture
def no_model_load(monkeypatch):
    """Fail the test if `fusedit eval` loads the model."""
    import fusedit.checkpoints

    def load_model(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(fusedit.checkpoints, "load_model", load_model)


@pytest.fixture
def shapes_bench(monkeypatch):
    """The keyword arguments each run of the shapes bench gets (it samples nothing)."""
    import fusedit.eval.shapes_bench

    calls = []

    def run_shapes_bench(model, image_size, out_dir, **kwargs):
        calls.append(kwargs)
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "scores.md").write_text("| scores |\n")
        return {"overall": 0.5, "num_images": 3}

    monkeypatch.setattr(fusedit.eval.shapes_bench, "run_shapes_bench", run_shapes_bench)
    return calls


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("fusedit: error: ") and err.count("\n") == 1, err
    return err


@pytest.mark.parametrize(
    "bench, args, message",
    [
        ("shapes", ["--steps", "0"], "--steps 0 is not allowed (allowed: an integer >= 1)"),
        ("geneval", ["--steps", "-2"], "--steps -2 is not allowed (allowed: an integer >= 1)"),
        ("shapes", ["--guidance", "-1"], "--guidance -1.0 is not allowed (allowed: a finite number >= 0)"),
        ("dpg", ["--guidance", "nan"], "--guidance nan is not allowed (allowed: a finite number >= 0)"),
        ("geneval", ["--size", "0"], "--size 0 is not allowed (allowed: a positive multiple"),
        ("dpg", ["--size", "15"], "--size 15 is not allowed (allowed: a positive multiple of 2, the VAE's"),
        ("shapes", ["--per-category", "0"], "--per-category 0 is not allowed (allowed: 1 or more)"),
        ("shapes", ["--seed", "-1"], "--seed -1 is out of range (allowed: 0..4294967295)"),
        ("geneval", ["--seed", str(2**64)], f"--seed {2**64} is out of range (allowed: 0..4294967295)"),
    ],
)
def test_bad_sampling_flags_fail_before_the_model_loads(run, capsys, no_model_load, bench, args, message):
    prompts = [] if bench == "shapes" else ["--prompts", "prompts.jsonl"]
    assert main(["eval", str(run), "--bench", bench, *prompts, *args, "--quiet"]) == 2
    assert message in one_line_error(capsys)


@pytest.mark.parametrize(
    "bench, args, allowed",
    [
        ("shapes", ["--detector", "det"], "--bench geneval or --bench t2i-compbench"),
        ("shapes", ["--clip", "clip"], "--bench geneval or --bench t2i-compbench"),
        ("shapes", ["--vqa", "vqa"], "--bench dpg or --bench t2i-compbench"),
        (
            "shapes",
            ["--prompts", "p.jsonl"],
            "--bench geneval or --bench dpg or --bench mjhq or --bench t2i-compbench",
        ),
        (
            "shapes",
            ["--size", "16"],
            "--bench geneval or --bench dpg or --bench mjhq or --bench t2i-compbench",
        ),
        ("geneval", ["--per-category", "5"], "--bench shapes or --bench mjhq"),
        ("dpg", ["--per-category", "5"], "--bench shapes or --bench mjhq"),
        ("geneval", ["--reference", "refs"], "--bench mjhq"),
        ("dpg", ["--features", "inception.pt"], "--bench mjhq"),
        ("mjhq", ["--vqa", "vqa"], "--bench dpg or --bench t2i-compbench"),
        ("dpg", ["--detector", "det"], "--bench geneval or --bench t2i-compbench"),
        ("geneval", ["--vqa", "vqa"], "--bench dpg or --bench t2i-compbench"),
    ],
)
def test_flags_of_another_bench_are_refused(run, capsys, no_model_load, bench, args, allowed):
    assert main(["eval", str(run), "--bench", bench, *args, "--quiet"]) == 2
    assert f"{args[0]} does not apply to --bench {bench} (allowed with: {allowed})" in one_line_error(capsys)


def test_the_shapes_bench_samples_with_the_runs_sample_section(run, tmp_path, capsys, shapes_bench):
    def evaluate(*args: str) -> dict:
        assert main(["eval", str(run), "--out", str(tmp_path), "--device", "cpu", "--quiet", *args]) == 0
        return shapes_bench[-1]

    saved = evaluate()
    expected = {"steps": 3, "guidance": 3.0, "negative_prompt": "a blur", "precision": "fp32", "seed": 0}
    assert saved == {**saved, **expected, "per_category": 20}
    assert "overall 0.500 on 3 held-out prompts" in capsys.readouterr().out
    # Flags replace the saved values, a zero guidance too.
    given = evaluate("--steps", "1", "--guidance", "0", "--seed", "5", "--per-category", "2")
    assert given == {**saved, "steps": 1, "guidance": 0.0, "seed": 5, "per_category": 2}


@pytest.mark.parametrize("bench", ["geneval", "dpg", "mjhq"])
def test_a_missing_prompts_flag_fails_before_the_model_loads(run, capsys, no_model_load, bench):
    assert main(["eval", str(run), "--bench", bench, "--quiet"]) == 2
    assert f"--bench {bench} needs --prompts PATH" in one_line_error(capsys)


def test_a_clip_path_to_nothing_is_named_with_its_flag(tmp_path, capsys):
    """Not taken for a malformed hub id (transformers: "Repo id must be in the form ...")."""
    from PIL import Image

    Image.new("RGB", (8, 8)).save(tmp_path / "00000.png")
    (tmp_path / "00000.json").write_text('{"prompt": "a red circle"}')
    missing = str(tmp_path / "noclip")
    assert main(["clip-score", str(tmp_path), "--clip", missing]) == 2
    assert one_line_error(capsys) == (
        f"fusedit: error: --clip {missing!r} is a path to nothing (allowed: a CLIP folder written by "
        "save_pretrained, or a hub id written org/name)\n"
    )
