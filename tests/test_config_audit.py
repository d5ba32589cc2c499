"""Config loading corners (dotted overrides into list items, ``base:`` chains, the arch merge, shapes
kinds) and checkpoint pruning."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import yaml

from conftest import tiny_config
from fusedit.checkpoints import find_checkpoint
from fusedit.config import (
    ConfigError,
    checked,
    load_config,
    load_yaml,
    parse_overrides,
    preset_names,
    save_config,
    to_dict,
)
from fusedit.train.checkpoint import save_checkpoint


def test_string_keys_of_list_items_take_the_override_as_typed():
    """extra_text.N.* and stages.N.* string keys keep the text as typed, as text.* ones do: YAML would read
    "Imagine: " as a mapping and "yes" as true."""
    parsed = parse_overrides(
        [
            "extra_text.0.instruction=Imagine: ",
            "stages.1.name=yes",
            "stages.0.data.hf_name=on",
            "stages.0.steps=5",
        ]
    )
    assert parsed == {
        "extra_text": {"0": {"instruction": "Imagine: "}},
        "stages": {"1": {"name": "yes"}, "0": {"data": {"hf_name": "on"}, "steps": 5}},
    }
    cfg = load_config("debug-lidit", ["extra_text.0.instruction=Imagine: "])
    assert cfg.extra_text[0].instruction == "Imagine: "
    assert load_config("recipe-shapes-3stage", ["stages.1.name=yes"]).stages[1].name == "yes"


def test_a_relative_base_folder_is_looked_up_beside_the_config(tmp_path, monkeypatch):
    """``base: ../run`` (a run folder) is read from the config file's folder, as a base file is, not from
    the working directory."""
    for folder in ("run", "exp", "elsewhere/deeper"):
        (tmp_path / folder).mkdir(parents=True)
    save_config(load_config("debug", ["name=saved-run", "train.steps=11"]), tmp_path / "run" / "config.yaml")
    (tmp_path / "exp" / "a.yaml").write_text("base: ../run\nname: child\n")
    monkeypatch.chdir(tmp_path / "elsewhere" / "deeper")  # where ../run is no folder
    cfg = load_config(tmp_path / "exp" / "a.yaml")
    assert (cfg.name, cfg.train.steps) == ("child", 11)
    # A bare preset name beside a folder of that name (an output folder) is still the preset.
    (tmp_path / "exp" / "debug").mkdir()
    (tmp_path / "exp" / "b.yaml").write_text("base: debug\nname: child\n")
    preset_steps, other = load_config("debug").train.steps, load_config("debug", ["train.steps=77"])
    assert load_config(tmp_path / "exp" / "b.yaml").train.steps == preset_steps
    # So is one beside a folder of that name in the working directory: a run trained with `--out debug`
    # there, or an empty folder.
    monkeypatch.chdir(tmp_path)
    (tmp_path / "debug").mkdir()
    assert load_config(tmp_path / "exp" / "b.yaml").train.steps == preset_steps
    save_config(other, tmp_path / "debug" / "config.yaml")
    assert load_config(tmp_path / "exp" / "b.yaml").train.steps == preset_steps != 77


def test_a_position_in_a_stages_inherited_list_still_patches_it():
    """A stage's data mapping holds only what it changes; its lists come from the top-level section."""
    cfg = load_config("recipe-shapes-3stage", ["stages.0.data.kinds.0=position"])
    top = load_config("recipe-shapes-3stage").data.kinds
    from fusedit.config import resolved_stages

    assert resolved_stages(cfg)[0].config.data.kinds == ["position", *top[1:]]


def test_an_arch_override_naming_the_default_family_keeps_the_base_arch(tmp_path):
    """A base that leaves text.family at its default (gemma) and an override that names it: the same
    family, so the override changes one number and keeps the rest of the arch."""
    arch = {
        "vocab_size": 64,
        "hidden_size": 32,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,  # Gemma's default 16 would not divide the 4 heads (the LLM fails at its first step)
        "head_dim": 8,
    }
    (tmp_path / "b.yaml").write_text(yaml.safe_dump({"name": "b", "text": {"arch": arch}}))
    (tmp_path / "c.yaml").write_text("base: b.yaml\ntext:\n  family: gemma\n  arch: {num_hidden_layers: 2}\n")
    assert load_config(tmp_path / "c.yaml").text.arch == {**arch, "num_hidden_layers": 2}
    cfg = load_config(tmp_path / "b.yaml", ["text.family=gemma", "text.arch.num_hidden_layers=2"])
    assert cfg.text.arch == {**arch, "num_hidden_layers": 2}


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            ["data.kinds=[single, spiral]"],
            "data.kinds=['single', 'spiral'] with data.max_objects=2: unknown prompt kind 'spiral'",
        ),
        (["data.max_objects=9"], "with data.max_objects=9: max_objects must be between 1 and 4, got 9"),
        (["data.kinds=[counting]", "data.max_objects=1"], "prompt kind 'counting' needs at least 2 objects"),
    ],
)
def test_shapes_kinds_the_world_cannot_draw_are_refused_at_load(overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config("debug", overrides)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["train.seed=-1"], "train.seed=-1"),
        (
            ["text.model_id=org/llm", "text.pretrain_steps=5"],
            "text.pretrain_steps=5 pretrains a random-init LLM, but text.model_id='org/llm' loads a trained one",
        ),
    ],
)
def test_settings_the_run_would_crash_on_or_ignore_are_refused_at_load(overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config("debug", overrides)


def test_a_later_stages_shapes_kinds_are_checked_at_load():
    """A stage's data is built only when the stage starts: its bad kinds must fail at load, not hours in."""
    with pytest.raises(ConfigError, match=re.escape("stages.2 (lora-position): data.kinds=['spiral']")):
        load_config("recipe-shapes-3stage", ["stages.2.data.kinds=[spiral]"])


def test_pruning_keeps_the_checkpoint_just_written_when_a_later_step_is_on_disk(tmp_path):
    """A crash between a checkpoint's rename and `latest` naming it leaves a folder past `latest`; the run
    resumed from `latest` writes lower steps next. keep_checkpoints must not prune the one just written
    (it would then resume from the abandoned folder past it)."""
    cfg, net = tiny_config(), torch.nn.Linear(2, 2)
    root = tmp_path / "checkpoints"
    save_checkpoint(tmp_path, 10, cfg, net, None, None, None, keep=1)
    save_checkpoint(tmp_path, 20, cfg, net, None, None, None, keep=2)
    (root / "latest").write_text("step_00000010")  # as the crash left it
    assert find_checkpoint(tmp_path).name == "step_00000010"
    final = save_checkpoint(tmp_path, 15, cfg, net, None, None, None, keep=1)
    assert final.is_dir() and find_checkpoint(tmp_path) == final
    assert {p.name for p in root.iterdir()} == {"latest", "step_00000015", "step_00000020"}


@pytest.mark.parametrize("key", ["extra_text.0.family=qwen2", "stages.0.steps=3"])
def test_a_position_in_a_list_the_config_leaves_empty_is_named(key):
    """It said "extra_text={'0': {...}} must be a list of mappings", which the override never wrote."""
    name = key.split(".")[0]
    with pytest.raises(
        ConfigError, match=re.escape(f"{name}.0: no such item ({name} is empty: write its items")
    ):
        load_config("debug", [key])


def test_the_shapes_worlds_kinds_and_object_count_are_the_configs():
    """config checks data.kinds and data.max_objects at load from its own table (config imports nothing of
    fusedit's): the world must draw exactly those kinds, with the counts its number words cover."""
    from fusedit.config import SHAPES_KINDS, SHAPES_MAX_OBJECTS
    from fusedit.data import shapes

    assert tuple(SHAPES_KINDS) == shapes.ALL_KINDS and max(shapes.NUMBER_WORDS) == SHAPES_MAX_OBJECTS
    for kind, fewest in SHAPES_KINDS.items():
        assert min(len(p.objects) for p in shapes.all_prompts(kind, SHAPES_MAX_OBJECTS)) == fewest


def test_a_position_in_a_list_left_at_its_default_patches_the_default():
    """train.trainable is absent from the debug preset's YAML: a position in it patches the field's default
    (["dit"]), and a position past its end names the positions there are, as for a list the YAML holds."""
    assert load_config("debug", ["train.trainable.0=llm"]).train.trainable == ["llm"]
    with pytest.raises(ConfigError, match=re.escape("train.trainable.3: no such item (allowed: 0..0)")):
        load_config("debug", ["train.trainable.3=llm"])
    with pytest.raises(ConfigError, match=re.escape("'bogus' is not allowed (allowed: a list of dit")):
        load_config("debug", ["train.trainable.0=bogus"])


@pytest.mark.parametrize("seed", ["-1", str(2**32)])
def test_the_preview_seed_is_one_fusedit_sample_takes(seed):
    """sample.seed seeds training's preview images as --seed does `fusedit sample`'s, so it is refused at
    load outside the range `fusedit sample --seed` takes (past 2**64 - 1, torch failed at the first preview,
    hours into a run)."""
    with pytest.raises(ConfigError, match=re.escape(f"sample.seed={seed} must be")):
        load_config("debug", [f"sample.seed={seed}"])


@pytest.mark.parametrize("preset", preset_names())
def test_checked_gives_back_every_preset_as_loaded(preset):
    cfg = load_config(preset)
    again = checked(cfg)
    assert again == cfg and again is not cfg


def test_a_config_edited_in_python_is_checked_field_by_field_as_a_file_is(tmp_path, monkeypatch):
    """A dataclass edit skipped every check load_config makes: lr=5, an unknown precision, a misspelt
    trainable part or a negative shift trained silently, and other values failed deep inside (KeyError)."""
    for path, value, error in (
        ("train.lr", 5.0, "train.lr=5.0 must be <= 1"),
        ("train.precision", "fp16", "train.precision='fp16' is not allowed (allowed: auto, fp32, bf16)"),
        ("model.pos_embed", "2d_rope", "model.pos_embed='2d_rope' is not allowed (allowed: ape, 1d-rope"),
        ("data.num_workers", "2", "data.num_workers='2' must be an integer"),
        ("train.trainable", ["dit", "refinerr"], "train.trainable=['dit', 'refinerr']: 'refinerr' is not"),
        ("flow.shift", -1.0, "flow.shift=-1.0 must be > 0"),
    ):
        cfg = load_config("debug")
        section, key = path.split(".")
        setattr(getattr(cfg, section), key, value)
        with pytest.raises(ConfigError) as e:
            checked(cfg)
        assert str(e.value).startswith(error), str(e.value)
    cfg = load_config("debug")
    cfg.train.stesp = 5
    with pytest.raises(
        ConfigError, match=re.escape("unknown config key 'train.stesp': did you mean 'train.steps'?")
    ):
        checked(cfg)
    with pytest.raises(ConfigError, match=r"^expected a fusedit Config, got dict \{'train'"):
        checked({"train": {"steps": 5}})


def test_checked_sums_stages_set_in_python_makes_paths_absolute_and_keeps_the_callers_config(
    tmp_path, monkeypatch
):
    from fusedit.config import StageConfig

    monkeypatch.chdir(tmp_path)
    (tmp_path / "imgs").mkdir()
    cfg = load_config("debug")
    cfg.stages = [StageConfig(name="a", steps=2), StageConfig(name="b", steps=3)]
    cfg.data.root = Path("imgs")  # a Path, relative: saved as written, a resume elsewhere found nothing
    cfg.data.buckets = ((32, 32),)
    again = checked(cfg)
    assert again.train.steps == 5 and cfg.train.steps != 5
    assert again.data.root == str(tmp_path / "imgs") and cfg.data.root == Path("imgs")
    assert again.data.buckets == [[32, 32]]
    yaml.safe_load(yaml.safe_dump(to_dict(again)))  # a Path would not dump


def test_a_presets_bare_name_is_the_preset_beside_a_folder_of_that_name(tmp_path, monkeypatch):
    """A run trained into ./debug made every later load_config("debug") read that run's config (and an
    empty ./debug was 'a folder without a saved config'), while base: debug read the preset."""
    monkeypatch.chdir(tmp_path)
    preset = load_config("debug")
    run = tmp_path / "debug"
    run.mkdir()
    save_config(load_config("debug", ["train.steps=1"]), run / "config.yaml")
    assert load_config("debug") == preset
    assert load_config("./debug").train.steps == 1 and load_config(run).train.steps == 1
    assert load_config(Path("debug")).train.steps == 1


@pytest.mark.parametrize("overrides", ["train.steps=5", {"train": {"steps": 5}}])
def test_overrides_of_another_type_than_a_list_say_what_is_allowed(overrides):
    with pytest.raises(ConfigError) as e:
        load_config("debug", overrides)
    assert str(e.value).endswith("(allowed: a list of 'section.key=value' strings, e.g. ['train.steps=5'])")


def test_a_key_written_twice_in_a_config_file_is_refused_naming_both_lines(tmp_path):
    """PyYAML keeps the last of two equal keys: a second `model:` silently dropped the first's pos_embed."""
    path = tmp_path / "exp.yaml"
    path.write_text(
        "base: debug\nmodel:\n  pos_embed: 2d-rope\ntrain:\n  steps: 3\nmodel:\n  qk_norm: false\n"
    )
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert str(e.value) == (
        f"cannot parse {path}: line 6, column 1: key 'model' appears twice (first on line 2; allowed: each key once)"
    )
    # A YAML merge key overrides on purpose: still read.
    path.write_text("base: debug\ntrain: &t\n  steps: 3\nsample:\n  <<: {steps: 4}\n  steps: 5\n")
    assert load_config(path).sample.steps == 5
    # An anchored mapping that merges and overrides, merged again later: PyYAML splices merged pairs into
    # the anchored node before its own check would run, which saw its override as a second key.
    text = "base: &b {x: 1, y: 1}\nouter:\n  inner: &i\n    <<: *b\n    x: 2\nother:\n  <<: *i\n"
    assert load_yaml(text) == yaml.safe_load(text)


def test_a_choice_that_turns_a_feature_off_takes_yaml_false_and_names_its_empty_value():
    """sample.compile's off is the empty string: `compile: false` (or YAML's off) was refused, and the
    allowed list printed the empty choice bare ('auto, , inductor')."""
    from fusedit.config import config_from_dict

    data = to_dict(load_config("debug"))
    data["sample"]["compile"] = False
    assert config_from_dict(data).sample.compile == ""
    data["sample"]["compile"] = True
    with pytest.raises(ConfigError) as e:
        config_from_dict(data)
    assert str(e.value) == (
        'sample.compile=True is not allowed (allowed: auto, "" (off; false in YAML), inductor, max-autotune, '
        "aot_eager, eager)"
    )


def test_checked_names_a_section_replaced_by_a_mapping_and_takes_numpy_numbers(caplog):
    import logging

    import numpy as np

    cfg = load_config("debug")
    cfg.model = {"design": "fusedit"}  # built fine, then every use read attributes of a dict
    with pytest.raises(ConfigError, match=r"^model is a dict \(allowed: a ModelConfig; config_from_dict"):
        checked(cfg)
    cfg = load_config("debug")
    cfg.train.lr, cfg.train.batch_size = np.float32(0.5), np.int64(4)
    again = checked(cfg)
    assert (type(again.train.lr), type(again.train.batch_size)) == (float, int)
    # A staged run's length is its stages' sum: an edited train.steps is said to be ignored, not dropped.
    cfg = load_config("recipe-shapes-3stage")
    cfg.train.steps = 10
    with caplog.at_level(logging.WARNING, logger="fusedit"):
        assert checked(cfg).train.steps == 1600
    assert [r.getMessage() for r in caplog.records] == [
        "train.steps=10 is not the stages' sum (800+500+300): a staged run trains its stages' length (set "
        "stages.N.steps to change it)"
    ]


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            ["model.refiner_causal=true"],
            "model.refiner_causal=true is a refiner ablation: set model.refiner_depth >= 1",
        ),
        (
            ["model.collaborative_refiner=false"],
            "model.collaborative_refiner=false is an ablation of the refiners of 2+ LLMs: it needs "
            "model.refiner_depth >= 1 and extra_text",
        ),
    ],
)
def test_refiner_ablations_without_a_refiner_are_refused_as_they_change_nothing(overrides, message):
    """Accepted on a design without refiners, they changed nothing (as refiner_gating=false, refused)."""
    with pytest.raises(ConfigError) as e:
        load_config("debug", overrides)
    assert str(e.value) == message
    assert load_config("debug-lidit", overrides).model.refiner_depth >= 1


def test_lora_targets_are_names():
    """train.dit_lora.targets=[0] (what a 'no such target' list of positions invited) was a TypeError deep
    in the adapter setup."""
    with pytest.raises(ConfigError) as e:
        load_config("debug", ["train.dit_lora.rank=4", "train.dit_lora.targets=[0]"])
    assert str(e.value) == "train.dit_lora.targets=[0] must be a list of strings (names)"


@pytest.mark.parametrize(
    "preset, overrides, message",
    [
        (
            "debug-dit-self",
            ["model.num_heads=5", "model.pos_embed=1d-rope"],
            "model.num_heads=5 does not divide the DiT width (model.dit_hidden_size=128) into whole heads "
            "(allowed: a divisor of 128, or model.head_dim set too)",
        ),
        (
            "debug",
            ["text.arch.head_dim=6", "model.pos_embed=2d-rope"],
            "model.pos_embed='2d-rope' needs a head width divisible by 4 (rotated channel pairs, half for the "
            "row and half for the column), but the DiT's heads are 6 wide (the LLM's head_dim) (allowed: a "
            "head width divisible by 4, or model.pos_embed ape or 1d-rope)",
        ),
        (
            "debug-dit-self",
            ["model.dit_hidden_size=120", "model.num_heads=4", "model.pos_embed=2d-rope"],
            "model.pos_embed='2d-rope' needs a head width divisible by 4 (rotated channel pairs, half for the "
            "row and half for the column), but the DiT's heads are 30 wide (the width 120 over "
            "model.num_heads=4) (allowed: a head width divisible by 4, or model.pos_embed ape or 1d-rope)",
        ),
        (
            "debug-dit-cross",
            ["model.num_heads=2", "model.head_dim=5", "model.pos_embed=m-rope"],
            "model.pos_embed='m-rope' needs a head width divisible by 4 (rotated channel pairs, half of the "
            "LLM's frequencies for the row and half for the column), but the DiT's heads are 5 wide "
            "(model.head_dim=5) (allowed: a head width divisible by 4, or model.pos_embed ape)",
        ),
        (  # an odd pair count would give the column one pair more than the row
            "debug",
            ["text.arch.head_dim=6", "model.pos_embed=m-rope"],
            "model.pos_embed='m-rope' needs a head width divisible by 4 (rotated channel pairs, half of the "
            "LLM's frequencies for the row and half for the column), but the DiT's heads are 6 wide (the LLM's "
            "head_dim) (allowed: a head width divisible by 4, or model.pos_embed ape or 1d-rope)",
        ),
        (
            "debug",
            ["model.dit_hidden_size=130"],
            "model.pos_embed='ape' needs a DiT width divisible by 4 (its 2D sin-cos table), but it is "
            "model.dit_hidden_size=130 (allowed: a width divisible by 4, or model.pos_embed 1d-rope, 2d-rope "
            "or m-rope)",
        ),
        (  # a hub LLM's shape is not known at load, but the width the DiT sets itself is
            "debug",
            ["text.model_id=fusedit-tests/not-in-the-cache", "model.dit_hidden_size=130"],
            "model.pos_embed='ape' needs a DiT width divisible by 4 (its 2D sin-cos table), but it is "
            "model.dit_hidden_size=130 (allowed: a width divisible by 4, or model.pos_embed 1d-rope, 2d-rope "
            "or m-rope)",
        ),
    ],
)
def test_head_and_width_sizes_the_position_scheme_cannot_take_are_refused_at_load(preset, overrides, message):
    """`fusedit config` and `describe` took them; training then failed at its first step with a tensor-size
    traceback, after the run folder was written. A num_heads that did not divide the width floored the
    heads' width without a word."""
    with pytest.raises(ConfigError) as e:
        load_config(preset, overrides)
    assert str(e.value) == message


def test_m_rope_and_2d_rope_take_head_widths_that_split_evenly_between_row_and_column():
    """M-RoPE gives the row the first half of the LLM's head_dim / 2 frequencies and the column the second
    (layers/rope.py: rope_m; the public code's chunk(4)), 2D RoPE a ladder of head_dim / 4 to each axis: both
    need a multiple of 4, or one axis would get a pair more than the other. 8-wide heads run; 6-wide (3
    pairs) are refused for both at load."""
    from fusedit.system import build_model

    shape = {"design": "dit-self", "num_heads": 2, "head_dim": 8}
    for pos in ("m-rope", "2d-rope"):
        model = build_model(tiny_config(model={**shape, "pos_embed": pos}))
        x = model(
            torch.randn(2, 3, 16, 16), torch.rand(2), model.encode_prompts(["a red circle", "two squares"])
        )
        assert x.shape == (2, 3, 16, 16) and torch.isfinite(x).all()
        with pytest.raises(ConfigError, match=re.escape("but the DiT's heads are 6 wide (model.head_dim=6)")):
            tiny_config(model={**shape, "head_dim": 6, "pos_embed": pos})


def test_a_fusion_layout_the_llm_cannot_hold_is_refused_at_load_as_the_build_refuses_it(tmp_path, caplog):
    """`fusedit config debug model.num_layers=7` printed the config of a 6-layer LLM's impossible layout:
    only the build refused it. Its layer count is known at load from text.arch or a local folder's config;
    a hub id's is not fetched at load, and the build gives the same line."""
    from transformers import AutoConfig

    from conftest import TINY_ARCH
    from fusedit.system import build_model

    message = (
        "model.initial_layers=0 + model.num_layers=7 needs 7 LLM layers but the LLM has 6: deep fusion pairs "
        "every DiT layer with one LLM layer (allowed: initial_layers + num_layers <= 6)"
    )
    with pytest.raises(ConfigError) as e:
        load_config("debug", ["model.num_layers=7"])
    assert str(e.value) == message
    with pytest.raises(
        ConfigError, match=re.escape("model.initial_layers=6 leaves no LLM layer for the DiT")
    ):
        load_config("debug-fusedit-cross", ["model.initial_layers=6"])
    folder = tmp_path / "llm"
    AutoConfig.for_model("gemma", **TINY_ARCH).save_pretrained(folder)  # a 3-layer LLM's config.json
    with pytest.raises(ConfigError, match=re.escape("needs 4 LLM layers but the LLM has 3")):
        load_config("debug", [f"text.model_id={folder}", "model.initial_layers=2", "model.num_layers=2"])
    hub = load_config("debug", ["text.model_id=fusedit-tests/not-in-the-cache", "model.num_layers=7"])
    with pytest.raises(ConfigError) as e:
        build_model(hub, "meta")  # shapes from text.arch, as for `fusedit describe` offline
    assert str(e.value) == message


@pytest.mark.parametrize(
    "design, overrides, message",
    [
        (
            "dit-self",
            ["model.dit_hidden_size=null", "model.num_heads=5"],
            "model.num_heads=5 does not divide the DiT width (the LLM's hidden size 64) into whole heads "
            "(allowed: a divisor of 64, or model.head_dim set too)",
        ),
        (
            "fusedit",
            ["text.arch.head_dim=6", "model.pos_embed=2d-rope"],
            "model.pos_embed='2d-rope' needs a head width divisible by 4 (rotated channel pairs, half for the "
            "row and half for the column), but the DiT's heads are 6 wide (the LLM's head_dim) (allowed: a "
            "head width divisible by 4, or model.pos_embed ape or 1d-rope)",
        ),
        (
            "fusedit",
            ["model.dit_hidden_size=null", "text.arch.hidden_size=66"],
            "model.pos_embed='ape' needs a DiT width divisible by 4 (its 2D sin-cos table), but it is the "
            "LLM's hidden size 66 (allowed: a width divisible by 4, or model.pos_embed 1d-rope, 2d-rope or "
            "m-rope)",
        ),
    ],
)
def test_the_build_refuses_head_sizes_of_an_llm_known_only_then_in_one_line(design, overrides, message):
    """A hub id's config is not fetched at load, so the build (here offline on the meta device, from
    text.arch) is where these sizes are first known: one line, not a tensor-size traceback at the first
    step."""
    from fusedit.system import build_model

    cfg = load_config(
        "debug", ["text.model_id=fusedit-tests/not-in-the-cache", f"model.design={design}", *overrides]
    )
    with pytest.raises(ConfigError) as e:
        build_model(cfg, "meta")
    assert str(e.value) == message


def test_an_arch_transformers_refuses_is_a_one_line_error_at_load():
    """transformers 5 validates its config dataclasses through huggingface_hub (an odd head_dim under RoPE):
    that error type passed the arch check and `fusedit describe` ended in a traceback."""
    with pytest.raises(ConfigError) as e:
        load_config("debug", ["text.arch.head_dim=5"])
    message = str(e.value)
    # The failing field first, not the whole arch.
    assert message.startswith("text.arch.head_dim=5 is not valid for gemma: ") and "\n" not in message
    assert "RoPE requires an even rotary dimension" in message
    with pytest.raises(ConfigError, match=r"^text\.arch\.rms_norm_eps='x' is not valid for gemma: .*float"):
        load_config("debug", ["text.arch.rms_norm_eps=x"])


@pytest.mark.parametrize(
    "preset, override",
    [
        ("debug", "text.arch.hidden_size=-4"),
        ("debug", "text.arch.head_dim=0"),
        ("debug", "text.arch.num_attention_heads=0"),
        ("debug", "text.arch.num_key_value_heads=0"),
        ("debug", "text.arch.vocab_size=0"),
        ("debug", "text.arch.intermediate_size=-1"),
        ("debug", "text.arch.num_hidden_layers=0"),
        ("debug", "text.arch.num_hidden_layers=-1"),
        ("debug", "text.arch.max_position_embeddings=0"),
        ("debug", "text.arch.hidden_size=2.5"),
        ("debug", "text.arch.hidden_size=true"),
        ("debug", "text.arch.hidden_size=abc"),
        ("debug-lidit", "extra_text.0.arch.hidden_size=0"),
        ("debug-clip-mod", "pooled_text.arch.num_hidden_layers=0"),
        # The arch stands in for a hub id out of reach: checked with a model_id too.
        ("fusedit-gemma2b", "text.arch.hidden_size=0"),
    ],
)
def test_arch_sizes_that_are_not_positive_integers_are_refused_at_load(preset, override):
    """transformers takes any int: zero or a negative size crashed the build (a negative dimension, a
    division by zero, an index out of range), and 0 layers read as `initial_layers < 0` allowed."""
    key, value = override.split("=")
    shown = {"2.5": "2.5", "true": "True", "abc": "'abc'"}.get(value, value)
    with pytest.raises(ConfigError) as e:
        load_config(preset, [override])
    assert str(e.value) == f"{key}={shown} is not allowed (allowed: an integer >= 1)"


def test_kv_heads_that_do_not_divide_the_query_heads_are_refused_at_load():
    with pytest.raises(ConfigError) as e:
        load_config("debug", ["text.arch.num_key_value_heads=3"])
    assert str(e.value) == (
        "text.arch.num_key_value_heads=3 does not divide num_attention_heads=4 (allowed: a divisor of "
        "num_attention_heads: each key/value head serves a group of query heads)"
    )
    assert load_config("debug", ["text.arch.num_key_value_heads=2"]).text.arch["num_key_value_heads"] == 2


@pytest.mark.parametrize(
    "preset, override, message",
    [
        ("debug", "text.arch.vocab_sizee=3", "unknown config key 'text.arch.vocab_sizee': did you mean 'text.arch.vocab_size'? (allowed: the keys of transformers' gemma config, e.g. hidden_size, "),
        ("debug-lidit", "extra_text.0.arch.hiden_size=3", "unknown config key 'extra_text.0.arch.hiden_size': did you mean 'extra_text.0.arch.hidden_size'? (allowed: the keys of transformers' qwen2 config, e.g. "),
        ("debug", "pooled_text.arch.foo=1", "unknown config key 'pooled_text.arch.foo' (allowed: the keys of transformers' clip_text_model config, e.g. hidden_size, "),
    ],
)  # fmt: skip
def test_an_unknown_arch_key_is_refused_with_a_close_one(preset, override, message):
    """transformers keeps an unknown key as an attribute nothing reads: the typo trained silently."""
    with pytest.raises(ConfigError) as e:
        load_config(preset, [override])
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


def test_arch_defaults_are_read_only():
    """arch_defaults hands every caller the one cached dict of a family's defaults: a change would reach every
    later caller, so it is refused."""
    from transformers import GemmaConfig

    from fusedit.config import arch_defaults

    defaults = arch_defaults("gemma")
    assert defaults["hidden_size"] == GemmaConfig().hidden_size
    with pytest.raises(TypeError, match="does not support item assignment"):
        defaults["hidden_size"] = 1
    assert arch_defaults("gemma")["hidden_size"] == GemmaConfig().hidden_size


@pytest.mark.parametrize("preset", preset_names())
def test_every_presets_arch_keys_and_name_pass_the_checks(preset):
    from fusedit.config import CLIP_TEXT_FAMILY, NAME_WORD, check_arch, text_sections

    cfg = load_config(preset)
    for key, text in text_sections(cfg):
        check_arch(text.family, text.arch, key)
    check_arch(CLIP_TEXT_FAMILY, cfg.pooled_text.arch, "pooled_text")
    assert NAME_WORD.match(cfg.name)


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("family", ["gemma", "gemma2"])
def test_the_arch_a_public_checkpoint_converts_to_passes_the_arch_check(family, fused):
    """The converter writes keys transformers reads without declaring them (rope_theta, Gemma's
    hidden_activation): they are arch keys, not typos."""
    from fusedit.config import check_arch
    from fusedit.convert.fusedit_official import _arch

    base = {"model_type": family, "vocab_size": 64, "hidden_size": 32, "intermediate_size": 64}
    base |= {"num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 8}
    if family == "gemma2":
        base |= {"query_pre_attn_scalar": 8, "sliding_window": 16, "attn_logit_softcapping": 50.0}
    name, arch = _arch(base, fused)
    check_arch(name, arch, "text")


@pytest.mark.parametrize(
    "text, message",
    [
        ("base: 5\n", "{path}: base=5 is not allowed (allowed: a preset name, a YAML path, or a run folder)"),
        ("base: [debug]\n", "{path}: base=['debug'] is not allowed (allowed: a preset name, a YAML path, or a run folder)"),
        ("", "{path}: the file is empty (allowed: a YAML mapping of sections, e.g. base: debug)"),
        ("# only a comment\n", "{path}: the file is empty (allowed: a YAML mapping of sections, e.g. base: debug)"),
        ("base: nonexist.yaml\n", "base 'nonexist.yaml' of {path}: not found beside it ({dir}/nonexist.yaml) nor from the working directory ({cwd}/nonexist.yaml) (allowed: a preset name, a YAML path, or a run folder)"),
        ("base: debugg\n", "base 'debugg' of {path}: unknown preset: did you mean 'debug'? (allowed: debug, "),
    ],
)  # fmt: skip
def test_a_config_files_base_and_content_problems_name_the_file(tmp_path, monkeypatch, text, message):
    """A base that is not a string was a TypeError traceback; an empty file read as the all-default config
    ("text.arch is empty"); a base not found named neither the file referring to it nor where it looked."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "exp").mkdir()
    path = tmp_path / "exp" / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert str(e.value).startswith(message.format(path=path, dir=path.parent, cwd=tmp_path))
    assert "\n" not in str(e.value)


def test_a_config_file_that_is_not_utf8_is_named(tmp_path):
    path = tmp_path / "bin.yaml"
    path.write_bytes(b"a\xff: 1\n")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert (
        str(e.value)
        == f"{str(path)!r} is not UTF-8 text (byte 1: invalid start byte) (allowed: a UTF-8 YAML file)"
    )


@pytest.mark.parametrize("name", ["", "../../escaped", "/tmp/abs", "a b", ".hidden", "run\n", "a/b"])
def test_a_run_name_that_is_not_one_word_is_refused_as_it_names_the_run_folder(name):
    """runs/<name>: an empty name trained into runs/ itself (and --overwrite would clear it), ../.. left it.
    Refused where it becomes the folder; a config (a saved run, a converted checkpoint) so named still loads."""
    from fusedit.config import default_run_folder

    with pytest.raises(ConfigError) as e:
        default_run_folder(load_config("debug", [f"name={name}"]).name)
    assert str(e.value) == (
        f"name={name!r} cannot name the run folder runs/<name> (allowed: a word of letters, digits, '.', '_', "
        "'+', '-', starting with a letter or digit; or give --out)"
    )
    assert default_run_folder("my-run_2.b+c") == "runs/my-run_2.b+c"


def test_the_study_name_rule_is_the_run_names():
    from fusedit.config import is_name_word
    from fusedit.study import file as study_file

    assert study_file.is_name_word is is_name_word


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["data.weights=[abc]"], "data.weights=['abc'] is not allowed (allowed: finite numbers >= 0, not all 0, one per data.shards entry; [] for equal weights)"),
        (["data.weights=[-1]"], "data.weights=[-1] is not allowed ("),
        (["data.weights=[0, 0]"], "data.weights=[0, 0] is not allowed ("),
        (["data.weights=[.nan]"], "data.weights=[nan] is not allowed ("),
        (["data.weights=[.inf]"], "data.weights=[inf] is not allowed ("),
        (["data.weights=[true]"], "data.weights=[True] is not allowed ("),
        (["data.source=webdataset", "data.shards=[a.tar,b.tar]", "data.weights=[1]"], "data.weights=[1] is not allowed (allowed: finite numbers >= 0, not all 0, one per data.shards entry (2); [] for equal weights)"),
    ],
)  # fmt: skip
def test_data_weights_are_checked_at_load(overrides, message):
    """`fusedit config` passed data.weights=[abc]: only a webdataset run's first read refused it."""
    with pytest.raises(ConfigError) as e:
        load_config("debug", overrides)
    assert str(e.value).startswith(message)
    cfg = load_config("debug", ["data.source=webdataset", "data.shards=[a.tar,b.tar]", "data.weights=[1, 0]"])
    assert cfg.data.weights == [1, 0]


def test_data_weights_beside_a_source_that_never_reads_them_are_refused():
    """data.weights weighs webdataset shards: beside another source the run ignored them silently."""
    from fusedit.config import check_data_locations

    cfg = load_config("debug", ["data.source=folder", "data.root=/tmp", "data.weights=[1, 2]"])
    with pytest.raises(ConfigError) as e:
        check_data_locations(cfg.data)
    assert str(e.value) == (
        "data.weights=[1, 2] is set but data.source='folder' (it reads data.root / data.index_file) never reads "
        "it (allowed: data.source=webdataset to read it, or no data.weights)"
    )


def test_the_saved_llm_fields_are_the_model_ids_own_not_the_presets(tmp_path):
    """A preset's text.family and text.arch (debug: a 6-layer Gemma) stayed beside a user's own
    text.model_id (a local Qwen2 folder) in the config a run saved. with_model_llm_fields records the
    model's own, which load back unchanged (a resumed run saves the same); a model type no family allows,
    a hub id out of reach and a random-init LLM keep theirs."""
    from transformers import AutoConfig

    from fusedit.config import arch_config, save_config, with_model_llm_fields

    qwen = tmp_path / "qwen"
    shape = {"hidden_size": 64, "num_hidden_layers": 6, "num_attention_heads": 2, "num_key_value_heads": 1}
    AutoConfig.for_model("qwen2", vocab_size=64, intermediate_size=128, **shape).save_pretrained(qwen)
    cfg = load_config("debug", [f"text.model_id={qwen}"])
    assert (cfg.text.family, cfg.text.arch["num_attention_heads"]) == ("gemma", 4)  # the preset's
    saved = with_model_llm_fields(cfg)
    assert (saved.text.family, cfg.text.family) == ("qwen2", "gemma")  # cfg itself left as it was
    built = arch_config(saved.text)
    assert {k: getattr(built, k) for k in shape} == shape and built.intermediate_size == 128
    save_config(saved, tmp_path / "config.yaml")
    again = load_config(tmp_path / "config.yaml")
    assert again == saved and with_model_llm_fields(again) == again
    AutoConfig.for_model("phi3", hidden_size=64, num_hidden_layers=6, num_attention_heads=2).save_pretrained(
        tmp_path / "phi3"
    )
    for kept in (
        load_config("debug-lidit", [f"text.model_id={tmp_path / 'phi3'}"]),
        load_config("debug", ["text.model_id=fusedit-tests/not-in-the-cache"]),
        load_config("debug"),
    ):
        assert with_model_llm_fields(kept) == kept
