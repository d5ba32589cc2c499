import copy
import json
from pathlib import Path

import pytest
import yaml
from PIL import Image

import fusedit.study.run as study_mod
from conftest import TINY
from fusedit.checkpoints import find_checkpoint, load_state
from fusedit.config import ConfigError, load_config, resolved_stages
from fusedit.eval.shapes_bench import run_shapes_bench as real_bench
from fusedit.study.file import load_study, recipe_differences, varying_keys
from fusedit.study.run import describe_study, run_study
from fusedit.train.loop import train as real_train

STUDIES = sorted((Path(__file__).resolve().parents[1] / "studies").glob("*.yaml"))


def _tiny_study(tmp_path: Path) -> dict:
    """Two tiny designs (deep fusion vs the shallow cross-attention DiT), 4 steps each, 1 prompt per
    category; the study base holds the recipe equal, as a real study's does."""
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(TINY))
    preset = str(tmp_path / "tiny.yaml")
    return {
        "name": "tiny-study",
        "description": "Deep fusion vs cross-attention at toy size.",
        "base": {"train.steps": 4, "train.checkpoint_every": 2, "train": {"batch_size": 2}},
        "designs": {
            "fusion": {"preset": preset},
            "dit-cross": {
                "preset": preset,
                "overrides": ["model.design=dit-cross"],
                "description": "shallow",
            },
        },
        "eval": {"bench": "shapes", "per_category": 1, "steps": 2, "guidance": 2.0},
        "prompts": ["a red circle", "a blue square"],
        "seeds": [0],
    }


class Interrupted(Exception):
    """Stands for a crash or Ctrl-C in the middle of a design's training."""


def _spy(monkeypatch, interrupt: str | None = None) -> tuple[list, list]:
    """Count train and benchmark calls; ``interrupt`` stops that design after step 2 as a crash would."""
    trains, benches = [], []

    def train(cfg, run_dir, **kw):
        trains.append((cfg.name, kw.get("resume")))
        if cfg.name == interrupt:
            real_train(cfg, run_dir, stop_at=2, **kw)
            raise Interrupted
        return real_train(cfg, run_dir, **kw)

    def bench(*args, **kw):
        benches.append(kw["name"].partition("@")[0])  # the row's name is label@step
        return real_bench(*args, **kw)

    monkeypatch.setattr(study_mod, "train", train)
    monkeypatch.setattr(study_mod, "run_shapes_bench", bench)
    return trains, benches


def _table(report: str) -> list[list[str]]:
    rows = [line for line in report.splitlines() if line.startswith("|")]
    return [[cell.strip() for cell in row.strip("|").split("|")] for row in rows]


def test_study_end_to_end_resumes_and_redoes_nothing(tmp_path, monkeypatch):
    spec, out = _tiny_study(tmp_path), tmp_path / "out"

    # First call: the second design is interrupted after step 2 (its checkpoint at step 2 survives).
    trains, _ = _spy(monkeypatch, interrupt="dit-cross")
    with pytest.raises(Interrupted):
        run_study(spec, out, progress=False)
    assert trains == [("fusion", False), ("dit-cross", False)]
    partial = json.loads((out / "results.json").read_text())  # written after the first design
    assert list(partial["designs"]) == ["fusion"] and partial["pending"] == ["dit-cross"]
    assert load_state(find_checkpoint(out / "runs" / "dit-cross"))["step"] == 2

    # Second call: the finished design is reused, the interrupted one resumes at step 2 and completes.
    trains, benches = _spy(monkeypatch)
    result = run_study(spec, out, progress=False)
    assert trains == [("dit-cross", True)] and benches == ["dit-cross"]
    assert load_state(find_checkpoint(out / "runs" / "dit-cross"))["step"] == 4
    metrics = (out / "runs" / "dit-cross" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in metrics] == [1, 2, 3, 4]
    assert result["designs"]["fusion"]["status"] == "reused"
    assert result["designs"]["dit-cross"]["status"] == "resumed at step 2"

    # The report: one row per design; columns = categories + overall + cost, linked grids.
    results = json.loads((out / "results.json").read_text())
    assert results["varies"] == ["model.design"] and results["pending"] == []
    kinds = results["categories"]
    assert kinds and set(kinds) <= {"single", "two", "counting", "position", "color_attr"}
    table = _table((out / "report.md").read_text())
    header, rows = table[0], table[2:]
    # The tiny preset trains on single, two and position: the other kinds are marked (as `fusedit eval` does).
    marked = [k + " (untrained)" * (k not in TINY["data"]["kinds"]) for k in kinds]
    assert header[:2] == ["design", "preset"] and header[2 : 3 + len(kinds)] == [*marked, "overall"]
    assert {"trainable params", "train FLOPs / image", "final loss", "samples"} <= set(header)
    assert [row[0] for row in rows] == ["fusion@4", "dit-cross@4"]
    assert all(len(row) == len(header) for row in rows)
    for row in rows:
        label = row[0].partition("@")[0]
        d = results["designs"][label]
        assert d["row"] == row[0]
        overall = row[header.index("overall")].strip("*")
        assert float(overall) == pytest.approx(d["scores"]["overall"], abs=1e-3)
        assert row[header.index("samples")] == f"[grid](grids/{label}.png)"
        assert d["trainable_params"] > 0 and d["train_flops_per_image"] > 0 and d["steps"] == 4
        assert (out / "runs" / label / "eval" / "scores.json").is_file()
    assert (
        results["designs"]["dit-cross"]["trainable_params"]
        != results["designs"]["fusion"]["trainable_params"]
    )
    report_text = (out / "report.md").read_text()
    assert "* **dit-cross** (" in report_text and "tiny.yaml): shallow. [scores](" in report_text
    for name in ("loss_curves.png", "scores.png", "samples.png", "grids/fusion.png", "grids/dit-cross.png"):
        with Image.open(out / name) as im:
            im.verify()

    # Third call: nothing is trained or scored again, and the report is unchanged.
    report = (out / "report.md").read_text()
    trains, benches = _spy(monkeypatch)
    again = run_study(spec, out, progress=False)
    assert trains == [] and benches == []
    assert (out / "report.md").read_text() == report
    assert {d["status"] for d in again["designs"].values()} == {"reused"}

    # Sampling settings and bookkeeping do not change the trained weights: the runs are reused and only
    # what samples (scores, grids) is redone.
    resampled = copy.deepcopy(spec)
    resampled["base"].update({"sample.negative_prompt": "blurry", "train.log_every": 3})
    run_study(resampled, out, progress=False)
    assert trains == [] and benches == ["fusion", "dit-cross"]

    # The EMA or the raw weights: other weights than the scores were made from, refused as a recipe change.
    raw = copy.deepcopy(spec)
    raw["base"]["sample.use_ema"] = False
    with pytest.raises(ConfigError, match=r"different config .*sample\.use_ema"):
        run_study(raw, out, progress=False)

    # A changed recipe does not silently reuse runs trained with the old one.
    changed = copy.deepcopy(spec)
    changed["base"]["train.lr"] = 5e-4
    with pytest.raises(ConfigError, match=r"different config .*train\.lr"):
        run_study(changed, out, progress=False)
    assert trains == []


def test_a_study_refuses_to_run_in_several_torchrun_processes(tmp_path, monkeypatch):
    """Each process would train, score and write every design (and re-joining a process group per
    design fails in gloo): one line says what to do instead, before anything is made."""
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(study_mod, "train", lambda *a, **kw: pytest.fail("trained"))
    with pytest.raises(ConfigError, match=r"a study runs in one process \(torchrun started WORLD_SIZE=2"):
        run_study(_tiny_study(tmp_path), tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def _staged_study(**base) -> dict:
    """The single-stage debug design beside the shipped three-stage recipe, shortened."""
    short = ["stages.0.steps=1", "stages.1.steps=1", "stages.2.steps=1"]
    return {
        "base": {"train.checkpoint_every": 1, **base},
        "designs": {
            "single": {"preset": "debug", "overrides": ["train.steps=3"]},
            "staged": {"preset": "recipe-shapes-3stage", "overrides": short},
        },
        "eval": {"bench": "shapes", "per_category": 1, "steps": 2, "guidance": 2.0},
        "prompts": ["a red circle"],
        "seeds": [0],
    }


def test_a_stage_that_overrides_the_study_base_is_refused():
    """A stage's value wins over the study's base, so the staged design would silently train at its own
    batch while the report said the base's: refused, naming the stage, the key and the way out."""
    with pytest.raises(ConfigError) as e:
        load_study(_staged_study(**{"train.batch_size": 4}))
    assert str(e.value) == (
        "study 'study': designs.staged: stages.0 (low-res) sets train.batch_size=32 over the study's base "
        "train.batch_size=4, so this design would not train under the shared recipe (allowed: the base's "
        "value, e.g. the design override stages.0.train.batch_size=4, or train.batch_size left out of the base)"
    )
    spec = _staged_study(**{"train.batch_size": 4})
    spec["designs"]["staged"]["overrides"].append("stages.0.train.batch_size=4")
    staged = load_study(spec).designs[1].config
    assert [s.config.train.batch_size for s in resolved_stages(staged)] == [4, 4, 4]


def test_a_staged_design_is_described_costed_and_scored_by_its_stages(tmp_path, monkeypatch):
    """describe, results.json and the report show each stage's steps, batch and size; the FLOPs per image
    average the stages' own (the LLM trains in two of them) over the images each trains on; the design is
    scored where its last checkpoint samples (its last stage's size and sampling settings), as
    `fusedit eval` of the run is."""
    spec = _staged_study()
    spec["designs"]["staged"]["overrides"] += ["stages.0.train.batch_size=2", "stages.2.sample.shift=3.0"]
    study = load_study(spec)
    staged = study.designs[1].config
    stages = resolved_stages(staged)
    plan = describe_study(study)
    assert (
        "1 steps x batch 2 at 16 px then 1 steps x batch 2 at 32 px then 1 steps x batch 2 at 32 px" in plan
    )
    assert recipe_differences(study.designs) == [
        "data.image_size",  # 16 px in the first stage
        "data.kinds",  # spatial relations only in the last
        "sample.shift",
        "train.batch_size",
        "train.dit_lora.rank",
        "train.llm_lora.rank",
        "train.llm_lr",
        "train.llm_top_layers",
        "train.lr",
        "train.trainable",
        "train.warmup_steps",
    ]
    assert "warning: the recipe differs between designs in data.image_size, data.kinds," in plan
    per_stage = [study_mod.design_cost(s.config)["train_flops_per_image"] for s in stages]
    assert per_stage[0] < per_stage[2] < per_stage[1]  # 16 px; LoRA on both; the LLM's top layers trained
    assert study_mod.design_cost(staged)["train_flops_per_image"] == round(sum(per_stage) / 3)
    one = study_mod.design_cost(stages[0].config)
    assert one["train_flops_per_image"] == 3 * one["dit_forward_flops"] + one["llm_forward_flops"]

    scored = []
    monkeypatch.setattr(
        study_mod, "run_shapes_bench", lambda *a, **kw: scored.append(kw) or real_bench(*a, **kw)
    )
    result = run_study(spec, tmp_path / "out", progress=False, only=["staged"])
    assert (scored[0]["image_size"], scored[0]["shift"]) == (32, 3.0)
    row = result["designs"]["staged"]
    assert row["batch_size"] == 2 and row["schedule"] == plan.split("FLOP/image; ")[-1]
    assert load_state(find_checkpoint(tmp_path / "out" / "runs" / "staged"))["step"] == 3
    # A stage's sampling settings changed: re-scored at them, not retrained.
    spec["designs"]["staged"]["overrides"][-1] = "stages.2.sample.shift=2.0"
    monkeypatch.setattr(study_mod, "train", lambda *a, **kw: pytest.fail("trained again"))
    run_study(spec, tmp_path / "out", progress=False, only=["staged"])
    assert scored[-1]["shift"] == 2.0
    # A stage's training settings changed: refused, naming the stage's values.
    spec["designs"]["staged"]["overrides"].append("stages.1.train.lr=5e-4")
    with pytest.raises(
        ConfigError, match=r"different config for design 'staged' \(train\.lr: 0\.001 there, 0\.0005"
    ):
        run_study(spec, tmp_path / "out", progress=False, only=["staged"])


def test_a_data_location_a_design_never_reads_is_refused_before_anything_trains(tmp_path, monkeypatch):
    spec = _staged_study()
    spec["designs"]["staged"]["overrides"].append("data.root=/data/photos")  # on the shapes world
    monkeypatch.setattr(study_mod, "train", lambda *a, **kw: pytest.fail("trained"))
    with pytest.raises(
        ConfigError,
        match=r"^study 'study': designs\.staged: stages\.0 \(.*\): data\.root='/data/photos' is set",
    ):
        run_study(spec, tmp_path / "out", progress=False)


def test_designs_on_one_staged_recipe_compare_equal_and_the_base_is_compared_typed():
    """Two designs on the same staged recipe train alike however its stages differ among themselves; a
    base value written as YAML reads it ('2e-3' is a string to PyYAML) equals a stage's 2.0e-3."""
    spec = _staged_study(**{"train.lr": "2e-3"})
    spec["designs"]["staged"]["overrides"] += ["stages.1.train.lr=2.0e-3", "stages.2.train.lr=0.002"]
    spec["designs"]["single"] = {
        "preset": "recipe-shapes-3stage",
        "overrides": [*spec["designs"]["staged"]["overrides"], "model.pos_embed=2d-rope"],
    }
    study = load_study(spec)
    assert recipe_differences(study.designs) == []
    assert "warning" not in describe_study(study)


def test_study_only_some_designs_keeps_the_others_finished_results(tmp_path, monkeypatch):
    spec, out = _tiny_study(tmp_path), tmp_path / "out"
    with pytest.raises(
        ConfigError, match=r"design 'cros' is not in study tiny-study \(allowed: fusion, dit-cross\)"
    ):
        run_study(spec, out, progress=False, only=["cros"])
    with pytest.raises(ConfigError, match=r"only=\[\] names no design"):
        run_study(spec, out, progress=False, only=[])
    assert not (out / "runs").exists()

    trains, benches = _spy(monkeypatch)
    first = run_study(spec, out, progress=False, only=["dit-cross"])
    assert trains == [("dit-cross", False)] and benches == ["dit-cross"]
    assert list(first["designs"]) == ["dit-cross"] and first["pending"] == ["fusion"]

    # The other design now; the first one's finished result keeps its place (study order), untouched.
    trains, benches = _spy(monkeypatch)
    second = run_study(spec, out, progress=False, only=["fusion"])
    assert trains == [("fusion", False)] and benches == ["fusion"]
    assert list(second["designs"]) == ["fusion", "dit-cross"] and second["pending"] == []
    assert second["designs"]["dit-cross"] == first["designs"]["dit-cross"] | {"status": "reused"}
    assert [row[0] for row in _table((out / "report.md").read_text())[2:]] == ["fusion@4", "dit-cross@4"]

    # Scores of a left-out design made under other eval settings are not shown as current: it is pending.
    rescored = copy.deepcopy(spec)
    rescored["eval"]["guidance"] = 3.0
    trains, benches = _spy(monkeypatch)
    third = run_study(rescored, out, progress=False, only=["fusion"])
    assert trains == [] and benches == ["fusion"]
    assert list(third["designs"]) == ["fusion"] and third["pending"] == ["dit-cross"]


GOOD = {"preset": "debug"}


@pytest.mark.parametrize(
    "spec, message",
    [
        ({"designs": {"a": {"preset": "no-such-preset"}}}, "unknown preset 'no-such-preset'"),
        (
            {"designs": {"a": {"preset": "debug", "overrides": ["model.bogus=1"]}}},
            "unknown config key 'model.bogus'",
        ),
        (
            {"designs": {"a": {"preset": "debug", "overrides": {"model.pos_embed": "3d"}}}},
            "model.pos_embed='3d'",
        ),
        ({"designs": {"a": GOOD}, "evals": {}}, "unknown key 'evals'"),
        ({"designs": {"a": {"preset": "debug", "override": []}}}, "unknown key 'override'"),
        ({"designs": {"a": {"overrides": []}}}, "preset is required"),
        ({"designs": {"a": GOOD}, "eval": {"per_category": 0}}, "eval.per_category=0 must be > 0"),
        ({"designs": {"a": GOOD}, "eval": {"bench": "geneval"}}, "eval.bench='geneval' is not allowed"),
        ({"designs": {"a": GOOD}, "base": "train.steps=3"}, "base must be a list"),
        ({"designs": {"a": GOOD}, "base": ["train.steps"]}, "must look like section.key=value"),
        ({"designs": {}}, "designs must be a non-empty mapping"),
        ({"designs": {"a/b": GOOD}}, "designs.a/b: a label must be"),
        ({"designs": {"a": GOOD}, "prompts": []}, "prompts must be a non-empty list"),
        ({"designs": {"a": GOOD}, "seeds": [0, -1]}, "seeds[1]=-1 is out of range (allowed: 0..4294967295)"),
        ({"designs": {"a": GOOD}, "seeds": [2**64]}, f"seeds[0]={2**64} is out of range"),
        ({"designs": {"a": GOOD}, "eval": {"seed": 2**64}}, f"eval.seed={2**64} is out of range"),
    ],
)
def test_study_errors_are_one_line(spec, message):
    with pytest.raises(ConfigError) as e:
        load_study(spec)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_a_study_object_with_a_bad_seed_is_refused_before_training(tmp_path, monkeypatch):
    study = load_study({"designs": {"a": GOOD}})
    study.seeds = [-1]
    monkeypatch.setattr(study_mod, "train", lambda *a, **kw: pytest.fail("trained"))
    with pytest.raises(ConfigError, match=r"^study 'study': seeds\[0\]=-1 is out of range"):
        run_study(study, tmp_path / "out", progress=False)


def test_study_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="study file not found"):
        load_study(tmp_path / "missing.yaml")
    (tmp_path / "bad.yaml").write_text("designs: [unclosed\n")
    with pytest.raises(ConfigError, match=r"cannot parse study .*bad.yaml': line 2, column 1: ") as e:
        load_study(tmp_path / "bad.yaml")
    assert "\n" not in str(e.value)


def test_overrides_forms_agree_and_presets_resolve_next_to_the_study(tmp_path):
    (tmp_path / "mine.yaml").write_text("base: debug\nmodel: {pos_embed: 2d-rope}\n")
    forms = [
        ["model.timestep_conditioning=addition", "train.steps=7"],
        {"model.timestep_conditioning": "addition", "train": {"steps": 7}},
        {"model": {"timestep_conditioning": "addition"}, "train.steps": 7},
    ]
    for form in forms:
        (tmp_path / "s.yaml").write_text(
            yaml.safe_dump({"designs": {"x": {"preset": "mine.yaml", "overrides": form}}})
        )
        cfg = load_study(tmp_path / "s.yaml").designs[0].config
        assert (cfg.name, cfg.model.pos_embed, cfg.model.timestep_conditioning, cfg.train.steps) == (
            "x",
            "2d-rope",
            "addition",
            7,
        )


def test_shipped_studies_load_resolve_and_are_fair(caplog):
    assert {p.stem for p in STUDIES} >= {
        "fusedit-designs-tiny",
        "position-encodings-tiny",
        "timestep-tiny",
        "lidit-tiny",
        "fusedit-designs-gpu",
        "lidit-gpu",
    }
    for path in STUDIES:
        study = load_study(path)
        assert len(study.designs) >= 2, path.name
        cfgs = [d.config for d in study.designs]
        varies = varying_keys(cfgs)
        assert varies, f"{path.name}: the designs are identical"
        # The recipe (data, flow schedule, steps, batch, seeds, sampling) is the same for every design.
        assert not [k for k in varies if k.split(".")[0] in ("data", "flow", "train", "sample")], path.name
        if path.stem.endswith("-tiny"):  # sized for 2 CPU cores in minutes
            assert all(c.train.steps <= 400 and c.data.image_size <= 32 for c in cfgs), path.name
            assert study.eval.per_category <= 6
        # Builds every design on the meta device (parameter and FLOP counts), so a shape error shows here.
        caplog.clear()
        plan = describe_study(study)
        assert all(f"  {d.label}: " in plan for d in study.designs)
        # No build warning (e.g. prompts longer than the LLM's learned positions).
        assert [r.getMessage() for r in caplog.records if r.levelname == "WARNING"] == [], path.name


def test_unfair_recipes_are_flagged_and_device_overrides_apply():
    spec = {
        "designs": {
            "a": {"preset": "debug"},
            "b": {"preset": "debug-dit-cross", "overrides": {"train.steps": 10}},
        }
    }
    study = load_study(spec, device="cpu")
    assert all(d.config.train.device == "cpu" for d in study.designs)
    assert varying_keys([d.config for d in study.designs]) == ["model.design", "train.steps"]
    assert "warning: the recipe differs between designs in train.steps" in describe_study(study)
    moved = load_study(study, device="meta")
    assert [d.config.train.device for d in moved.designs] == ["meta", "meta"]
    assert study.designs[0].config.train.device == "cpu"  # the given study is left as it was


def test_study_outputs_are_written_atomically_and_eval_follows_the_sample_section(tmp_path, monkeypatch):
    written = []

    def atomic(path, text):
        written.append(path.name)
        path.write_text(text)

    monkeypatch.setattr(study_mod, "write_text_atomic", atomic)
    study = load_study(
        {
            "designs": {
                "a": {
                    "preset": "debug",
                    "overrides": ["sample.negative_prompt=blurry", "sample.schedule=diffusers"],
                }
            }
        }
    )
    summary = study_mod.write_outputs(study, {}, tmp_path)
    # The report and results.json are rewritten after every design and read while the study runs.
    assert written == ["report.md", "results.json"] and summary["pending"] == ["a"]
    # The bench samples as the design's sample section says, and a change of it invalidates old scores.
    settings = study_mod._eval_settings(study.eval, study.designs[0].config)
    assert (settings["negative_prompt"], settings["precision"], settings["schedule"]) == (
        "blurry",
        "auto",
        "diffusers",
    )


def test_design_cost_counts_each_llms_padded_width_template_included():
    """A templated design pads its prompts wider by the template's tokens (text.max_length counts the prompt
    alone): the FLOP columns count that width, as the real build pads, for every LLM."""
    from fusedit.models.flops import llm_flops
    from fusedit.system import build_model

    cfg = load_config("debug-lidit")
    real = build_model(cfg, with_autoencoder=False)
    widths = [enc.max_length for enc in real.encoders]
    assert widths[0] > cfg.text.max_length and len(widths) == 2
    cost = study_mod.design_cost(cfg)
    assert cost["text_tokens"] == sum(widths)  # what the DiT reads: the two LLMs' tokens one after another
    assert cost["llm_forward_flops"] == sum(llm_flops(enc.llm, w) for enc, w in zip(real.encoders, widths))
    # A hub tokenizer is not downloaded for a shapes-only build: its width is text.max_length.
    hub = load_config("lidit-1b")
    assert study_mod.design_cost(hub)["text_tokens"] == hub.text.max_length


def test_a_studys_scores_name_their_checkpoint_and_weights_and_mark_untrained_kinds(tmp_path, monkeypatch):
    """h-study F2: the study's scores.json recorded no checkpoint, fingerprint or EMA (`fusedit eval`'s
    does), report.md named the row by the bare label, the categories outside data.kinds were plain columns
    averaged into the overall unsaid, and "reused" was decided on the settings alone: other weights under
    the same settings kept the old scores."""
    from safetensors.torch import load_file, save_file

    from fusedit.checkpoints import weights_fingerprint

    spec, out = _tiny_study(tmp_path), tmp_path / "out"
    run_study(spec, out, progress=False, only=["fusion"])
    ckpt = find_checkpoint(out / "runs" / "fusion")
    assert ckpt.name == "step_00000004"
    weights = {"checkpoint": "step_00000004", "weights": weights_fingerprint(ckpt), "ema": True}
    scores = json.loads((out / "runs" / "fusion" / "eval" / "scores.json").read_text())
    assert {k: scores["settings"][k] for k in weights} == weights
    assert scores["settings"]["model"] == str(ckpt)
    results = json.loads((out / "results.json").read_text())
    design = results["designs"]["fusion"]
    assert design["row"] == "fusion@4" and design["weights"] == weights
    untrained = [k for k in results["categories"] if k not in TINY["data"]["kinds"]]
    assert untrained and design["scores"]["untrained"] == scores["untrained"] == untrained
    scores_md = (out / "runs" / "fusion" / "eval" / "scores.md").read_text()
    assert "| fusion@4 |" in scores_md and f"| {untrained[0]} (untrained) |" in scores_md
    report = (out / "report.md").read_text()
    header, row = _table(report)[0], _table(report)[2]
    assert row[0] == "fusion@4"
    assert [h for h in header if h.endswith(" (untrained)")] == [k + " (untrained)" for k in untrained]
    n = len(results["categories"])
    assert (
        f"\n{', '.join(untrained)} untrained: not in the run's data.kinds; the overall is over all {n} "
        "categories, comparable across runs.\n"
    ) in report

    # The same config and eval settings, other weights (a checkpoint replaced in place): scored again.
    ema = ckpt / "ema.safetensors"
    tensors = load_file(ema)
    first = sorted(tensors)[0]
    tensors[first] = tensors[first] + 1.0
    save_file(tensors, ema)
    study = load_study(spec)
    assert study_mod.planned_statuses(study, out, ["fusion"]) == {"fusion": "re-scored"}
    trains, benches = _spy(monkeypatch)
    again = run_study(spec, out, progress=False, only=["fusion"])
    assert trains == [] and benches == ["fusion"] and again["designs"]["fusion"]["status"] == "re-scored"
    assert again["designs"]["fusion"]["weights"]["weights"] == weights_fingerprint(ckpt) != weights["weights"]
    # Its grid was drawn from the old weights too: redrawn with the scores, then both are current.
    assert study_mod.planned_statuses(study, out, ["fusion"]) == {"fusion": "reused"}


def test_step_time_is_a_median_without_step_one_and_the_wall_clock_is_labelled(tmp_path):
    """h-study F4: "train time" summed metrics.jsonl's seconds, step 1's one-off setup included, at 0.1-min
    resolution: 0.2 min against 0.0 min for designs whose steady steps cost about the same."""
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(TINY))
    study = load_study({"designs": {"a": {"preset": str(tmp_path / "tiny.yaml")}}})
    run_dir = tmp_path / "runs" / "a"
    run_dir.mkdir(parents=True)
    seconds = [6.02, 0.05, 0.07, 0.05, 0.06, 0.09]
    lines = [json.dumps({"step": i + 1, "loss": 1.0, "sec": s}) for i, s in enumerate(seconds)]
    (run_dir / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    scores = {"overall": 0.5, "per_category": {"single": 0.5}, "counts": {}, "num_images": 2}
    result = study_mod._result(study.designs[0], run_dir, "trained", scores, "a@6")
    assert result["median_step_seconds"] == 0.06 and result["train_seconds"] == 6.3
    report = study_mod.markdown_report(study, {"a": result}, [])
    header, row = _table(report)[0], _table(report)[2]
    assert "train time" not in header
    assert row[header.index("step time")] == "0.06 s" and row[header.index("wall clock")] == "6.3 s"
    assert (
        "step time: the median seconds of a training step, step 1 (its one-off setup) left out "
        "(metrics.jsonl); wall clock: every training step summed, setup and whatever else ran on the "
        "machine included: not a speed comparison (FLOPs / image is the fair cost column)."
    ) in report
    # A GPU design's minutes read as minutes.
    assert [study_mod._duration(s) for s in (6.3, 420.3, 9000.0)] == ["6.3 s", "7.0 min", "2.5 h"]


def test_a_category_only_some_designs_left_out_is_marked_in_their_cells(tmp_path):
    """h-study F2: designs on different data.kinds (a recipe difference the report warns of): a category
    untrained by every design is marked in the header, one untrained by some in their cells."""
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(TINY))
    study = load_study(
        {
            "designs": {
                "a": {"preset": str(tmp_path / "tiny.yaml")},
                "b": {
                    "preset": str(tmp_path / "tiny.yaml"),
                    "overrides": ["data.kinds=[single,two,counting]"],
                },
            }
        }
    )
    per_category = {"single": 0.5, "two": 0.25, "counting": 0.0}
    results = {}
    for design, untrained in zip(study.designs, (["two", "counting"], ["two"]), strict=True):
        scores = {"overall": 0.25, "per_category": per_category, "counts": {}, "num_images": 3}
        scores["untrained"] = untrained
        results[design.label] = study_mod._result(design, tmp_path / design.label, "trained", scores)
    report = study_mod.markdown_report(study, results, ["data.kinds"])
    header, a, b = _table(report)[0], _table(report)[2], _table(report)[3]
    assert header[2:6] == ["single", "two (untrained)", "counting", "overall"]
    assert a[2:6] == ["0.500", "0.250", "0.000 (untrained)", "0.250"] and b[4] == "0.000"
    assert "\ntwo untrained: not in the run's data.kinds; the overall is over all 3 categories" in report
    assert (
        "\n(untrained) in a cell: not in that design's data.kinds; the overall is over all 3 categories"
        in report
    )
