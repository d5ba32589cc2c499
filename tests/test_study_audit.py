"""Fairness and planning of `fusedit study` (helper-98's audit): repeated keys, a base the designs may not
override, bookkeeping that is no recipe difference, --check that plans what the run does, overrides of the
base on the command line, and describe's counts matching the study's."""

import copy
import json
import re
from pathlib import Path

import pytest
import yaml

import fusedit.study.run as study_mod
from conftest import TINY
from fusedit.cli import main
from fusedit.config import ConfigError
from fusedit.study.file import load_study
from fusedit.study.run import describe_study, markdown_report, run_study
from fusedit.train.loop import train as real_train

BASE = {
    "train.steps": 6,
    "train.batch_size": 8,
    "train.warmup_steps": 2,
    "train.seed": 0,
    "train.checkpoint_every": 3,
    "train.ema_decay": 0.5,
}


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("fusedit: error: ") and "\n" not in err, err
    return err.removeprefix("fusedit: error: ")


def test_a_label_or_key_written_twice_in_a_study_file_is_refused(tmp_path):
    """PyYAML keeps the last of a repeated key: the first design of a label given twice was silently
    dropped, and so was the first value of a base key written twice."""
    study = tmp_path / "s.yaml"
    study.write_text("designs:\n  a: {preset: debug}\n  a: {preset: debug-dit-self}\n")
    with pytest.raises(ConfigError) as e:
        load_study(study)
    assert str(e.value) == (
        f"cannot parse study {str(study)!r}: line 3, column 3: key 'a' appears twice (first on line 2; "
        "allowed: each key once)"
    )
    study.write_text("base:\n  train.steps: 6\n  train.steps: 8\ndesigns:\n  a: {preset: debug}\n")
    with pytest.raises(
        ConfigError, match=r"line 3, column 3: key 'train.steps' appears twice \(first on line 2"
    ):
        load_study(study)


def test_a_study_file_that_is_not_utf8_is_one_line(tmp_path, capsys):
    """Its UnicodeDecodeError is a ValueError, which the CLI no longer reports for a bug's sake: the study is
    named, and what is allowed."""
    study = tmp_path / "s.yaml"
    study.write_bytes(b"\xff\xfename: s\n")
    assert main(["study", str(study), "--check"]) == 2
    assert _one_line_error(capsys) == (
        f"study {str(study)!r} is not UTF-8 text (byte 0: invalid start byte) (allowed: a UTF-8 YAML file, e.g. "
        "studies/*.yaml)"
    )


def test_a_staged_design_refuses_a_train_steps_it_would_ignore():
    """A staged run's length is its stages' sum: the base's train.steps (set to shorten a study) left the
    staged design at its full 1600 steps, silently, where `fusedit train` refuses it."""
    staged = (
        "cannot be set on a staged config (recipe-shapes-3stage): its length is the sum of stages.N.steps "
        "(800+500+300) (allowed: the design overrides stages.0.steps=..., stages.1.steps=..., stages.2.steps=..."
    )
    in_base = {
        "base": {"train.steps": 4},
        "designs": {"a": {"preset": "debug"}, "b": {"preset": "recipe-shapes-3stage"}},
    }
    own = {"designs": {"b": {"preset": "recipe-shapes-3stage", "overrides": ["train.steps=4"]}}}
    for spec, message in (
        (
            in_base,
            f"study 'study': designs.b: the study base's train.steps=4 {staged}, with train.steps set in the "
            "single-stage designs' overrides rather than in the base)",
        ),
        (own, f"study 'study': designs.b.overrides sets train.steps=4, which {staged})"),
    ):
        with pytest.raises(ConfigError) as e:
            load_study(spec)
        assert str(e.value) == message
    # The way the message gives: each design's own length.
    spec = {
        "designs": {
            "a": {"preset": "debug", "overrides": ["train.steps=3"]},
            "b": {
                "preset": "recipe-shapes-3stage",
                "overrides": ["stages.0.steps=1", "stages.1.steps=1", "stages.2.steps=1"],
            },
        }
    }
    assert [d.config.train.steps for d in load_study(spec).designs] == [3, 3]


def test_a_design_may_not_override_a_key_the_base_holds_equal():
    """The base is what the study holds fixed: a design that trained at another batch was only warned of
    (and the report's recipe line then named the first design's), where a stage doing so is refused."""
    spec = {"base": BASE, "designs": {"a": {"preset": "debug"}, "b": {"preset": "debug", "overrides": {}}}}
    refused = [
        ({"train.batch_size": 4}, "train.batch_size=4 over the study base's train.batch_size=8"),
        ({"train.lr": 1e-4, "train.seed": 3}, "train.seed=3 over the study base's train.seed=0"),
        (["train.steps=10"], "train.steps=10 over the study base's train.steps=6"),
    ]
    for overrides, what in refused:
        spec["designs"]["b"]["overrides"] = overrides
        with pytest.raises(ConfigError) as e:
            load_study(spec)
        key = what.split("=")[0]
        assert str(e.value) == (
            f"study 'study': designs.b.overrides sets {what} (allowed: the base's value, or leave {key} out of "
            "the base to vary it)"
        )
    # A list the base sets, patched by position in a design: refused at the list.
    listed = {"base": {"data.kinds": ["single", "two"]}, "designs": {"a": {"preset": "debug"}}}
    listed["designs"]["a"]["overrides"] = {"data.kinds.1": "position"}
    with pytest.raises(
        ConfigError, match=r"sets data\.kinds\.1='position' over the study base's data\.kinds="
    ):
        load_study(listed)

    allowed = [
        {"train.lr": 1e-4},  # the base leaves it out: a difference the recipe warning names
        {"train.batch_size": 8},  # the base's own value
        {"train": {"ema_decay": "5e-1"}},  # typed as the config reads it (PyYAML reads a string)
        {"train.checkpoint_every": 2, "train.log_every": 1, "data.num_workers": 1},  # bookkeeping
    ]
    for overrides in allowed:
        spec["designs"]["b"]["overrides"] = overrides
        load_study(spec)


def test_bookkeeping_and_sampling_the_eval_fixes_are_no_recipe_difference():
    """The "not a fair comparison" warning fired for keys that change neither the training nor the scores:
    bookkeeping, and sample.steps / guidance where the study's eval sets them for every design."""
    bookkeeping = {"train.checkpoint_every": 2, "train.log_every": 1, "data.num_workers": 1}
    sampling = {"sample.steps": 50, "sample.guidance": 7.0}
    for overrides in (bookkeeping, sampling):
        spec = {
            "base": BASE,
            "designs": {"a": {"preset": "debug"}, "b": {"preset": "debug-dit-self", "overrides": overrides}},
            "eval": {"steps": 10, "guidance": 3.0},
        }
        study = load_study(spec)
        assert "recipe differs" not in describe_study(study)
        assert "not a fair comparison" not in markdown_report(study, {}, [])
    # Where each design samples at its own steps and guidance, they are part of the comparison.
    del spec["eval"]
    assert "warning: the recipe differs between designs in sample.guidance, sample.steps" in describe_study(
        spec
    )


def test_a_typo_in_the_base_is_reported_against_the_base():
    spec = {"base": {"train.stpes": 4}, "designs": {"a": {"preset": "debug"}}}
    with pytest.raises(
        ConfigError, match=r"^study 'study': base: unknown config key 'train\.stpes': did you "
    ):
        load_study(spec)
    # A design's own typo, or a value its preset cannot take, stays the design's.
    spec = {"designs": {"a": {"preset": "debug", "overrides": ["train.stpes=4"]}}}
    with pytest.raises(ConfigError, match=r"^study 'study': designs\.a: unknown config key 'train\.stpes'"):
        load_study(spec)


def test_designs_that_train_and_score_the_same_are_named():
    spec = {
        "base": BASE,
        "designs": {
            "a": {"preset": "debug"},
            "b": {"preset": "debug-dit-self"},
            "c": {"preset": "debug", "overrides": {"train.log_every": 1}},  # bookkeeping only
            "d": {"preset": "debug"},
        },
    }
    warnings = [line for line in describe_study(spec).splitlines() if "warning" in line]
    assert warnings == [
        "  warning: designs a, c and d train and score the same (their configs differ in no key that changes "
        "either: a forgotten override?)"
    ]


def test_describe_counts_confirm_the_studys(capsys):
    """describe printed 1.5M and 0.000 TFLOP for the debug designs, which could not confirm the study's
    1.53M and 391M FLOP per image."""
    assert main(["describe", "debug"]) == 0
    out = capsys.readouterr().out
    cost = study_mod.design_cost(load_study({"designs": {"a": {"preset": "debug"}}}).designs[0].config)
    assert f"trainable (DiT): 1.5M ({cost['trainable_params']:,})\n" in out
    assert f"frozen (LLM, incl. embeddings): 0.4M ({cost['frozen_params']:,})\n" in out
    assert cost["train_flops_per_image"] == 390_955_008 and cost["dit_forward_flops"] == 125_599_744
    assert (
        "32 px (64 image + 16 text tokens): DiT forward 125.600 MFLOP, LLM forward 14.156 MFLOP, training "
        "390.955 MFLOP per image\n" in out
    )


def _study_file(tmp_path: Path) -> tuple[Path, dict]:
    """Four tiny designs of 2 steps (a checkpoint at each), scored on 1 prompt per category."""
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(TINY))
    spec = {
        "name": "plan",
        "base": {"train.steps": 2, "train.checkpoint_every": 1, "train.batch_size": 2},
        "designs": {
            "a": {"preset": "tiny.yaml"},
            "b": {"preset": "tiny.yaml", "overrides": ["model.pos_embed=2d-rope"]},
            "c": {"preset": "tiny.yaml", "overrides": ["model.pos_embed=1d-rope"]},
            "d": {"preset": "tiny.yaml", "overrides": ["model.timestep_conditioning=addition"]},
        },
        "eval": {"per_category": 1, "steps": 2, "guidance": 2.0},
        "prompts": ["a red circle"],
        "seeds": [0],
    }
    path = tmp_path / "plan.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path, spec


def _plan(out: str) -> dict[str, str]:
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("  running it into "))
    return dict(line.strip().split(": ", 1) for line in lines[start + 1 :])


def _half_done(tmp_path: Path) -> tuple[Path, dict, Path]:
    """An output folder where a and b are trained and scored, c was stopped at step 1 and d never ran;
    then b's sampling changes in the study file (its scores are stale, its weights not)."""
    path, spec = _study_file(tmp_path)
    out = tmp_path / "out"
    study = load_study(path)
    run_study(study, out, progress=False, only=["a", "b"])
    real_train(study.designs[2].config, out / "runs" / "c", stop_at=1, progress=False)
    spec["designs"]["b"]["overrides"].append("sample.negative_prompt=blurry")
    path.write_text(yaml.safe_dump(spec))
    return path, spec, out


HALF_DONE = {"a": "reused", "b": "re-scored", "c": "resumed at step 1", "d": "trained"}


def test_check_describes_the_chosen_designs_and_plans_what_the_run_does(tmp_path, capsys):
    """--check listed every design under --only, passed --device tpu, and never looked into --out (the
    run then failed at once on a design trained with another config, and did what no one had previewed)."""
    path, spec, out = _half_done(tmp_path)
    assert (
        main(["study", str(path), "--out", str(out), "--check", "--only", "d", "c", "--device", "cpu"]) == 0
    )
    described = capsys.readouterr().out
    assert described.startswith("study plan: 4 designs, 2 chosen\n")
    designs = [line.split(":")[0] for line in described.splitlines() if " design=" in line]
    assert designs == ["  c", "  d"]
    assert _plan(described) == {"c": "resumed at step 1", "d": "trained"}
    assert main(["study", str(path), "--out", str(out), "--check", "--device", "tpu"]) == 2
    assert "--device 'tpu' is not allowed" in _one_line_error(capsys)

    assert main(["study", str(path), "--out", str(out), "--check"]) == 0
    assert _plan(capsys.readouterr().out) == HALF_DONE
    # The plan is what the run does: the same decision (results.json records it).
    assert main(["study", str(path), "--out", str(out), "--quiet"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert {label: r["status"] for label, r in results["designs"].items()} == HALF_DONE

    # A trained design's recipe changed: --check refuses it as the run would, before anything runs.
    changed = copy.deepcopy(spec)
    changed["base"]["train.lr"] = 5e-4
    (tmp_path / "changed.yaml").write_text(yaml.safe_dump(changed))
    assert main(["study", str(tmp_path / "changed.yaml"), "--out", str(out), "--check"]) == 2
    assert _one_line_error(capsys) == (
        f"{out}/runs/a was trained with a different config for design 'a' (train.lr: 0.001 there, 0.0005 now); "
        "delete it or use another output folder"
    )
    longer = copy.deepcopy(spec)
    longer["base"]["train.steps"] = spec["base"]["train.steps"] + 2
    (tmp_path / "longer.yaml").write_text(yaml.safe_dump(longer))
    assert main(["study", str(tmp_path / "longer.yaml"), "--out", str(out), "--check"]) == 2
    assert _one_line_error(capsys).endswith(
        " now) (a run's schedule spans its train.steps: more steps are another run); delete it or use another "
        "output folder"
    )


def test_a_study_ends_saying_what_it_did_with_each_design(tmp_path, capsys):
    """The closing line said only "4 designs in 7s", and results.json called a design whose scores were
    redone "reused", as one left alone."""
    path, _, out = _half_done(tmp_path)
    assert main(["study", str(path), "--out", str(out), "--quiet"]) == 0
    last = [line for line in capsys.readouterr().out.splitlines() if line.startswith("study plan: ")]
    assert len(last) == 1
    assert last[0].endswith("s: a reused, b re-scored, c resumed at step 1, d trained")
    results = json.loads((out / "results.json").read_text())
    assert results["designs"]["b"]["status"] == "re-scored"
    # Under --only, the designs it ran (the others keep their place in the report).
    assert main(["study", str(path), "--out", str(out), "--quiet", "--only", "c"]) == 0
    last = [line for line in capsys.readouterr().out.splitlines() if line.startswith("study plan: ")]
    assert len(last) == 1 and last[0].startswith("study plan: 1 of 4 designs in ")
    assert last[0].endswith("s: c reused")
    # Other grid prompts: the scores stand, the grid is drawn again (the others' grids are stale: pending).
    spec = yaml.safe_load(path.read_text()) | {"prompts": ["a blue square"]}
    path.write_text(yaml.safe_dump(spec))
    assert main(["study", str(path), "--out", str(out), "--quiet", "--only", "a"]) == 0
    last = [line for line in capsys.readouterr().out.splitlines() if line.startswith("study plan: ")]
    assert len(last) == 1 and last[0].endswith("s: a grid redrawn; pending: b, c, d")
    assert json.loads((out / "results.json").read_text())["designs"]["a"]["status"] == "grid redrawn"


def test_command_line_overrides_apply_to_the_base(tmp_path, capsys):
    """`fusedit study STUDY.yaml train.steps=5` was an unrecognised argument: shortening a shipped study
    meant copying it (and breaking any preset given as a relative file)."""
    path, _ = _study_file(tmp_path)
    none = str(tmp_path / "none")
    assert main(["study", str(path), "train.steps=3", "--check", "--out", none]) == 0
    plan = [line for line in capsys.readouterr().out.splitlines() if " design=" in line]
    assert len(plan) == 4 and all(line.endswith("; 3 steps x batch 2 at 16 px") for line in plan)
    # After --only's labels, as after any option.
    assert main(["study", str(path), "--check", "--out", none, "--only", "a", "train.steps=4"]) == 0
    plan = [line for line in capsys.readouterr().out.splitlines() if " design=" in line]
    assert len(plan) == 1 and plan[0].startswith("  a: ") and plan[0].endswith("; 4 steps x batch 2 at 16 px")
    # --only given overrides alone: its labels are missing, said for the command line, not as only=[].
    assert main(["study", str(path), "--check", "--out", none, "--only", "train.steps=4"]) == 2
    assert _one_line_error(capsys).startswith("--only names no design (allowed: one or more of a, ")

    # They pass the base's checks: a design overriding one, a typo (named as the overrides'), a staged design.
    spec = {"designs": {"a": {"preset": "debug", "overrides": ["train.batch_size=4"]}}}
    with pytest.raises(ConfigError) as e:
        load_study(spec, overrides=["train.batch_size=8"])
    assert str(e.value) == (
        "study 'study': designs.a.overrides sets train.batch_size=4 over the override train.batch_size=8 "
        "(allowed: the override's value, or no train.batch_size override to vary it)"
    )
    with pytest.raises(ConfigError, match=r"^study 'study': overrides: unknown config key 'train\.stpes'"):
        load_study(spec, overrides=["train.stpes=8"])
    staged = {"designs": {"b": {"preset": "recipe-shapes-3stage"}}}
    with pytest.raises(
        ConfigError, match=r"^study 'study': designs\.b: the override train\.steps=5 cannot be set "
    ):
        load_study(staged, overrides=["train.steps=5"])
    assert main(["study", str(path), "train.steps", "--check"]) == 2
    assert _one_line_error(capsys) == (
        "study 'plan': overrides: override 'train.steps' must look like section.key=value"
    )


def test_a_lora_designs_cost_counts_its_adapters_as_describe_does(capsys):
    """A LoRA design's study row counted the whole DiT as trainable (1.5M) where training updates only its
    adapters (95k): the study's counts are now training's own (train.stages.start_as), like describe's."""
    pytest.importorskip("peft")
    study = load_study({"designs": {"a": {"preset": "debug", "overrides": ["train.dit_lora.rank=8"]}}})
    cost = study_mod.design_cost(study.designs[0].config)
    assert main(["describe", "debug", "train.dit_lora.rank=8"]) == 0
    out = capsys.readouterr().out
    assert f"trainable (DiT: rank-8 LoRA adapters): 0.1M ({cost['trainable_params']:,})\n" in out
    assert cost["trainable_params"] == 95_232 and cost["frozen_params"] == 1_525_296 + 422_720
    # The FLOPs are counted before the adapters are added, as before.
    assert cost["train_flops_per_image"] == 265_355_264


def test_a_study_refuses_a_folder_holding_another_study_or_a_training_run(tmp_path, capsys, monkeypatch):
    """Run into another study's folder, a study replaced its report and left its runs unlisted; into a
    training run's, it wrote its report beside the checkpoints; --check planned both without a word."""
    monkeypatch.setattr(study_mod, "train", lambda *a, **k: pytest.fail("a design was trained"))
    path, _ = _study_file(tmp_path)
    other = tmp_path / "other"
    other.mkdir()
    (other / "results.json").write_text(json.dumps({"name": "s-other", "designs": {}}))
    for check in (["--check"], []):
        assert main(["study", str(path), "--out", str(other), *check, "--quiet"]) == 2
        assert _one_line_error(capsys) == (
            f"{other} holds study 's-other' (its results.json), not 'plan': running into it would replace its "
            "report (allowed: this study's own folder, or a new or empty one)"
        )
    assert json.loads((other / "results.json").read_text())["name"] == "s-other"
    for held in ("checkpoints", "train.lock"):
        run = tmp_path / f"run-{held}"
        run.mkdir()
        if held == "checkpoints":
            (run / held).mkdir()
        else:
            (run / held).touch()
        for check in (["--check"], []):
            assert main(["study", str(path), "--out", str(run), *check, "--quiet"]) == 2
            assert _one_line_error(capsys) == (
                f"{run} holds a training run ({held}), not a study: a study writes its report there and each "
                "design's run under runs/ (allowed: this study's own folder, or a new or empty one)"
            )
        assert not (run / "report.md").exists()
    # Its own folder (results.json names this study) is planned as before.
    own = tmp_path / "own"
    own.mkdir()
    (own / "results.json").write_text(json.dumps({"name": "plan", "designs": {}}))
    assert main(["study", str(path), "--out", str(own), "--check"]) == 0
    assert _plan(capsys.readouterr().out) == dict.fromkeys("abcd", "trained")


def test_a_study_given_a_folder_says_it_is_a_folder(tmp_path, capsys):
    """`fusedit study studies` said "study file not found" of a folder that is there."""
    assert main(["study", str(tmp_path), "--check"]) == 2
    assert _one_line_error(capsys) == (
        f"study {str(tmp_path)!r} is a folder (allowed: a study YAML file, e.g. studies/*.yaml)"
    )


def _stopping_study(tmp_path: Path, monkeypatch) -> tuple[Path, set]:
    """Designs a, c, d of _study_file, 4 steps with a checkpoint every 2; a Ctrl+C comes at step 3 of each
    design named in the returned set (after step 3 is logged, before a checkpoint saves it)."""
    import fusedit.train.loop as loop

    path, spec = _study_file(tmp_path)
    del spec["designs"]["b"]
    spec["base"].update({"train.steps": 4, "train.checkpoint_every": 2, "train.preview_every": 3})
    path.write_text(yaml.safe_dump(spec))
    stop_in: set = set()

    def preview(model, cfg, captions, where):
        if where.parents[1].name in stop_in:  # runs/<label>/previews/step_00000003.png
            raise KeyboardInterrupt

    monkeypatch.setattr(loop, "_preview", preview)
    return path, stop_in


def test_an_interrupted_study_names_the_design_its_checkpoint_and_the_steps_redone(
    tmp_path, capsys, monkeypatch
):
    """h-study F3: the interrupt line named neither the design nor its checkpoint, and did not say that the
    steps after it are trained again; results.json and report.md listed the half-trained design as "pending"
    as they listed the one never started."""
    path, stop_in = _stopping_study(tmp_path, monkeypatch)
    out = tmp_path / "out"
    stop_in.add("c")
    assert main(["study", str(path), "--out", str(out), "--quiet"]) == 130
    err = capsys.readouterr().err.strip()
    assert err == (
        "fusedit: interrupted: design 'c' (2 of 3) interrupted, last checkpoint at step 2 of 4 (step 3 is "
        f"redone), not scored; what is done in {out} is kept (each design's checkpoints and scores; report.md "
        "says what each holds); rerun the same command to go on"
    )
    results = json.loads((out / "results.json").read_text())
    assert list(results["designs"]) == ["a"] and results["pending"] == ["c", "d"]
    half = "interrupted, last checkpoint at step 2 of 4 (step 3 is redone), not scored"
    assert results["pending_status"] == {"c": half, "d": "not started"}
    assert f"\nPending:\n* c: {half}\n* d: not started\n" in (out / "report.md").read_text()

    # The rerun goes on from step 2, as the line said.
    stop_in.clear()
    assert main(["study", str(path), "--out", str(out), "--quiet"]) == 0
    assert capsys.readouterr().out.splitlines()[-4].endswith("s: a reused, c resumed at step 2, d trained")


def test_a_ctrl_c_outside_the_studys_loop_still_says_what_is_kept(tmp_path, capsys, monkeypatch):
    """The line run_study raises names the design; a Ctrl+C where it raises none (the checks before the
    loop, the report after it) printed "interrupted: ; rerun ..." (an exception is always truthy)."""
    import fusedit.study.run as study_run

    path, _ = _stopping_study(tmp_path, monkeypatch)
    out = tmp_path / "out"

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(study_run, "_check_same_configs", interrupted)
    assert main(["study", str(path), "--out", str(out), "--quiet"]) == 130
    assert capsys.readouterr().err.strip() == (
        f"fusedit: interrupted: what is done in {out} is kept (each design's checkpoints and scores); rerun the "
        "same command to go on"
    )


def test_a_study_interrupted_in_its_first_design_writes_its_report(tmp_path, monkeypatch):
    """h-study F3: a Ctrl+C in the first design (training or scoring) left no report.md or results.json."""
    path, stop_in = _stopping_study(tmp_path, monkeypatch)
    out = tmp_path / "out"
    stop_in.add("a")
    half = "interrupted, last checkpoint at step 2 of 4 (step 3 is redone), not scored"
    with pytest.raises(KeyboardInterrupt, match=rf"^design 'a' \(1 of 3\) {re.escape(half)}; what is done"):
        run_study(path, out, progress=False)
    results = json.loads((out / "results.json").read_text())
    assert results["designs"] == {} and results["pending_status"] == {
        "a": half,
        "c": "not started",
        "d": "not started",
    }
    report = (out / "report.md").read_text()
    assert f"No design has finished yet.\n\nPending:\n* a: {half}\n* c: not started\n" in report

    # Interrupted while scored: trained to the end, which the report and the line say.
    stop_in.clear()

    def bench(*args, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(study_mod, "run_shapes_bench", bench)
    scoring = "trained (4 steps), not scored under these eval settings"
    with pytest.raises(
        KeyboardInterrupt, match=rf"^design 'a' \(1 of 3\) {re.escape(scoring)}; what is done"
    ):
        run_study(path, out, progress=False)
    assert json.loads((out / "results.json").read_text())["pending_status"]["a"] == scoring


def test_pending_status_says_what_each_design_s_folder_holds(tmp_path):
    """What report.md and results.json say of a design without a row: one never begun, one stopped (its
    checkpoint), one trained but scored under other settings, and one done to its grid (a Ctrl+C after its
    grid, before its row, which "its sample grid not drawn" misreported)."""
    path, spec, out = _half_done(tmp_path)
    study = load_study(path)
    steps = spec["base"]["train.steps"]
    status = {d.label: study_mod.pending_status(d, study, out) for d in study.designs}
    assert status == {
        "a": "trained, scored and drawn (its row comes with the rerun)",
        "b": f"trained ({steps} steps), not scored under these eval settings",
        "c": f"interrupted, last checkpoint at step 1 of {steps}, not scored",
        "d": "not started",
    }
