"""`fusedit eval`: its flags are checked before the model loads, each bench's flags are refused with the
others, the shapes bench samples with the run's sample section, and each eval names, records and loads
exactly the checkpoint it scores, into a folder of its own."""

import fcntl
import json
import shutil
from pathlib import Path

import pytest

from conftest import randomize, tiny_config
from fusedit.cli import main
from fusedit.config import save_config
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


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A run folder with two checkpoints (steps 1 and 2) of other weights, each with its EMA weights, as
    training saves them; tests that write into it take a copy (``copy_of``)."""
    root = tmp_path_factory.mktemp("trained")
    cfg = tiny_config(sample={"steps": 1, "precision": "fp32"})
    model = build_model(cfg)
    for step in (1, 2):
        randomize(model.denoiser)
        ema = {k: v.clone() for k, v in model.denoiser.state_dict().items()}
        save_checkpoint(root / "runA", step, cfg, model.denoiser, ema, None, model.text.llm)
    return root / "runA"


def copy_of(run: Path, tmp_path: Path) -> Path:
    shutil.copytree(run, tmp_path / run.name)
    return tmp_path / run.name


def write_geneval(path: Path, n: int = 1) -> Path:
    """A GenEval metadata file of ``n`` single-object prompts."""
    rows = [
        {"tag": "single_object", "include": [{"class": "cat", "count": 1}], "prompt": f"a cat {i}"}
        for i in range(n)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


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
        calls.append({**kwargs, "out_dir": out_dir})
        out_dir.mkdir(parents=True, exist_ok=True)
        return {"overall": 0.5, "num_images": 3, "per_category": {"single": 0.5}}

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
        ("geneval", ["--limit", "0"], "--limit 0 is not allowed (allowed: 1 or more)"),
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
        ("shapes", ["--limit", "5"], "--bench geneval or --bench dpg"),
        ("mjhq", ["--limit", "5"], "--bench geneval or --bench dpg"),
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


def test_an_mjhq_cache_dir_that_is_a_file_fails_before_the_model_loads(run, tmp_path, capsys, no_model_load):
    (tmp_path / "afile").write_text("")
    command = ["eval", str(run), "--bench", "mjhq", "--prompts", "p", "--cache-dir", str(tmp_path / "afile")]
    assert main([*command, "--quiet"]) == 2
    assert one_line_error(capsys) == (
        f"fusedit: error: --cache-dir {str(tmp_path / 'afile')!r} is a file (allowed: a folder, new or existing)\n"
    )


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


def test_the_default_out_is_one_folder_per_checkpoint_and_weights_outside_the_checkpoints(
    trained, tmp_path, capsys, shapes_bench
):
    """Successive checkpoints and EMA vs raw weights never share (and are never refused from) one folder, and
    nothing lands inside a checkpoint folder, which train.keep_checkpoints deletes."""
    run = copy_of(trained, tmp_path)
    ckpts = run / "checkpoints"
    for args, expected in [
        ([str(run)], run / "eval" / "step_00000002" / "shapes"),
        ([str(run), "--no-ema"], run / "eval" / "step_00000002-raw" / "shapes"),
        ([str(ckpts / "step_00000001")], run / "eval" / "step_00000001" / "shapes"),
    ]:
        assert main(["eval", *args, "--device", "cpu", "--quiet"]) == 0
        assert shapes_bench[-1]["out_dir"] == expected
        assert capsys.readouterr().out.endswith(f"; details in {expected}\n")
    assert sorted(p.name for p in (run / "eval").iterdir()) == [
        "step_00000001",
        "step_00000002",
        "step_00000002-raw",
    ]
    assert not list(ckpts.glob("*/eval"))


def test_a_checkpoint_without_ema_weights_is_scored_recorded_and_filed_as_raw(run, tmp_path, capsys):
    """Its raw weights load whether --no-ema is given or not: the record says so, and both commands use
    (and resume) the same folder."""
    shutil.copytree(run, tmp_path / "run")
    run = tmp_path / "run"
    prompts = write_geneval(tmp_path / "geneval.jsonl")
    args = ["eval", str(run), "--bench", "geneval", "--prompts", str(prompts), "--steps", "1"]
    args += ["--device", "cpu"]
    assert main([*args, "--quiet"]) == 0
    out = run / "eval" / "step_00000000-raw" / "geneval"
    assert json.loads((out / "generation.json").read_text())["ema"] is False
    first = capsys.readouterr().out.splitlines()[0]
    assert (
        first == f"scoring {run / 'checkpoints' / 'step_00000000'} (raw weights: step_00000000 holds no EMA)"
    )
    assert main([*args, "--no-ema", "--quiet"]) == 0
    assert capsys.readouterr().out.splitlines()[:2] == [
        f"scoring {run / 'checkpoints' / 'step_00000000'} (raw weights)",
        f"geneval: wrote {out} (1 prompt: 0 generated, 1 already there)",
    ]


def test_the_eval_names_the_checkpoint_it_scores_and_a_run_still_training(
    trained, tmp_path, capsys, shapes_bench
):
    run = copy_of(trained, tmp_path)

    def first_line(*args: str) -> str:
        assert main(["eval", *args, "--out", str(tmp_path / "out"), "--device", "cpu", "--quiet"]) == 0
        return capsys.readouterr().out.splitlines()[0]

    latest = run / "checkpoints" / "step_00000002"
    assert first_line(str(run)) == f"scoring {latest} (EMA weights)"
    assert first_line(str(run), "--no-ema") == f"scoring {latest} (raw weights)"
    # train.lock held by a training job (train.run_folder holds an exclusive flock on it while it trains).
    with (run / "train.lock").open("a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert first_line(str(run / "checkpoints" / "step_00000001")) == (
            f"scoring {run / 'checkpoints' / 'step_00000001'} (EMA weights); the run is still training "
            "(train.lock held)"
        )
    assert first_line(str(run)) == f"scoring {latest} (EMA weights)"  # released: the training ended


def test_a_second_eval_into_a_folder_another_eval_holds_is_refused(trained, tmp_path, capsys, shapes_bench):
    """One eval job per output folder (eval.lock, held as train.lock is): the second is refused in one line
    naming the holder, before it loads or writes anything; once the first ends, the folder is free."""
    run, out = copy_of(trained, tmp_path), tmp_path / "out"
    out.mkdir()
    with (out / "eval.lock").open("a+") as lock:
        lock.write("pid 1 on elsewhere since 2026-11-25 10:00:00, token 0\n")
        lock.flush()
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert main(["eval", str(run), "--out", str(out), "--device", "cpu", "--quiet"]) == 2
        assert capsys.readouterr().err.strip() == (
            f"fusedit: error: {out} is being written by another job evaluating into it (pid 1 on elsewhere since "
            "2026-11-25 10:00:00; see eval.lock): wait for it to end, or give another --out"
        )
        assert sorted(p.name for p in out.iterdir()) == ["eval.lock"]
    assert main(["eval", str(run), "--out", str(out), "--device", "cpu", "--quiet"]) == 0


def test_the_model_loaded_is_the_checkpoint_recorded_while_training_moves_latest(
    trained, tmp_path, monkeypatch
):
    """Evaluating a run while it trains: a save (or a rotation) between the record and the model's lazy load
    must not make the images with another checkpoint than generation.json names."""
    import fusedit.eval.benchmarks
    import fusedit.sampling.source

    run = copy_of(trained, tmp_path)
    read_prompts, load = fusedit.eval.benchmarks.load_geneval, fusedit.sampling.source.load_sampling_model
    loaded = []

    def load_geneval(path):  # after the record is taken, before the first image: latest moves
        (run / "checkpoints" / "latest").write_text("step_00000001")
        return read_prompts(path)

    def load_sampling_model(path, *args, **kwargs):
        loaded.append(Path(path))
        return load(path, *args, **kwargs)

    monkeypatch.setattr(fusedit.eval.benchmarks, "load_geneval", load_geneval)
    monkeypatch.setattr(fusedit.sampling.source, "load_sampling_model", load_sampling_model)
    prompts = write_geneval(tmp_path / "geneval.jsonl")
    out = tmp_path / "ge"
    args = ["eval", str(run), "--bench", "geneval", "--prompts", str(prompts), "--out", str(out), "--quiet"]
    assert main([*args, "--device", "cpu"]) == 0
    assert loaded == [run / "checkpoints" / "step_00000002"]
    assert json.loads((out / "generation.json").read_text())["checkpoint"] == "step_00000002"


def test_the_load_is_logged_before_it_starts(trained, tmp_path, caplog, monkeypatch, shapes_bench):
    import fusedit.sampling.source

    load, logged = fusedit.sampling.source.load_sampling_model, []

    def load_sampling_model(*args, **kwargs):  # what was logged when the (slow) load began
        logged.extend(r.getMessage() for r in caplog.records if r.name == "fusedit.cli")
        return load(*args, **kwargs)

    monkeypatch.setattr(fusedit.sampling.source, "load_sampling_model", load_sampling_model)
    with caplog.at_level("INFO", logger="fusedit.cli"):
        assert main(["eval", str(trained), "--out", str(tmp_path), "--device", "cpu", "--quiet"]) == 0
    assert logged == [
        # An early checkpoint's EMA is mostly its random init: said before its scores (cli.common._warn_early_ema).
        "the EMA weights at step 2 still hold 98% of the random initial weights (train.ema_decay=0.99 every "
        "train.ema_every=1 steps): --no-ema uses the trained weights",
        f"loading {trained / 'checkpoints' / 'step_00000002'} ...",
    ]


def test_a_folder_of_another_checkpoints_images_names_that_checkpoint_to_finish_them(
    trained, tmp_path, capsys, monkeypatch
):
    """--out ge of the run made images with its latest checkpoint, step 1, then training saved step 2: the
    same command is refused, and the refusal says how to finish the folder while step 1 is still there."""
    import fusedit.checkpoints

    run = copy_of(trained, tmp_path)
    earlier = run / "checkpoints" / "step_00000001"
    prompts = write_geneval(tmp_path / "geneval.jsonl")
    out = tmp_path / "ge"
    flags = ["--bench", "geneval", "--prompts", str(prompts), "--out", str(out), "--device", "cpu", "--quiet"]
    assert main(["eval", str(earlier), *flags]) == 0
    capsys.readouterr()
    monkeypatch.setattr(
        fusedit.checkpoints, "load_model", lambda *a, **k: pytest.fail("the model was loaded")
    )
    assert main(["eval", str(run), *flags]) == 2
    assert one_line_error(capsys).endswith(
        "give a new --out, or delete the folder to regenerate; to finish it, evaluate "
        f"{earlier} with --out {out}\n"
    )
    # With another seed too, that command would be refused again: not named.
    assert main(["eval", str(run), *flags, "--seed", "7"]) == 2
    assert one_line_error(capsys).endswith("give a new --out, or delete the folder to regenerate\n")
    shutil.rmtree(earlier)  # rotated away: nothing can finish them
    assert main(["eval", str(run), *flags]) == 2
    assert one_line_error(capsys).endswith("give a new --out, or delete the folder to regenerate\n")


def test_an_interrupted_protocol_says_what_it_kept(trained, tmp_path, capsys, monkeypatch):
    import fusedit.eval.run
    import fusedit.sampling.source

    prompts = write_geneval(tmp_path / "geneval.jsonl", 2)
    out = tmp_path / "ge"
    command = ["eval", str(trained), "--bench", "geneval", "--prompts", str(prompts), "--out", str(out)]

    def load_sampling_model(*args, **kwargs):  # Ctrl+C during the model load: no image yet
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(fusedit.sampling.source, "load_sampling_model", load_sampling_model)
        assert main([*command, "--quiet"]) == 130
    assert capsys.readouterr().err == (
        f"fusedit: interrupted: no image was written to {out}; rerun the same command to start\n"
    )

    def run_geneval(gen, prompts_path, out_dir, **kwargs):  # Ctrl+C after one prompt's 4 images
        for k in range(4):
            (out_dir / "samples" / "00000" / "samples").mkdir(parents=True, exist_ok=True)
            (out_dir / "samples" / "00000" / "samples" / f"{k:05d}.png").write_bytes(b"png")
        raise KeyboardInterrupt

    monkeypatch.setattr(fusedit.eval.run, "run_geneval", run_geneval)
    assert main([*command, "--quiet"]) == 130
    # MODEL is a run folder, whose latest checkpoint may move on: the one scored is named.
    from fusedit.checkpoints import find_checkpoint

    assert capsys.readouterr().err == (
        f"fusedit: interrupted: 4 images in {out} are kept; to go on, evaluate {find_checkpoint(trained)} with "
        f"--out {out}\n"
    )


@pytest.mark.parametrize(
    "bench, flags, scores, part",
    [
        (
            "geneval",
            ["--limit", "2"],
            {
                "overall": 0.25,
                "num_prompts": 2,
                "missing_tasks": ["two_object", "counting", "colors", "position", "color_attr"],
            },
            " over 2 prompts (the first 2: --limit 2; 1 of 6 tasks: single_object)",
        ),
        ("geneval", [], {"overall": 0.25, "num_prompts": 553, "missing_tasks": []}, " over 553 prompts"),
        (
            "dpg",
            [],
            {"overall": 0.25, "num_prompts": 3, "missing": ["5", "9"]},
            " over 3 prompts (3 of the question file's 5)",
        ),
        (
            "t2i-compbench",
            [],
            {"overall": 0.25, "per_category": {"color": 0.2, "spatial": 0.3}},
            " (2 of 6 categories: color, spatial)",
        ),
    ],
)
def test_an_overall_over_part_of_a_benchmark_says_which_part(
    trained, tmp_path, capsys, monkeypatch, no_model_load, bench, flags, scores, part
):
    import fusedit.eval.run

    def protocol(gen, prompts_path, out_dir, **kwargs):
        result = {"generated": 0, "skipped": 2, "unit": "prompts"}
        fusedit.eval.run.with_scores(result, out_dir, {**scores, "limit": kwargs.get("limit")})
        return result

    runs = {"geneval": "run_geneval", "dpg": "run_dpg", "t2i-compbench": "run_compbench"}
    monkeypatch.setattr(fusedit.eval.run, runs[bench], protocol)
    out = tmp_path / "out"
    command = ["eval", str(trained), "--bench", bench, "--prompts", "p", "--out", str(out), *flags, "--quiet"]
    assert main(command) == 0
    scored = out / ("scores-first2.json" if flags else "scores.json")  # a subset keeps a full run's score
    # DPG-Bench's score on its published scale (x100).
    head = "DPG-Bench score 25.00 (x100, as published)" if bench == "dpg" else "overall 0.2500"
    assert capsys.readouterr().out.splitlines()[-1] == f"{head}{part}; details in {scored}"


def test_the_limit_is_passed_on_and_counts_say_what_they_count(trained, tmp_path, capsys):
    prompts = write_geneval(tmp_path / "geneval.jsonl", 3)
    out = tmp_path / "ge"
    command = [
        "eval",
        str(trained),
        "--bench",
        "geneval",
        "--prompts",
        str(prompts),
        "--out",
        str(out),
        "--quiet",
    ]
    assert main([*command, "--limit", "1"]) == 0
    assert f"geneval: wrote {out} (1 prompt: 1 generated, 0 already there)" in capsys.readouterr().out
    assert sorted(p.name for p in (out / "samples").iterdir()) == ["00000"]
    assert main([*command, "--limit", "2"]) == 0
    assert f"geneval: wrote {out} (2 prompts: 1 generated, 1 already there)" in capsys.readouterr().out


@pytest.mark.parametrize(
    "train, expected",
    [
        ({}, " (the first is saved at step 3: train.checkpoint_every)"),
        ({"steps": 2}, " (the first is saved at step 2, the end of the run)"),
        (None, ""),  # train.lock alone: the run has not saved its config yet
    ],
)
def test_a_run_before_its_first_checkpoint_is_named_as_such(tmp_path, capsys, train, expected):
    run = tmp_path / "runE"
    run.mkdir()
    if train is None:
        (run / "train.lock").write_text("")
    else:
        save_config(tiny_config(train=train), run / "config.yaml")
    assert main(["eval", str(run), "--device", "cpu", "--quiet"]) == 2
    assert (
        one_line_error(capsys)
        == f"fusedit: error: run {str(run)!r} has no finished checkpoint yet{expected}\n"
    )
