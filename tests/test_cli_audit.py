"""The command line under wrong and edge-case arguments: each is refused at once with one line naming the
bad value and what is allowed, before any slow work or any output is written."""

import json
from pathlib import Path

import pytest
import yaml

from conftest import TINY, CtrlCAtStep
from fusedit.cli import main

TINY_STUDY = Path(__file__).resolve().parents[1] / "studies" / "timestep-tiny.yaml"


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("fusedit: error: ") and "\n" not in err, err
    return err


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A one-step run that samples at guidance 1 (its saved sample.guidance)."""
    folder = tmp_path_factory.mktemp("audit")
    (folder / "tiny.yaml").write_text(yaml.safe_dump(TINY))
    run = folder / "run"
    argv = ["train", str(folder / "tiny.yaml"), "train.steps=1", "sample.guidance=1", "--out", str(run)]
    assert main([*argv, "--quiet"]) == 0
    return run


def test_demo_refuses_a_folder_holding_a_run_unless_overwrite(tiny_run, capsys, monkeypatch):
    """The demo trains afresh, which deletes the checkpoints and metrics of the run in --out: a run
    trained for days, given as --out by mistake, was silently lost."""
    import fusedit.demo

    monkeypatch.setattr(fusedit.demo, "run_demo", lambda *a, **k: pytest.fail("trained"))
    assert main(["demo", "--out", str(tiny_run), "--quiet"]) == 2
    err = _one_line_error(capsys)
    assert f"{str(tiny_run)!r} already holds a run (checkpoint at step 1): pass --overwrite" in err
    ran = []
    result = {"final_loss": 1.0, "samples": "s", "loss_curve": "l", "checkpoint": "c"}
    monkeypatch.setattr(fusedit.demo, "run_demo", lambda cfg, out, **k: ran.append(out) or result)
    assert main(["demo", "--out", str(tiny_run), "--overwrite", "--quiet"]) == 0
    assert ran == [tiny_run]


def test_demo_replaces_an_earlier_demo_run(tmp_path, monkeypatch):
    """The README's demo command run twice: the run in --out is the demo's own preset's, so it is replaced."""
    import fusedit.demo
    from fusedit.config import load_config
    from fusedit.system import build_model
    from fusedit.train.checkpoint import save_checkpoint

    cfg = load_config("debug")
    model = build_model(cfg)
    save_checkpoint(tmp_path / "demo", 3, cfg, model.denoiser, None, None, model.text.llm)
    ran = []
    result = {"final_loss": 1.0, "samples": "s", "loss_curve": "l", "checkpoint": "c"}
    monkeypatch.setattr(fusedit.demo, "run_demo", lambda cfg, out, **k: ran.append(out) or result)
    # A run of the demo's own preset that `fusedit train` made (no loss curve, no prompt sheet) is kept.
    assert main(["demo", "--out", str(tmp_path / "demo"), "--quiet"]) == 2
    for name in ("loss.png", "samples.png"):  # what only the demo writes
        (tmp_path / "demo" / name).write_bytes(b"png")
    assert main(["demo", "--out", str(tmp_path / "demo"), "--quiet"]) == 0
    assert ran == [tmp_path / "demo"]


def test_demo_final_loss_is_the_mean_of_the_last_steps_even_below_50(tmp_path, monkeypatch):
    """`fusedit demo train.steps=2` printed the sum of its 2 losses divided by 50."""
    import fusedit.demo
    from fusedit.config import load_config

    def train(cfg, run_dir, **kwargs):
        lines = [json.dumps({"step": i + 1, "loss": loss}) for i, loss in enumerate((1.0, 2.0))]
        (run_dir / "metrics.jsonl").write_text("\n".join(lines) + "\n")
        return {"losses": [1.0, 2.0]}

    monkeypatch.setattr(fusedit.demo, "train", train)
    monkeypatch.setattr(fusedit.demo, "plot_curve", lambda *a, **k: None)
    monkeypatch.setattr(fusedit.demo, "sample_sheet", lambda run_dir, *a, **k: run_dir / "samples.png")
    r = fusedit.demo.run_demo(load_config("debug", ["train.steps=2"]), tmp_path, progress=False)
    assert r["final_loss"] == pytest.approx(1.5)
    # A step skipped for a NaN loss (train.max_bad_steps) logs it: left out of the mean.
    monkeypatch.setattr(fusedit.demo, "train", lambda *a, **k: {"losses": [1.0, float("nan"), 2.0]})
    r = fusedit.demo.run_demo(load_config("debug", ["train.steps=3"]), tmp_path, progress=False)
    assert r["final_loss"] == pytest.approx(1.5)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--what", "train", "--steps", "5"], "--steps does not apply with --what train"),
        (["--what", "train", "--prompts", "2"], "--prompts does not apply with --what train"),
        (["--what", "train", "--guidance", "2"], "--guidance does not apply with --what train"),
        (["--what", "train", "--cached-only"], "--cached-only does not apply with --what train"),
        (["--what", "sample", "--batch", "2"], "--batch does not apply with --what sample"),
        (["--what", "sample", "--train-points", "32x2"], "--train-points does not apply with --what sample"),
    ],
)
def test_bench_refuses_the_flags_of_the_part_it_does_not_run(flags, message, tmp_path, capsys, monkeypatch):
    """They were accepted and silently ignored: `--what train --steps 5` measured what it always does."""
    monkeypatch.setattr("fusedit.bench.setup", lambda *a, **k: pytest.fail("the model was built"))
    assert main(["bench", "debug", *flags]) == 2
    assert message in _one_line_error(capsys)


def test_bench_refuses_a_json_file_it_cannot_append_to_before_building_the_model(
    tmp_path, capsys, monkeypatch
):
    """open() failed after the model build (minutes for a large preset), with a bare [Errno 2] or [Errno
    21] naming no flag."""
    monkeypatch.setattr("fusedit.bench.setup", lambda *a, **k: pytest.fail("the model was built"))
    assert main(["bench", "debug", "--json", str(tmp_path)]) == 2
    assert f"--json {str(tmp_path)!r} is a folder (allowed: a file" in _one_line_error(capsys)
    missing = tmp_path / "nope" / "b.jsonl"
    assert main(["bench", "debug", "--json", str(missing)]) == 2
    err = _one_line_error(capsys)
    assert f"--json {str(missing)!r}: there is no folder {str(missing.parent)!r}" in err


def test_benchmarks_download_refuses_a_dest_that_is_a_file(tmp_path, capsys, monkeypatch):
    """Was a bare "[Errno 17] File exists"."""
    monkeypatch.setattr("fusedit.eval.benchmarks.download", lambda *a, **k: pytest.fail("downloaded"))
    afile = tmp_path / "afile"
    afile.write_text("")
    assert main(["benchmarks", "download", "geneval", "--dest", str(afile)]) == 2
    assert f"--dest {str(afile)!r} is a file (allowed: a folder" in _one_line_error(capsys)


def test_study_check_refuses_a_design_it_does_not_have(capsys):
    """--check ("validate") passed an --only naming no design, which the real run then refused."""
    assert main(["study", str(TINY_STUDY), "--check", "--only", "adaln-zero", "bogus"]) == 2
    err = _one_line_error(capsys)
    assert "design 'bogus' is not in study timestep-tiny (allowed: adaln-zero," in err
    assert main(["study", str(TINY_STUDY), "--check", "--only", "adaln-zero"]) == 0


def test_study_refuses_a_bad_device_before_making_its_output_folder(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("fusedit.study.run.run_study", lambda *a, **k: pytest.fail("ran"))
    out = tmp_path / "study"
    assert main(["study", str(TINY_STUDY), "--device", "bogus", "--out", str(out)]) == 2
    assert "--device 'bogus' is not allowed" in _one_line_error(capsys)
    assert not out.exists()


def test_sample_refuses_a_negative_prompt_that_guidance_1_ignores(tiny_run, tmp_path, capsys, monkeypatch):
    """Guidance 1 runs no unconditional branch: the negative prompt changed nothing, yet was recorded in
    each image's JSON as if it had."""
    import fusedit.sampling.source

    out = tmp_path / "samples"
    argv = ["sample", str(tiny_run), "--prompt", "a red circle", "--negative-prompt", "blurry"]
    argv += ["--steps", "1", "--out", str(out), "--quiet"]
    load = fusedit.sampling.source.load_sampling_model
    monkeypatch.setattr(fusedit.sampling.source, "load_sampling_model", lambda *a, **k: pytest.fail("loaded"))
    assert main([*argv, "--guidance", "1"]) == 2  # given: refused before the model loads
    err = _one_line_error(capsys)
    assert "--negative-prompt 'blurry' does nothing at guidance 1" in err
    monkeypatch.setattr(fusedit.sampling.source, "load_sampling_model", load)
    assert main(argv) == 2  # the run's saved sample.guidance is 1
    assert "--negative-prompt 'blurry' does nothing at guidance 1" in _one_line_error(capsys)
    assert not list(out.glob("*.png"))
    assert main([*argv, "--guidance", "2"]) == 0
    assert json.loads((out / "00000.json").read_text())["negative_prompt"] == "blurry"


@pytest.mark.parametrize(
    "error, message",
    [
        (RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 1 bytes."), True),
        (type("OutOfMemoryError", (RuntimeError,), {})("CUDA out of memory. Tried to allocate 9 GiB"), True),
        (RuntimeError("a bug"), False),
    ],
)
def test_running_out_of_memory_is_one_line_and_other_runtime_errors_are_not_hidden(
    capsys, monkeypatch, error, message
):
    """`fusedit sample run --size 100000` ran out of memory with a traceback."""
    import fusedit.cli.describe

    def fail(args):
        raise error

    monkeypatch.setattr(fusedit.cli.describe, "cmd_presets", fail)
    if not message:
        with pytest.raises(RuntimeError, match="a bug"):
            main(["presets"])
        return
    assert main(["presets"]) == 2
    err = _one_line_error(capsys)
    assert err.startswith(f"fusedit: error: out of memory: {error}") and "(allowed: less at once" in err


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            ["model.num_layers=7"],
            "model.initial_layers=0 + model.num_layers=7 needs 7 LLM layers but the LLM has 6: deep fusion "
            "pairs every DiT layer with one LLM layer (allowed: initial_layers + num_layers <= 6)",
        ),
        (
            ["text.arch.head_dim=6", "model.pos_embed=2d-rope"],
            "model.pos_embed='2d-rope' needs a head width divisible by 4 (rotated channel pairs, half for the "
            "row and half for the column), but the DiT's heads are 6 wide (the LLM's head_dim) (allowed: a "
            "head width divisible by 4, or model.pos_embed ape or 1d-rope)",
        ),
        (
            ["model.design=dit-self", "model.num_heads=5", "model.pos_embed=1d-rope"],
            "model.num_heads=5 does not divide the DiT width (model.dit_hidden_size=128) into whole heads "
            "(allowed: a divisor of 128, or model.head_dim set too)",
        ),
    ],
)
def test_config_describe_and_train_refuse_a_model_the_llm_cannot_carry_before_writing(
    overrides, message, tmp_path, capsys
):
    """`fusedit config` ("validated") printed these and exited 0; `fusedit train` wrote its run folder, then
    failed with a traceback at the first step (or at the build)."""
    for command in (["config", "debug"], ["describe", "debug"]):
        assert main([*command, *overrides]) == 2
        assert _one_line_error(capsys) == f"fusedit: error: {message}"
    out = tmp_path / "run"
    assert main(["train", "debug", *overrides, "train.steps=1", "--out", str(out), "--quiet"]) == 2
    assert _one_line_error(capsys) == f"fusedit: error: {message}"
    assert not out.exists()


@pytest.mark.parametrize(
    "tokens, warning",
    [
        (
            "65",
            "--text-tokens 65 is more than the LLM's max_position_embeddings=64: the prompts read positions it "
            "never learned; set --text-tokens <= 64",
        ),
        (
            "20",
            "--text-tokens 20 is more than text.max_length=16: training and sampling cut prompts to 16 tokens, "
            "so no run of this config reads prompts this long",
        ),
        ("16", None),
    ],
)
def test_bench_warns_of_text_tokens_past_what_the_model_reads(tokens, warning, monkeypatch, caplog):
    """`--text-tokens 100000` on the debug preset (64 positions) ran for minutes without a word."""

    class Measured(Exception):
        pass

    def measured(*args, **kwargs):
        raise Measured

    monkeypatch.setattr("fusedit.bench.bench_sample", measured)
    argv = ["bench", "debug", "--what", "sample", "--prompts", "1", "--steps", "1", "--text-tokens", tokens]
    with caplog.at_level("WARNING", logger="fusedit.bench"), pytest.raises(Measured):
        main(argv)
    warned = [r.getMessage() for r in caplog.records if r.name == "fusedit.bench"]
    assert warned == ([warning] if warning else [])


@pytest.mark.parametrize(
    "argv, message",
    [
        (["config", "debug", "text.arch.hidden_size=-4"], "text.arch.hidden_size=-4 is not allowed (allowed: an integer >= 1)"),
        (["describe", "debug", "text.arch.head_dim=0"], "text.arch.head_dim=0 is not allowed (allowed: an integer >= 1)"),
        (["config", "debug", "text.arch.vocab_sizee=3"], "unknown config key 'text.arch.vocab_sizee': did you mean 'text.arch.vocab_size'?"),
        (["config", "debug", "data.weights=[abc]"], "data.weights=['abc'] is not allowed (allowed: finite numbers >= 0"),
        (["train", "debug", "name=../escaped", "train.steps=1"], "name='../escaped' cannot name the run folder runs/<name> (allowed: a word of letters"),
        (["config", "{tmp}/b.yaml"], "{tmp}/b.yaml: base=5 is not allowed (allowed: a preset name, a YAML path, or a run folder)"),
        (["train", "{tmp}/empty.yaml"], "{tmp}/empty.yaml: the file is empty (allowed: a YAML mapping of sections"),
    ],
)  # fmt: skip
def test_bad_config_values_are_one_line_errors_not_tracebacks(tmp_path, capsys, monkeypatch, argv, message):
    """Arch sizes of 0 or less ended in torch tracebacks at the build; the rest passed `fusedit config` or
    trained (an arch typo, data.weights=[abc], a run name leaving runs/) or misled (an empty file)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "b.yaml").write_text("base: 5\n")
    (tmp_path / "empty.yaml").write_text("")
    assert main([a.format(tmp=tmp_path) for a in argv]) == 2
    assert _one_line_error(capsys).startswith("fusedit: error: " + message.format(tmp=tmp_path))
    assert not (tmp_path / "runs").exists()


def test_ctrl_c_in_the_demo_says_what_is_kept_and_how_to_go_on(tmp_path, capsys, monkeypatch):
    """Ctrl+C in the demo said only "stopped before the end" (h-docs R1)."""
    import shlex

    import fusedit.demo

    out = tmp_path / "demo"
    small = ["train.steps=4", "train.checkpoint_every=2", "train.batch_size=2"]
    argv = ["demo", *small, "--out", str(out), "--quiet"]
    ctrl_c_at_step_3 = CtrlCAtStep(monkeypatch, 3)
    assert main(argv) == 130
    resume = f"fusedit train debug {' '.join(small)} --out {out} --resume"
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"fusedit: interrupted: the demo's run in {out} stopped; its last checkpoint is "
        f"{out / 'checkpoints' / 'step_00000002'} (step 2 of 4); rerun the same command with --overwrite to run "
        f"the demo over, or `{resume}` to finish its training (without the demo's plots)"
    )
    ctrl_c_at_step_3.disarm()
    assert main([*shlex.split(resume)[1:], "--quiet"]) == 0
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 4

    def ctrl_c(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(fusedit.demo, "sample_sheet", ctrl_c)  # stopped after the training
    assert main([*argv, "--overwrite"]) == 130
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"fusedit: interrupted: the demo's run in {out} finished training (checkpoint "
        f"{out / 'checkpoints' / 'step_00000004'}) but not its sample sheet; rerun the same command to run the "
        f"demo over, or sample the run with `fusedit sample {out} --prompt ...`"
    )
