"""Variants of your own: each registry's register function adds the implementation and the name its config
setting allows (fusedit.config.VARIANTS), with the traits the checks and the build ask instead of names; a
config's ``plugins`` imports the modules that register them, wherever it is loaded from (a run's saved
config included, so a fresh `fusedit sample` finds them); names already taken, modules that cannot be
found and names nobody registered are refused in one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import REGISTRIES, randomize
from fusedit.cli import main
from fusedit.config import (
    VARIANTS,
    ConfigError,
    ModelConfig,
    SampleConfig,
    choices_of,
    config_from_dict,
    load_config,
    to_dict,
)
from fusedit.flow import SAMPLERS, register_sampler
from fusedit.layers.modulation import TIMESTEP_CONDITIONING
from fusedit.layers.position import Rope1D
from fusedit.models import DESIGNS, register_design, register_position_scheme, register_timestep_conditioning
from fusedit.models.base import POOLED_TEXT
from fusedit.system import build_model

# A plugin as a user writes one: a midpoint sampler, a timestep conditioning that also adds the timestep
# to the image tokens, and a deep-fusion design of its own (here the built-in one under another class).
PLUGIN = """
from fusedit.flow import register_sampler
from fusedit.layers.modulation import AdaLNZero
from fusedit.models import register_design, register_timestep_conditioning
from fusedit.models.fusedit import DeepFusionDiT


def midpoint(velocity, x, times, progress=None):
    for i in range(len(times) - 1):
        t, t_next = times[i], times[i + 1]
        half = x + 0.5 * (t_next - t) * velocity(x, t.expand(x.shape[0]))
        x = x + (t_next - t) * velocity(half, ((t + t_next) / 2).expand(x.shape[0]))
        if progress is not None:
            progress()
    return x


class AdaLNZeroPlusAddition(AdaLNZero):
    def into_tokens(self, x, c):
        return x + c[:, None]


class MyFusion(DeepFusionDiT):
    pass


register_sampler("{prefix}-midpoint", midpoint, one_step=True)
register_timestep_conditioning("{prefix}-adaln-plus", AdaLNZeroPlusAddition, has_embedding=True)
register_design("{prefix}-fusion", MyFusion, deep=True, attention="self")
"""


def write_plugin(folder, module: str, prefix: str) -> None:
    (folder / f"{module}.py").write_text(PLUGIN.replace("{prefix}", prefix))


def test_every_registry_and_its_setting_allow_the_same_names():
    assert set(REGISTRIES) == set(VARIANTS)
    for key, registry in REGISTRIES.items():
        assert list(VARIANTS[key].traits) == list(registry), key
    register_sampler("reg-same", SAMPLERS["euler"], one_step=True)
    assert list(VARIANTS["sample.sampler"].traits) == list(SAMPLERS) == ["euler", "heun", "reg-same"]
    assert choices_of(SampleConfig, "sampler") == ("euler", "heun", "reg-same")
    from fusedit.models import register_pooled_text

    register_pooled_text("reg-same", POOLED_TEXT["refined"], encoder=False, refined=True)
    names = ["none", "refined", "clip", "reg-same"]
    assert list(VARIANTS["model.pooled_text"].traits) == list(POOLED_TEXT) == names
    assert choices_of(ModelConfig, "pooled_text") == tuple(names)


def test_a_plugin_named_by_the_config_registers_what_its_values_name(tmp_path, monkeypatch):
    """Adding a name to a registry was refused at load before (the config kept its own list); plugins is
    imported before the values after it are checked, in an override, a YAML file or a mapping alike (each
    its own module here, so that each path imports one)."""
    monkeypatch.syspath_prepend(str(tmp_path))
    for module in ("a", "b", "c"):
        write_plugin(tmp_path, f"registry_plugin_{module}", f"reg-{module}")
    names = ["sample.sampler=reg-a-midpoint", "model.timestep_conditioning=reg-a-adaln-plus"]
    cfg = load_config("debug", ["plugins=[registry_plugin_a]", "model.design=reg-a-fusion", *names])
    assert cfg.plugins == ["registry_plugin_a"] and cfg.model.design == "reg-a-fusion"
    (tmp_path / "mine.yaml").write_text(
        "base: debug\nmodel:\n  design: reg-b-fusion\nplugins: [registry_plugin_b]\n"
    )
    assert load_config(tmp_path / "mine.yaml").model.design == "reg-b-fusion"
    mapping = {**to_dict(load_config("debug")), "plugins": ["registry_plugin_c"]}
    mapping["sample"]["sampler"] = "reg-c-midpoint"
    assert config_from_dict(mapping).sample.sampler == "reg-c-midpoint"
    model = build_model(cfg)
    assert type(model.denoiser).__name__ == "MyFusion"
    assert type(model.denoiser.time).__name__ == "AdaLNZeroPlusAddition"


def test_training_with_a_plugin_then_sampling_in_a_fresh_process_imports_it_again(
    tmp_path, monkeypatch, capsys
):
    """The run's saved config lists the plugin: `fusedit sample RUN` in a new interpreter (which has imported
    nothing) needs no flag, only the module importable; without it, one line naming it."""
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    monkeypatch.syspath_prepend(str(plugins))
    write_plugin(plugins, "registry_plugin_cli", "reg-cli")
    run = tmp_path / "run"
    overrides = [
        "plugins=[registry_plugin_cli]",
        "model.design=reg-cli-fusion",
        "model.timestep_conditioning=reg-cli-adaln-plus",
        "sample.sampler=reg-cli-midpoint",
        "sample.steps=2",
        "train.steps=2",
        "train.batch_size=2",
        "train.checkpoint_every=2",
    ]
    assert main(["train", "debug", *overrides, "--out", str(run), "--quiet"]) == 0
    assert "plugins:\n- registry_plugin_cli\n" in (run / "config.yaml").read_text()
    # An exported pipeline keeps the plugins too: its config names the plugin's variants.
    from fusedit.pipeline import export_run, from_pretrained

    export_run(run, tmp_path / "pipe")
    model, cfg = from_pretrained(tmp_path / "pipe")
    assert cfg.plugins == ["registry_plugin_cli"] and type(model.denoiser).__name__ == "MyFusion"
    capsys.readouterr()  # the export's and load's progress bars

    def fusedit_sample(out, pythonpath):
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(pythonpath)}
        argv = [
            "sample",
            str(run),
            "--out",
            str(out),
            "--prompt",
            "a red circle",
            "--sampler",  # a flag may name the plugin's variant too: checked once the run's plugins load
            "reg-cli-midpoint",
            "--device",
            "cpu",
            "--quiet",
        ]
        return subprocess.run(
            [sys.executable, "-m", "fusedit", *argv],
            capture_output=True,
            text=True,
            env=env,
            cwd=tmp_path,
            timeout=600,
        )

    source = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    done = fusedit_sample(tmp_path / "samples", [str(plugins), *source])
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads((tmp_path / "samples" / "00000.json").read_text())["sampler"] == "reg-cli-midpoint"
    bad = ["sample", str(run), "--out", str(tmp_path / "bad"), "--prompt", "a", "--sampler", "nope"]
    assert main(bad) == 2  # in this process, the plugin importable: the list names its sampler
    assert capsys.readouterr().err.strip() == (
        "fusedit: error: --sampler 'nope' is not allowed (allowed: euler, heun, reg-cli-midpoint)"
    )
    missing = fusedit_sample(tmp_path / "none", source)
    assert missing.returncode != 0
    assert (
        "plugins: cannot import plugin module 'registry_plugin_cli' (allowed: a module importable here: "
        "install it or put its folder on PYTHONPATH, or remove it from plugins)"
    ) in missing.stderr


def denoiser_output(pos_embed: str, layout: str) -> torch.Tensor:
    cfg = load_config("debug-dit-self", [f"model.pos_embed={pos_embed}", f"model.rope_layout={layout}"])
    torch.manual_seed(0)
    model = build_model(cfg)
    randomize(model.denoiser)  # the output projection starts at 0
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 32, 32, generator=generator)
    with torch.no_grad():
        return model.denoiser(x, torch.tensor([0.3, 0.8]), model.encode_prompts(["a red circle", "a square"]))


def test_a_registered_rotary_scheme_honours_the_rope_layout_by_its_traits():
    """The build asked the name (`in ROTARY_SCHEMES`), so a copy of 1d-rope under another name ignored
    rope_layout=image-only silently; its traits say it rotates."""
    register_position_scheme("reg-1d-rope", Rope1D, rotates=True, head_dim_multiple=2)
    mine = denoiser_output("reg-1d-rope", "image-only")
    assert not torch.equal(mine, denoiser_output("reg-1d-rope", "joint"))
    assert torch.equal(mine, denoiser_output("1d-rope", "image-only"))


def test_the_config_checks_ask_a_registered_variants_traits():
    """Head-width rules, the timestep embedding pooled text needs, and the allowed lists of the messages
    come from the traits of every registered variant, not from lists of built-in names."""
    register_position_scheme(
        "reg-3-rope", Rope1D, rotates=True, head_dim_multiple=3, fit_reason="rotated channel triples"
    )
    with pytest.raises(ConfigError) as e:
        load_config("debug-dit-self", ["model.pos_embed=reg-3-rope"])
    assert str(e.value) == (
        "model.pos_embed='reg-3-rope' needs a head width divisible by 3 (rotated channel triples), but the "
        "DiT's heads are 32 wide (the LLM's head_dim) (allowed: a head width divisible by 3, or model.pos_embed "
        "ape, 1d-rope, 2d-rope or m-rope)"
    )
    register_timestep_conditioning("reg-none", TIMESTEP_CONDITIONING["none"], has_embedding=False)
    with pytest.raises(ConfigError) as e:
        load_config("debug-lidit", ["model.timestep_conditioning=reg-none"])
    assert str(e.value) == (
        "model.pooled_text='refined' is added to the timestep embedding, but "
        "model.timestep_conditioning='reg-none' has none (allowed: adaln-zero, adaln-single or addition)"
    )
    register_design("reg-shallow", DESIGNS["dit-cross"], deep=False, attention="cross")
    with pytest.raises(ConfigError, match=r"needs a shallow design \(dit-self, dit-cross or reg-shallow\)$"):
        load_config("debug", ["model.refiner_depth=1"])


def test_the_pipeline_refuses_a_sampler_that_is_not_one_step():
    """The pipeline runs a sampler one scheduler step at a time: a multistep one (here Adams-Bashforth 2,
    which reuses the previous velocity) silently sampled as Euler."""
    from conftest import tiny_config
    from fusedit.pipeline import FuseDiTPipeline

    def ab2(velocity, x, times, progress=None):
        previous = None
        for i in range(len(times) - 1):
            v = velocity(x, times[i].expand(x.shape[0]))
            x = x + (times[i + 1] - times[i]) * (v if previous is None else 1.5 * v - 0.5 * previous)
            previous = v
        return x

    register_sampler("reg-ab2", ab2, one_step=False)
    cfg = tiny_config(sample={"sampler": "reg-ab2"})
    pipe = FuseDiTPipeline.from_model(build_model(cfg), cfg)
    pipe.set_progress_bar_config(disable=True)
    with pytest.raises(ValueError) as e:
        pipe("a red circle", num_inference_steps=2)
    assert str(e.value) == (
        "sample.sampler='reg-ab2' was registered with one_step=False, but this pipeline runs one scheduler "
        "step at a time (allowed: euler or heun; or `fusedit sample` with this one)"
    )


def test_a_name_already_taken_is_refused_and_replaces_nothing():
    with pytest.raises(ValueError) as e:
        register_sampler("euler", SAMPLERS["heun"], one_step=True)
    assert str(e.value) == (
        "sample.sampler='euler' is already registered (allowed: a name not yet taken, i.e. none of euler, heun)"
    )
    assert SAMPLERS["euler"].__name__ == "euler"
    with pytest.raises(ValueError, match=r"^model.design='fusedit' is already registered \(allowed: a name"):
        register_design("fusedit", DESIGNS["dit-self"], deep=False, attention="self")
    assert DESIGNS["fusedit"].__name__ == "DeepFusionDiT" and VARIANTS["model.design"].traits["fusedit"].deep
    with pytest.raises(ValueError, match=r"^attention='joint' is not allowed \(allowed: self, cross\)$"):
        register_design("reg-joint", DESIGNS["fusedit"], deep=True, attention="joint")
    assert "reg-joint" not in DESIGNS and "reg-joint" not in VARIANTS["model.design"].traits


def test_a_missing_plugin_and_an_unknown_name_are_one_line_that_says_what_to_do():
    with pytest.raises(ConfigError) as e:
        load_config("debug", ["plugins=[registry_plugin_nowhere]", "sample.sampler=reg-midpoint"])
    assert str(e.value) == (
        "plugins: cannot import plugin module 'registry_plugin_nowhere' (allowed: a module importable here: "
        "install it or put its folder on PYTHONPATH, or remove it from plugins)"
    )
    with pytest.raises(ConfigError) as e:
        load_config("debug", ["sample.sampler=reg-midpoint"])
    assert str(e.value) == (
        "sample.sampler='reg-midpoint' is not allowed (allowed: euler, heun); to add one, register it with "
        "fusedit.flow.register_sampler in a module the config's plugins lists"
    )


def test_the_pipeline_samples_a_registered_schedule_as_generate_does():
    """The pipeline spaced every schedule but "diffusers" uniformly: a registered one gave other images than
    `fusedit sample`, with no error."""
    from conftest import tiny_config
    from fusedit.flow import register_schedule, sampling_times
    from fusedit.pipeline import FuseDiTPipeline
    from fusedit.sampling.generation import generate

    register_schedule(
        "reg-squared", lambda steps, shift: torch.linspace(1, 0, steps + 1, dtype=torch.float64) ** 2
    )
    settings = {"steps": 3, "guidance": 3.0, "shift": 3.0}
    cfg = tiny_config(sample={**settings, "schedule": "reg-squared"})
    model = build_model(cfg)
    randomize(model.denoiser)
    pipe = FuseDiTPipeline.from_model(model, cfg)
    pipe.set_progress_bar_config(disable=True)
    prompts = ["a red circle", "a blue square"]
    latents = pipe(
        prompts,
        negative_prompt="a yellow square",
        output_type="latent",
        generator=torch.Generator().manual_seed(7),
    ).images
    assert torch.equal(pipe.scheduler.sigmas, sampling_times(3, 3.0, schedule="reg-squared"))

    def generated(schedule):
        return generate(
            model,
            prompts,
            image_size=16,
            seed=7,
            negative_prompt="a yellow square",
            schedule=schedule,
            **settings,
        )

    assert torch.equal(latents.clamp(-1, 1), generated("reg-squared"))
    assert not torch.equal(latents.clamp(-1, 1), generated("uniform"))


def test_the_checks_ask_a_registered_templates_traits():
    """A template that adds no tokens of its own makes drop_instruction=false a no-op, and one that does is
    listed among those a refusal allows: its traits, not its name, say so."""
    from fusedit.text.templates import TEMPLATES, register_template

    register_template("reg-plain", TEMPLATES["plain"], system_turn=False, adds_tokens=False)
    register_template("reg-chat", TEMPLATES["chat"], system_turn=True, adds_tokens=True)

    def refiner_keeping_instructions(template):
        overrides = [f"text.template={template}", f"extra_text.0.template={template}"]
        return load_config("debug-lidit", [*overrides, "model.drop_instruction=false"])

    with pytest.raises(ConfigError) as e:
        refiner_keeping_instructions("reg-plain")
    assert str(e.value) == (
        "model.drop_instruction=false keeps the instruction tokens for the DiT, but text.template='reg-plain' "
        "with text.instruction='' gives none, nor does any extra_text (allowed: a text.instruction, or "
        "text.template chat, lidit, lidit-chat or reg-chat)"
    )
    assert refiner_keeping_instructions("reg-chat").text.template == "reg-chat"


def test_a_child_config_adds_its_plugins_to_its_bases(tmp_path, monkeypatch):
    """plugins merged as any list, replaced: a child with a plugin of its own lost its base's, and the base's
    values naming that plugin's variants were refused (with a hint to list the plugin, which it did)."""
    monkeypatch.syspath_prepend(str(tmp_path))
    for module in ("a", "b", "c"):
        write_plugin(tmp_path, f"registry_plugin_m{module}", f"reg-m{module}")
    (tmp_path / "base.yaml").write_text(
        "base: debug\nplugins: [registry_plugin_ma]\nsample:\n  sampler: reg-ma-midpoint\n"
    )
    (tmp_path / "child.yaml").write_text(
        "base: base.yaml\nplugins: [registry_plugin_mb]\nmodel:\n  design: reg-mb-fusion\n"
    )
    cfg = load_config(tmp_path / "child.yaml")
    assert cfg.plugins == ["registry_plugin_ma", "registry_plugin_mb"]
    assert (cfg.sample.sampler, cfg.model.design) == ("reg-ma-midpoint", "reg-mb-fusion")
    # An override adds too, each module once: a plugin listed below cannot be removed by a child.
    more = ["plugins=[registry_plugin_mc, registry_plugin_ma]", "sample.sampler=reg-mc-midpoint"]
    cfg = load_config(tmp_path / "child.yaml", more)
    assert cfg.plugins == ["registry_plugin_ma", "registry_plugin_mb", "registry_plugin_mc"]


@pytest.mark.parametrize(
    "name", ["", ".registry_plugin_rel", "registry_plugin_file.py", "plugins/registry_plugin_x"]
)
def test_a_plugins_item_that_is_no_module_name_is_one_line_before_any_import(tmp_path, monkeypatch, name):
    """An empty or relative name failed inside importlib (a bare "Empty module name", a TypeError traceback);
    a file name ran the module, then was refused as not importable. None is imported before the check."""
    monkeypatch.syspath_prepend(str(tmp_path))
    write_plugin(tmp_path, "registry_plugin_file", "reg-file")
    write_plugin(tmp_path, "registry_plugin_first", "reg-first")
    with pytest.raises(ConfigError) as e:
        load_config("debug", [f"plugins={json.dumps(['registry_plugin_first', name])}"])
    assert str(e.value) == (
        f"plugins={['registry_plugin_first', name]!r}: {name!r} is not allowed (allowed: importable module "
        "names, e.g. my_variants, not file paths)"
    )
    assert "reg-first-midpoint" not in SAMPLERS and "reg-file-midpoint" not in SAMPLERS


def test_export_official_refuses_a_registered_design_or_timestep_conditioning(tmp_path):
    """A registered design was written as the public FuseDiT (its code is not the public code's, whatever
    its traits) and a registered timestep conditioning failed with a bare KeyError."""
    import dataclasses

    from fusedit.convert.fusedit_official import build, export_official, official_config
    from test_convert import TINY_PUBLIC

    register_design("reg-ex-fusion", DESIGNS["fusedit"], deep=True, attention="self")
    register_timestep_conditioning("reg-ex-adaln", TIMESTEP_CONDITIONING["adaln-zero"], has_embedding=True)
    cfg = official_config(TINY_PUBLIC)
    for key, name, allowed in (
        ("design", "reg-ex-fusion", "fusedit, fusedit-cross, dit-self, dit-cross"),
        ("timestep_conditioning", "reg-ex-adaln", "none, adaln-zero, adaln-single, addition"),
    ):
        mine = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, **{key: name}))
        with pytest.raises(ConfigError) as e:
            export_official(mine, build(mine), tmp_path / "x")
        assert str(e.value) == (
            f"model.{key}={name!r} has no counterpart in the public FuseDiT code (allowed: {allowed})"
        )
        assert not (tmp_path / "x").exists()


def test_a_sampler_flag_on_a_folder_without_a_model_reports_the_folder(tmp_path, capsys):
    """With no saved config to import plugins from, the flag was checked against the built-ins and blamed;
    the folder is the problem (generate still refuses a name nobody registered)."""
    nowhere = tmp_path / "nowhere"
    argv = [
        "sample",
        str(nowhere),
        "--out",
        str(tmp_path / "out"),
        "--prompt",
        "a",
        "--sampler",
        "reg-midpoint",
    ]
    assert main(argv) == 2
    assert capsys.readouterr().err.strip() == (
        f"fusedit: error: no such folder: {str(nowhere)!r} (expected a run, checkpoint or diffusers pipeline "
        "folder)"
    )


def test_register_variant_refuses_traits_the_checks_cannot_read():
    """register_variant("model.design", "x") allowed x with no traits: the next check failed on None.traits
    (or the build on a registry never filled). It is for the registries' register functions, not public."""
    import fusedit.config
    from fusedit.config import DesignTraits, SamplerTraits, register_variant

    for setting, traits, allowed in (
        ("model.design", None, "a DesignTraits"),
        ("sample.sampler", DesignTraits(deep=True, attention="self"), "a SamplerTraits"),
        ("sample.schedule", SamplerTraits(one_step=True), "None: no code asks this setting's traits"),
    ):
        with pytest.raises(ValueError) as e:
            register_variant(setting, "reg-bare", traits)
        assert str(e.value) == f"{setting}='reg-bare' traits={traits!r} are not allowed (allowed: {allowed})"
        assert "reg-bare" not in VARIANTS[setting].traits
    assert "register_variant" not in fusedit.config.__all__


# A pooled-text modulation as a user writes one: LI-DiT's pooled refined text behind a learned scalar gate.
POOLED_PLUGIN = """
import torch
from torch import nn

from fusedit.layers.pool import masked_mean
from fusedit.models import register_pooled_text


class GatedRefinedPooledText(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.embed = nn.Sequential(nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.gate = nn.Parameter(torch.tensor(0.5))

    def forward(self, temb, text, state):
        return temb + self.gate * self.embed(masked_mean(state.context, state.mask))


register_pooled_text(
    "reg-gated", lambda pooled_dim, dim, eps: GatedRefinedPooledText(dim), encoder=False, refined=True
)
"""


def test_a_registered_pooled_text_without_an_encoder_trains_and_modulates_the_dit(tmp_path, monkeypatch):
    """model.pooled_text was a closed list (none, refined, clip): a pooled-text modulation of one's own could
    not be named. A plugin's gated copy of LI-DiT's pooled refined text trains, is saved and loads back, and
    its term reaches the output: with the gate at 0 it is exactly none."""
    from fusedit.checkpoints import load_model
    from fusedit.models.base import NoPooledText
    from fusedit.train.loop import train

    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "registry_plugin_pooled.py").write_text(POOLED_PLUGIN)
    settings = ["train.steps=2", "train.batch_size=2", "train.checkpoint_every=2"]
    cfg = load_config(
        "debug-lidit", ["plugins=[registry_plugin_pooled]", "model.pooled_text=reg-gated", *settings]
    )
    result = train(cfg, tmp_path / "run", progress=False)
    assert len(result["losses"]) == 2 and all(torch.isfinite(torch.tensor(result["losses"])))
    model, saved, _ = load_model(tmp_path / "run")
    assert saved.model.pooled_text == "reg-gated"
    assert type(model.denoiser.pooled).__name__ == "GatedRefinedPooledText"
    randomize(model.denoiser)  # the adaLN modulation starts at 0: the timestep embedding would reach nothing
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    t, text = torch.tensor([0.3, 0.8]), model.encode_prompts(["a red circle", "a square"])

    def output():
        with torch.no_grad():
            return model.denoiser(x, t, text)

    mine = output()
    with torch.no_grad():
        model.denoiser.pooled.gate.zero_()
    closed = output()
    model.denoiser.pooled = NoPooledText()
    assert torch.equal(closed, output()) and not torch.allclose(mine, closed)


def test_a_registered_pooled_text_with_an_encoder_builds_it_as_clip_does():
    """The build loaded the second encoder for the name "clip" only: a copy of clip-mod under another name
    got no pooled embedding (text.pooled None). Its ``encoder`` trait loads it, the pipeline hands it back,
    and the copy computes exactly what clip does."""
    from conftest import TINY_CLIP_ARCH, tiny_config
    from fusedit.config import pooled_tokenizes_builtin
    from fusedit.models import register_pooled_text
    from fusedit.models.base import ClipPooledText
    from fusedit.pipeline import FuseDiTPipeline
    from fusedit.text.pooled import PooledTextEncoder

    register_pooled_text("reg-clip", ClipPooledText, encoder=True)

    def built(name):
        cfg = tiny_config(model={"pooled_text": name}, pooled_text={"arch": TINY_CLIP_ARCH, "max_length": 16})
        torch.manual_seed(0)
        model = build_model(cfg)
        randomize(model.denoiser)
        x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            text = model.encode_prompts(["a red circle", "a blue square"])
            return model, cfg, model.denoiser(x, torch.tensor([0.3, 0.8]), text)

    model, cfg, mine = built("reg-clip")
    assert isinstance(model.pooled_text, PooledTextEncoder) and type(model.denoiser.pooled) is ClipPooledText
    assert pooled_tokenizes_builtin(cfg)
    assert torch.equal(mine, built("clip")[2])
    back, _ = FuseDiTPipeline.from_model(model, cfg).to_fusedit()
    assert back.pooled_text is not None and back.pooled_text.model is model.pooled_text.model


def test_the_pooled_text_checks_ask_a_registered_variants_traits():
    """The checks named "clip" and "refined": a registered variant that reads the second encoder, or the
    refined text, was let through without it, to fail in the build or the first forward."""
    from fusedit.models import register_pooled_text
    from fusedit.models.base import ClipPooledText

    register_pooled_text("reg-clip", ClipPooledText, encoder=True)
    register_pooled_text("reg-refined", POOLED_TEXT["refined"], encoder=False, refined=True)
    with pytest.raises(ConfigError) as e:
        load_config("debug", ["model.pooled_text=reg-clip"])
    assert str(e.value) == (
        "model.pooled_text='reg-clip' needs pooled_text.model_id (or a random-init pooled_text.arch)"
    )
    with pytest.raises(ConfigError) as e:
        load_config("debug", ["model.pooled_text=reg-refined"])
    assert str(e.value) == (
        "model.pooled_text='reg-refined' pools the text tokens a shallow design prepares (refined, or embedded "
        "without a refiner), but model.design='fusedit' prepares none (allowed: design dit-self or dit-cross, or "
        "model.pooled_text none, clip or reg-clip)"
    )
    with pytest.raises(ConfigError) as e:
        load_config("debug-clip-mod", ["model.pooled_text=reg-clip", "model.timestep_conditioning=none"])
    assert str(e.value) == (
        "model.pooled_text='reg-clip' is added to the timestep embedding, but "
        "model.timestep_conditioning='none' has none (allowed: adaln-zero, adaln-single or addition)"
    )
    assert load_config("debug-clip-mod", ["model.pooled_text=reg-clip"]).model.pooled_text == "reg-clip"


def test_a_pooled_text_name_taken_or_unknown_and_traits_not_bools_are_one_line():
    from fusedit.models import register_pooled_text
    from fusedit.models.base import ClipPooledText

    with pytest.raises(ValueError) as e:
        register_pooled_text("clip", POOLED_TEXT["refined"], encoder=False, refined=True)
    assert str(e.value) == (
        "model.pooled_text='clip' is already registered (allowed: a name not yet taken, i.e. none of none, "
        "refined, clip)"
    )
    assert POOLED_TEXT["clip"] is ClipPooledText and VARIANTS["model.pooled_text"].traits["clip"].encoder
    with pytest.raises(ValueError, match=r"^encoder='yes' is not allowed \(allowed: True, False\)$"):
        register_pooled_text("reg-yes", ClipPooledText, encoder="yes")
    assert "reg-yes" not in POOLED_TEXT and "reg-yes" not in VARIANTS["model.pooled_text"].traits
    with pytest.raises(ConfigError) as e:
        load_config("debug", ["model.pooled_text=reg-nope"])
    assert str(e.value) == (
        "model.pooled_text='reg-nope' is not allowed (allowed: none, refined, clip); to add one, register it "
        "with fusedit.models.register_pooled_text in a module the config's plugins lists"
    )
