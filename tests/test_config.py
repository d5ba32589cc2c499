import json
import shlex

import pytest

from fusedit.config import (
    ConfigError,
    config_from_dict,
    load_config,
    parse_overrides,
    preset_names,
    save_config,
)


def one_line_error(preset: str, overrides: list[str]) -> str:
    """The message of the ConfigError that loading ``preset`` with ``overrides`` raises: one line."""
    with pytest.raises(ConfigError) as e:
        load_config(preset, overrides)
    assert "\n" not in str(e.value), str(e.value)
    return str(e.value)


def test_presets_load_and_round_trip(tmp_path):
    assert {"debug", "fusedit-gemma2b"} <= set(preset_names())
    cfg = load_config("debug", ["train.steps=7", "model.pos_embed=2d-rope", "text.arch.num_hidden_layers=4"])
    assert cfg.train.steps == 7 and cfg.model.pos_embed == "2d-rope"
    assert cfg.text.arch["num_hidden_layers"] == 4 and cfg.text.arch["hidden_size"] == 64  # arch merged
    save_config(cfg, tmp_path / "c.yaml")
    assert load_config(tmp_path / "c.yaml") == cfg


def test_an_arch_of_another_family_replaces_the_base_arch(tmp_path):
    """lidit-1b (a Llama) sits on fusedit-gemma2b: Gemma's arch keys (hidden_activation) must not leak into
    the Llama arch, while an override of the same family still changes one number and keeps the rest."""
    assert "hidden_activation" in load_config("fusedit-gemma2b").text.arch
    lidit = load_config("lidit-1b").text.arch
    assert "hidden_activation" not in lidit and lidit["hidden_act"] == "silu"
    (tmp_path / "exp.yaml").write_text(
        "base: lidit-1b\ntext:\n  family: llama\n  arch: {num_hidden_layers: 8}\n"
    )
    assert load_config(tmp_path / "exp.yaml").text.arch == {**lidit, "num_hidden_layers": 8}


def test_override_file_on_a_preset(tmp_path):
    (tmp_path / "exp.yaml").write_text("base: debug\nmodel:\n  pos_embed: m-rope\ntrain:\n  lr: 0.01\n")
    cfg = load_config(tmp_path / "exp.yaml")
    assert cfg.model.pos_embed == "m-rope" and cfg.train.lr == 0.01 and cfg.data.image_size == 32


@pytest.mark.parametrize(
    "override, message",
    [
        ("model.foo=1", "unknown config key 'model.foo'"),
        ("nosection.x=1", "unknown config key 'nosection'"),
        (
            "model.pos_embed=3d-rope",
            "model.pos_embed='3d-rope' is not allowed (allowed: ape, 1d-rope, 2d-rope, m-rope, none)",
        ),
        ("model.timestep_conditioning=film", "allowed: adaln-zero, adaln-single, addition, none"),
        ("train.steps=abc", "train.steps='abc' must be an integer"),
        ("train.steps=0", "train.steps=0 must be > 0"),
        ("train.lr=-1", "train.lr=-1.0 must be > 0"),
        ("model.qk_norm=maybe", "model.qk_norm='maybe' must be true or false"),
        ("data.caption_dropout=1.5", "data.caption_dropout=1.5 must be <= 1"),
        ("data.image_size=30", "data.image_size=30 must be divisible by"),
        ("data.buckets=[[32,30]]", "data.buckets: [32, 30] must have both sides divisible by"),
        ("data.buckets=[32,48]", "data.buckets=[32, 48]: 32 is not [height, width] in pixels"),
        ("vae.latent_channels=4", "vae.kind=identity needs"),
        ("text.arch=null", "text.arch=None must be a dict"),
        ("train.steps", "must look like section.key=value"),
    ],
)
def test_bad_values_fail_with_one_line_errors(override, message):
    assert message in one_line_error("debug", [override])


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            ["model.design=dit-self", "model.initial_layers=1"],
            "model.initial_layers=1 pairs DiT layers with deeper LLM layers, but model.design='dit-self' reads",
        ),
        (["model.pos_embed=none"], "model.pos_embed='none' without model.conv_pos=true leaves the image"),
        (
            ["model.pos_embed=1d-rope", "model.rope_layout=image-only"],
            "model.rope_layout='image-only' is for the shallow designs, not model.design='fusedit'",
        ),
        (
            ["model.design=fusedit-cross", "model.rope_layout=image-only"],
            "not model.design='fusedit-cross', whose text keys the LLM rotates (allowed: joint)",
        ),
        (
            ["model.pos_embed=none", "model.conv_pos=true", "model.rope_left_pad=16"],
            "got design='fusedit', pos_embed='none', rope_layout='joint'",
        ),
        (
            ["model.design=dit-self", "model.pos_embed=2d-rope", "model.rope_left_pad=16"],
            "model.rope_left_pad=16 reproduces the public code's joint text-image rotations: it needs",
        ),
    ],
)
def test_designs_refuse_knobs_they_would_misuse(overrides, message):
    assert message in one_line_error("debug", overrides)
    # What each refusal points to is accepted.
    load_config("debug", ["model.design=dit-self", "model.pos_embed=1d-rope", "model.rope_layout=image-only"])
    load_config("debug", ["model.pos_embed=none", "model.conv_pos=true"])
    load_config("debug", ["model.pos_embed=2d-rope", "model.rope_left_pad=16"])


# Tokenizers of their own (never read at load): with the built-in one, a system prompt's words enter its
# vocabulary, which a plain template then changes.
HUB_TOKENIZERS = ["text.tokenizer=google/gemma-2b", "extra_text.0.tokenizer=Qwen/Qwen2-7B"]


@pytest.mark.parametrize(
    "preset, overrides, message",
    [
        (
            "debug",
            ["text.tokenizer=google/gemma-2b", "text.system_prompt=Be brief."],
            "text.system_prompt='Be brief.' does nothing with text.template='plain', which has no system turn "
            "(allowed: text.template chat, lidit or lidit-chat, or an empty system_prompt)",
        ),
        (
            "debug-lidit",
            [*HUB_TOKENIZERS, "extra_text.0.template=plain", "extra_text.0.system_prompt=Be brief."],
            "extra_text.0.system_prompt='Be brief.' does nothing with extra_text.0.template='plain', which has "
            "no system turn (allowed: extra_text.0.template chat, lidit or lidit-chat, or an empty "
            "system_prompt)",
        ),
        (
            "debug",
            ["model.design=dit-cross", "text.template=lidit", "model.drop_instruction=false"],
            "model.drop_instruction=false is a refiner ablation: set model.refiner_depth >= 1",
        ),
        (
            "debug",
            ["model.design=dit-cross", "model.refiner_depth=1", "model.drop_instruction=false"],
            "model.drop_instruction=false keeps the instruction tokens for the DiT, but text.template='plain' "
            "with text.instruction='' gives none (allowed: a text.instruction, or text.template chat, lidit or "
            "lidit-chat)",
        ),
        (
            "debug-lidit",
            ["text.template=plain", "extra_text.0.template=plain", "model.drop_instruction=false"],
            "model.drop_instruction=false keeps the instruction tokens for the DiT, but text.template='plain' "
            "with text.instruction='' gives none, nor does any extra_text (allowed: a text.instruction, or "
            "text.template chat, lidit or lidit-chat)",
        ),
    ],
)
def test_settings_that_change_nothing_with_a_plain_template_are_refused(preset, overrides, message):
    """A plain template has no system turn, and without an instruction no instruction tokens to keep."""
    assert one_line_error(preset, overrides) == message
    # Where they take effect they are accepted: a template with a system turn, an instruction to keep, an
    # LLM whose template has one.
    load_config("debug", ["text.template=lidit", "text.system_prompt=Be brief."])
    # With the built-in tokenizer a system prompt's words enter its vocabulary: not a no-op.
    assert load_config("debug", ["text.system_prompt=Be brief."]).text.system_prompt == "Be brief."
    load_config("debug-lidit", ["extra_text.0.template=lidit", "extra_text.0.system_prompt=Be brief."])
    refined = ["model.design=dit-cross", "model.refiner_depth=1", "model.drop_instruction=false"]
    load_config("debug", [*refined, "text.instruction=Imagine: "])
    load_config("debug-lidit", ["text.template=plain", "model.drop_instruction=false"])


def test_a_saved_config_with_a_setting_that_changes_nothing_still_loads(tmp_path, caplog):
    """A run saved before these refusals came holds such settings: its folder still samples, resumes and
    serves as a base (they are left out: nothing changes), while a config being written is refused."""
    import yaml

    from fusedit.checkpoints import load_checkpoint_config
    from fusedit.config import to_dict

    data = to_dict(load_config("debug"))
    data["model"].update(refiner_causal=True, drop_instruction=False)
    data["text"].update(system_prompt="Be brief.", template="plain", tokenizer="google/gemma-2b")
    folder = tmp_path / "run" / "checkpoints" / "step_00000001"
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match="text.system_prompt='Be brief.' does nothing"):
        load_config(folder / "config.yaml")
    with caplog.at_level("INFO", logger="fusedit.config"):
        cfg = load_checkpoint_config(folder)
    assert (cfg.model.refiner_causal, cfg.model.drop_instruction, cfg.text.system_prompt) == (
        False,
        True,
        "",
    )
    assert (
        f"{folder}: leaving out text.system_prompt, model.refiner_causal, model.drop_instruction"
        in caplog.text
    )
    # A pipeline's record (sample, eval, diffusers' from_pretrained) is read the same way.
    from fusedit.config import saved_config

    assert saved_config(data, "a record").model.refiner_causal is False
    (tmp_path / "tune.yaml").write_text(f"base: {folder}\ntrain: {{steps: 3}}\n")
    assert load_config(tmp_path / "tune.yaml").model.refiner_causal is False
    # Set again on top of the base, it is refused as anywhere else.
    with pytest.raises(ConfigError, match="model.refiner_causal=true is a refiner ablation"):
        load_config(tmp_path / "tune.yaml", ["model.refiner_causal=true"])


def test_missing_file_and_unknown_preset(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="unknown preset 'nope'"):
        load_config("nope")
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(tmp_path / "a.yaml")


def test_random_llm_needs_an_arch():
    with pytest.raises(ConfigError, match="text.arch is empty"):
        config_from_dict({"text": {"family": "gemma"}})


def test_exponent_floats_without_a_dot_are_numbers(tmp_path):
    (tmp_path / "e.yaml").write_text("base: debug\ntrain:\n  lr: 1e-4\n")
    assert load_config(tmp_path / "e.yaml").train.lr == 1e-4
    assert load_config("debug", ["train.lr=2e-3"]).train.lr == 2e-3


def test_parse_overrides_types():
    assert parse_overrides(["a.b=1", "a.c=true", "a.d=x y", "a.e=null", "a.f=[1, 2]"]) == {
        "a": {"b": 1, "c": True, "d": "x y", "e": None, "f": [1, 2]}
    }


def test_string_keys_take_the_override_as_typed():
    """YAML would read these as a mapping, booleans and a comment; a string key keeps the text."""
    cfg = load_config(
        "debug",
        [
            "text.instruction=Imagine: ",
            "name=yes",
            "text.template=lidit",  # a template with a system prompt: plain has none and refuses one
            "text.system_prompt=no",
            "sample.negative_prompt=#blurry",
        ],
    )
    assert cfg.text.instruction == "Imagine: " and cfg.name == "yes" and cfg.text.system_prompt == "no"
    assert cfg.sample.negative_prompt == "#blurry"
    assert load_config("debug", ["train.steps=3", "data.caption_dropout=0.5"]).train.steps == 3


def test_relative_paths_that_exist_are_saved_absolute(tmp_path, monkeypatch):
    """A run's saved config must find its data and LLM from any working directory (fusedit sample)."""
    (tmp_path / "photos").mkdir()
    (tmp_path / "my-llm").mkdir()
    monkeypatch.chdir(tmp_path)
    cfg = load_config(
        "debug", ["data.source=folder", "data.root=photos", "text.model_id=my-llm", "vae.model_id=org/vae"]
    )
    assert cfg.data.root == str(tmp_path / "photos") and cfg.text.model_id == str(tmp_path / "my-llm")
    assert cfg.vae.model_id == "org/vae" and cfg.text.tokenizer == ""  # hub ids and empty keys stay
    # One folder, one spelling (a resume compares them): "..", "." and a trailing "/" are normalised away.
    for spelled in ("photos/../my-llm/", f"{tmp_path}/./my-llm/"):
        assert load_config("debug", [f"text.model_id={spelled}"]).text.model_id == str(tmp_path / "my-llm")


def test_every_preset_loads():
    for name in preset_names():
        load_config(name)


def test_a_yaml_syntax_error_names_its_line_and_column(tmp_path):
    (tmp_path / "broken.yaml").write_text("base: debug\ntrain:\n  batch_size: [1, 2\n  lr: 3\n")
    with pytest.raises(ConfigError) as e:
        load_config(tmp_path / "broken.yaml")
    assert str(e.value) == (
        f"cannot parse {tmp_path / 'broken.yaml'}: line 4, column 5: expected ',' or ']', but got ':' "
        "(while parsing a flow sequence started at line 3, column 15)"
    )
    (tmp_path / "tab.yaml").write_text("base: debug\n\ttrain: {}\n")
    with pytest.raises(ConfigError, match=r"tab.yaml: line 2, column 1: found character '\\t' that cannot"):
        load_config(tmp_path / "tab.yaml")


@pytest.mark.parametrize(
    "override, message",
    [
        (
            "train.batch_sise=3",
            "unknown config key 'train.batch_sise': did you mean 'train.batch_size'? (allowed: steps, batch_size,",
        ),
        ("trian.steps=3", "unknown config key 'trian': did you mean 'train'? (allowed: model, text,"),
        ("model.foo=1", "unknown config key 'model.foo' (allowed: design,"),
        (
            "stages.0.train.batchsize=3",
            "unknown config key 'stages.0.train.batchsize': did you mean 'stages.0.train.batch_size'?",
        ),
    ],
)
def test_an_unknown_key_suggests_a_close_one(override, message):
    assert message in one_line_error("recipe-shapes-3stage", [override])


def test_an_unknown_preset_suggests_the_yaml_file_of_that_name_or_a_close_preset(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "my-run.yaml").write_text("base: debug\n")
    with pytest.raises(
        ConfigError, match=r"^unknown preset 'my-run': did you mean my-run.yaml\? \(allowed: "
    ):
        load_config("my-run")
    with pytest.raises(ConfigError, match=r"^unknown preset 'debugg': did you mean 'debug'\? \(allowed: "):
        load_config("debugg")
    with pytest.raises(ConfigError, match=r"^unknown preset 'zzz' \(allowed: debug, "):
        load_config("zzz")


@pytest.mark.parametrize(
    "override, message",
    [
        ("data.shards=a.tar", "data.shards='a.tar' must be a list, e.g. data.shards=[a.tar]"),
        (
            "data.shards=data/{0000..0099}.tar",
            """data.shards='data/{0000..0099}.tar' must be a list, e.g. data.shards='["data/{0000..0099}.tar"]'""",
        ),
        ("train.trainable=dit", "train.trainable='dit' must be a list, e.g. train.trainable=[dit]"),
        (
            "stages.0.data.shards=a.tar",
            "stages.0.data.shards='a.tar' must be a list, e.g. stages.0.data.shards=[a.tar]",
        ),
    ],
)
def test_a_scalar_for_a_list_key_shows_the_list_syntax(override, message):
    assert message in one_line_error("recipe-shapes-3stage", [override])
    # What it shows is, as the shell passes it on, an override that loads.
    (example,) = shlex.split(message.split("e.g. ")[1])
    # (with the source that reads shards: the shapes world never would, and says so)
    source = [example.split("shards")[0] + "source=webdataset"] if "shards" in example else []
    load_config("recipe-shapes-3stage", [example, *source])


def test_relative_stage_paths_are_saved_absolute(tmp_path, monkeypatch):
    """Stage sections are override mappings, made absolute like the top-level sections: the saved staged
    config of a config file from another folder still finds the stage's data from anywhere."""
    (tmp_path / "configs").mkdir()
    (tmp_path / "photos").mkdir()
    (tmp_path / "index.jsonl").write_text("")
    (tmp_path / "configs" / "staged.yaml").write_text(
        "base: recipe-shapes-3stage\n"
        "stages:\n"
        "  - {name: a, steps: 2, data: {source: folder, root: photos, index_file: index.jsonl}}\n"
        "  - {name: b, steps: 2, data: {root: org/not-here, hf_path: ''}}\n"
    )
    monkeypatch.chdir(tmp_path)
    save_config(load_config("configs/staged.yaml"), tmp_path / "saved.yaml")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    cfg = load_config(tmp_path / "saved.yaml")
    assert cfg.stages[0].data == {
        "source": "folder",
        "root": str(tmp_path / "photos"),
        "index_file": str(tmp_path / "index.jsonl"),
    }
    assert cfg.stages[1].data == {"root": "org/not-here", "hf_path": ""}  # not a path here, or empty


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            ["data.image_size=1280"],
            "data.image_size=1280 makes a latent grid side of 80 patches, more than the APE table's "
            "model.ape_max_size=64 (allowed: sides up to 1024 px = model.ape_max_size x vae.downsample x "
            "model.patch_size)",
        ),
        (
            ["data.buckets=[[1024, 768], [768, 1280]]"],
            "data.buckets: [768, 1280] makes a latent grid side of 80 patches",
        ),
        (
            ["stages=[{steps: 2, data: {image_size: 1088}}]"],
            "stages.0 (unnamed): data.image_size=1088 makes",
        ),
    ],
)
def test_a_latent_grid_past_the_ape_table_is_refused_at_load(overrides, message):
    """model.ape_max_size fixes the APE table (fusedit-gemma2b: 64 patches, 1024 px): a larger image or
    bucket would otherwise fail only at training's first batch."""
    assert message in one_line_error("fusedit-gemma2b", overrides)
    load_config("fusedit-gemma2b", ["data.image_size=1024", "data.buckets=[[1024, 768]]"])
    load_config("fusedit-gemma2b", ["data.image_size=1280", "model.ape_max_size=null"])
    load_config("fusedit-gemma2b", ["data.image_size=1280", "model.pos_embed=2d-rope"])


def test_a_relative_init_from_that_exists_is_saved_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "base").mkdir(parents=True)
    cfg = load_config("debug", ["train.init_from=runs/base"])
    assert cfg.train.init_from == str(tmp_path / "runs" / "base")
    assert load_config("debug", ["train.init_from=runs/elsewhere"]).train.init_from == "runs/elsewhere"


@pytest.mark.parametrize(
    "override, items",
    [
        # YAML reads the braces inside the brackets as a mapping: the text arrives whole, brackets included.
        ("data.shards=[/tmp/wds/{00000..00001}.tar]", ["/tmp/wds/{00000..00001}.tar"]),
        ("data.shards=[a/{0..9}.tar, b/{x,y}.tar]", ["a/{0..9}.tar", "b/{x,y}.tar"]),
    ],
)
def test_a_list_yaml_cannot_read_is_shown_as_its_items(override, items):
    """The hint is the override of the items typed (brackets dropped, split at the commas outside
    braces), not the whole text as one item."""
    key = override.split("=")[0]
    message = one_line_error("recipe-shapes-3stage", [override, "data.source=webdataset"])
    assert message.endswith(f"must be a list, e.g. {key}={shlex.quote(json.dumps(items))}")
    (example,) = shlex.split(message.split("e.g. ")[1])
    assert parse_overrides([example])["data"][key.split(".")[1]] == items


@pytest.mark.parametrize("where", ["yaml", "override"])
def test_null_for_a_string_key_names_the_key_and_the_empty_string(tmp_path, where):
    """A YAML null and an override's null are refused alike (the override is not kept as the text
    'null'), saying what a string key takes for "none"."""
    if where == "yaml":
        (tmp_path / "n.yaml").write_text("base: debug\nvae:\n  subfolder: null\ndata:\n  hf_split: null\n")
        with pytest.raises(ConfigError) as e:
            load_config(tmp_path / "n.yaml")
        message = str(e.value)
    else:
        message = one_line_error("debug", ["vae.subfolder=null"])
    assert message == 'vae.subfolder=null is not allowed (allowed: a string, "" for none)'
    assert one_line_error("debug", ["data.hf_split=null"]) == (
        "data.hf_split=null is not allowed (allowed: a string, e.g. 'train', the default)"
    )
    assert load_config("debug", ["vae.subfolder="]).vae.subfolder == ""


@pytest.mark.parametrize(
    "overrides, message",
    [
        # Real data named while data.source is left at shapes: it would never be read.
        (
            ["data.root=/data/photos"],
            "data.root='/data/photos' is set but data.source='shapes' (the built-in procedural world) never "
            "reads it (allowed: data.source=folder to read it, or no data.root)",
        ),
        # The docs' folder example with shards or a dataset added: the folder would be read, not them.
        (
            ["data.source=folder", "data.root=/data/photos", 'data.shards=["a/{0..3}.tar"]'],
            "data.shards=['a/{0..3}.tar'] is set but data.source='folder' (it reads data.root / data.index_file) "
            "never reads it (allowed: data.source=webdataset to read it, or no data.shards)",
        ),
        (
            ["data.source=webdataset", 'data.shards=["a/{0..3}.tar"]', "data.hf_path=user/set"],
            "data.hf_path='user/set' is set but data.source='webdataset' (it reads data.shards) never reads it "
            "(allowed: data.source=hf to read it, or no data.hf_path)",
        ),
    ],
)
def test_a_data_location_its_source_never_reads_is_refused_where_data_is_read(tmp_path, overrides, message):
    from fusedit.data.latents import cache_latents
    from fusedit.data.loader import check_data_paths

    # It loads (a run saved with such a leftover must still be sampled, or resumed with it removed) ...
    cfg = load_config("debug", overrides)
    # ... but training (check_data_paths, before the model is built) and cache-latents refuse it.
    with pytest.raises(ConfigError) as e:
        check_data_paths(cfg.data, cfg.vae)
    assert str(e.value) == message
    with pytest.raises(ConfigError) as e:
        cache_latents(cfg.data, cfg.vae, tmp_path / "cache", 1, 1, progress=False)
    assert str(e.value) == message and not (tmp_path / "cache").exists()


def test_a_latent_cache_config_may_keep_where_its_images_were_read_from():
    from fusedit.config import check_data_locations

    # `fusedit cache-latents` says to train with the config that made the cache plus data.source=latents.
    cfg = load_config(
        "debug", ["data.root=/data/photos", "data.source=latents", "data.latents_dir=/data/cache"]
    )
    check_data_locations(cfg.data)


def test_a_stage_that_reads_another_source_does_not_inherit_the_earlier_location():
    from conftest import tiny_config
    from fusedit.config import check_data_locations, resolved_stages

    stages = [
        {"name": "folder", "steps": 1, "data": {"source": "folder", "root": "/data/photos"}},
        {"name": "shards", "steps": 1, "data": {"source": "webdataset", "shards": ["/data/{0..3}.tar"]}},
        {"name": "same", "steps": 1, "data": {"caption_dropout": 0.0}},
    ]
    resolved = resolved_stages(tiny_config(stages=stages))
    assert [(s.config.data.root, s.config.data.shards) for s in resolved] == [
        ("/data/photos", []),
        ("", ["/data/{0..3}.tar"]),
        ("", ["/data/{0..3}.tar"]),  # a stage keeping the source keeps its location
    ]
    for stage in resolved:
        check_data_locations(stage.config.data)
