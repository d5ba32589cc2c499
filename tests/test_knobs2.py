"""Design knobs (h-knobs2): LI-DiT's pooled text modulation without a refiner, the warning for a setting the
user gave that changes nothing in the chosen design, and `fusedit describe`'s LI-DiT knobs."""

import logging
from pathlib import Path

import pytest
import torch
import yaml

from conftest import randomize, tiny_config
from fusedit.cli import main
from fusedit.config import ConfigError, load_config, preset_names
from fusedit.models.base import RefinedPooledText
from fusedit.models.shallow import ContextEmbedder
from fusedit.study.file import load_study
from fusedit.system import build_model

STUDIES = sorted((Path(__file__).parent.parent / "studies").glob("*.yaml"))


def warnings_of(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]


@pytest.mark.parametrize("design", ["dit-self", "dit-cross"])
def test_pooled_text_without_a_refiner_pools_the_embedded_tokens(design):
    model = build_model(tiny_config(model={"design": design, "refiner_depth": 0, "pooled_text": "refined"}))
    d = model.denoiser
    assert isinstance(d.context, ContextEmbedder) and isinstance(d.pooled, RefinedPooledText)
    randomize(d)
    text = model.encode_prompts(["a red circle", "two blue squares"])
    x, t = torch.randn(2, 3, 16, 16), torch.rand(2)
    seen = {}
    d.context.register_forward_hook(lambda m, args, out: seen.update(context=out[0], mask=out[1]))
    d.pooled.embed.register_forward_hook(lambda m, args, out: seen.update(pooled_in=args[0]))
    v = model(x, t, text)
    assert v.shape == (2, 3, 16, 16) and torch.isfinite(v).all()
    # What is pooled is the context embedder's tokens (no refiner between), masked-meaned: (B, d).
    keep = seen["mask"].unsqueeze(-1).to(seen["context"].dtype)
    mean = (seen["context"] * keep).sum(1) / keep.sum(1)
    torch.testing.assert_close(seen["pooled_in"], mean)
    # The pooled term is the embedded tokens' masked mean through the MLP; zeroing its last layer removes it.
    with torch.no_grad():
        d.pooled.embed[2].weight.zero_()
        d.pooled.embed[2].bias.zero_()
    assert not torch.allclose(v, model(x, t, text))


def test_pooled_text_refined_is_still_refused_by_a_deep_design():
    with pytest.raises(ConfigError) as e:
        tiny_config(model={"design": "fusedit", "pooled_text": "refined"})
    assert str(e.value) == (
        "model.pooled_text='refined' pools the text tokens a shallow design prepares (refined, or embedded "
        "without a refiner), but model.design='fusedit' prepares none (allowed: design dit-self or "
        "dit-cross, or model.pooled_text none or clip)"
    )


def test_no_preset_sets_a_setting_that_changes_nothing_in_its_own_design():
    """A preset's own YAML (what its author set, its base aside) holds no idle setting: the presets that
    inherit one (lidit-1b's ape_* with pos_embed none) inherit it, which stays silent."""
    from fusedit.config import idle_user_settings

    presets = Path(__file__).parent.parent / "src" / "fusedit" / "presets"
    for name in preset_names():
        own = yaml.safe_load((presets / f"{name}.yaml").read_text())
        own.pop("base", None)
        assert idle_user_settings(load_config(name), [own]) == [], name


def test_a_saved_config_read_as_a_file_is_not_the_users_settings(tmp_path, caplog):
    from fusedit.config import save_config

    saved = tmp_path / "config.yaml"
    save_config(load_config("fusedit-2d-rope"), saved)  # holds the ape_* it inherits with 2d-rope
    mine = tmp_path / "mine.yaml"
    mine.write_text(yaml.safe_dump({"base": "config.yaml", "model": {"refiner_heads": 2}}))
    with caplog.at_level(logging.WARNING, logger="fusedit.config"):
        load_config(saved)
        load_config(mine)
    assert warnings_of(caplog) == [
        "model.refiner_heads=2 changes nothing with model.refiner_depth=0 (no refiner)"
    ]


def test_no_study_rung_sets_a_setting_that_changes_nothing():
    """A rung's own overrides are what its author set (the study's base, shared by every rung, is its parent
    as a preset is): none may be idle in the rung's design."""
    from fusedit.config import idle_user_settings  # new here: the tests above run on the code before it

    for path in STUDIES:
        for design in load_study(path).designs:
            assert idle_user_settings(design.config, [design.overrides]) == [], (path.name, design.label)


def test_a_user_setting_that_changes_nothing_is_warned_once_an_inherited_one_is_not(tmp_path, caplog):
    # lidit-1b inherits ape_base_size / ape_max_size from its parent preset with pos_embed none: silent.
    with caplog.at_level(logging.WARNING, logger="fusedit.config"):
        load_config("lidit-1b")
    assert [m for m in warnings_of(caplog) if "changes nothing" in m] == []
    caplog.clear()
    mine = tmp_path / "mine.yaml"
    mine.write_text(
        yaml.safe_dump({"base": "debug-dit-self", "model": {"pos_embed": "ape", "rope_layout": "image-only"}})
    )
    with caplog.at_level(logging.WARNING, logger="fusedit.config"):
        # ape_base_size does something with ape: no warning of it.
        load_config(mine, ["model.refiner_heads=2", "pooled_text.max_length=20", "model.ape_base_size=8"])
    assert warnings_of(caplog) == [
        "model.refiner_heads=2 changes nothing with model.refiner_depth=0 (no refiner)",
        "model.rope_layout='image-only' changes nothing with model.pos_embed='ape', which rotates no tokens",
        "pooled_text.max_length=20 changes nothing with model.pooled_text='none', which reads no second "
        "encoder",
    ]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="fusedit.config"):
        load_config("debug-dit-cross", ["model.pos_embed=2d-rope", "model.rope_layout=image-only"])
    assert warnings_of(caplog) == [
        "model.rope_layout='image-only' changes nothing with model.design='dit-cross', whose "
        "cross-attention never rotates the text keys (its image attention sees relative positions only)"
    ]


def test_describe_names_the_lidit_knobs(capsys):
    assert main(["describe", "debug-lidit"]) == 0
    head = capsys.readouterr().out.splitlines()[0]
    assert head.startswith(
        "debug-lidit: design=dit-cross pos_embed=none timestep=adaln-zero dit_layers=6 width=128 conv_pos=true "
        "refiner_depth=2 llms=2 collaborative_refiner=true pooled_text=refined template=lidit; reads "
    )
    overrides = [
        "model.refiner_causal=true",
        "model.refiner_gating=false",
        "model.collaborative_refiner=false",
    ]
    assert main(["describe", "debug-lidit", *overrides, "text.instruction=Imagine:"]) == 0
    head = capsys.readouterr().out.splitlines()[0]
    assert (
        " conv_pos=true refiner_depth=2 refiner_causal=true refiner_gating=false llms=2 "
        "collaborative_refiner=false pooled_text=refined template=lidit instruction=text; reads " in head
    )
    assert main(["describe", "debug"]) == 0  # no LI-DiT knob set: the headline as before
    assert (
        capsys.readouterr()
        .out.splitlines()[0]
        .startswith("debug: design=fusedit pos_embed=ape timestep=adaln-zero dit_layers=6 width=128; reads ")
    )


def test_a_study_warns_of_a_designs_idle_override_not_of_its_base(caplog):
    study = {
        "name": "idle",
        "base": {"model": {"refiner_heads": 2}},  # shared by every design, like a parent preset: silent
        "designs": {
            "plain": {"preset": "debug-dit-self"},
            "rotated": {
                "preset": "debug-dit-self",
                "overrides": ["model.pos_embed=ape", "model.rope_layout=image-only"],
            },
        },
    }
    with caplog.at_level(logging.WARNING, logger="fusedit.study.file"):
        load_study(study)
    assert [m.split(": ", 1)[1] for m in warnings_of(caplog)] == [
        "designs.rotated: model.rope_layout='image-only' changes nothing with model.pos_embed='ape', which "
        "rotates no tokens"
    ]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="fusedit.study.file"):
        load_study(study, overrides=["pooled_text.max_length=20"])  # the command line's: every design
    assert sorted({m.split(": ", 2)[2] for m in warnings_of(caplog)}) == [
        "model.rope_layout='image-only' changes nothing with model.pos_embed='ape', which rotates no tokens",
        "pooled_text.max_length=20 changes nothing with model.pooled_text='none', which reads no second encoder",
    ]


def test_adaln_norm_is_warned_about_where_no_norm_is_modulated(caplog):
    from fusedit.config import idle_settings
    from fusedit.layers.modulation import TIMESTEP_CONDITIONING
    from fusedit.models import register_timestep_conditioning

    with caplog.at_level(logging.WARNING, logger="fusedit.config"):
        load_config("debug", ["model.timestep_conditioning=addition", "model.adaln_norm=rmsnorm"])
        load_config("debug", ["model.adaln_norm=rmsnorm"])  # adaln-zero modulates it: silent
        load_config("fusedit-addition")  # inherits fusedit-gemma2b's rmsnorm: silent
    assert warnings_of(caplog) == [
        "model.adaln_norm='rmsnorm' changes nothing with model.timestep_conditioning='addition', which "
        "modulates no norm"
    ]
    # A registered conditioning is taken to read adaln_norm unless it says otherwise.
    register_timestep_conditioning("reg-adaln", TIMESTEP_CONDITIONING["adaln-zero"], has_embedding=True)
    register_timestep_conditioning(
        "reg-plain", TIMESTEP_CONDITIONING["addition"], has_embedding=True, modulates_norm=False
    )
    keys = {
        name: [
            k
            for k, _ in idle_settings(
                tiny_config(model={"timestep_conditioning": name, "adaln_norm": "rmsnorm"})
            )
        ]
        for name in ("reg-adaln", "reg-plain")
    }
    assert keys == {"reg-adaln": [], "reg-plain": ["model.adaln_norm"]}


def test_a_study_design_whose_preset_is_the_users_file_is_warned_about(tmp_path, caplog):
    (tmp_path / "mine.yaml").write_text(
        yaml.safe_dump({"base": "debug-dit-self", "model": {"pos_embed": "ape", "rope_layout": "image-only"}})
    )
    study = tmp_path / "study.yaml"
    study.write_text(yaml.safe_dump({"name": "mine", "designs": {"a": {"preset": "mine.yaml"}}}))
    with caplog.at_level(logging.WARNING, logger="fusedit.study.file"):
        load_study(study)
    assert [m.split(": ", 1)[1] for m in warnings_of(caplog)] == [
        "designs.a: model.rope_layout='image-only' changes nothing with model.pos_embed='ape', which rotates no "
        "tokens"
    ]


def test_a_random_init_pooled_encoder_is_the_runs_whatever_the_global_generator():
    # Frozen and not saved with checkpoints, it is rebuilt at every resume and sampling load: drawn from the
    # global generator, each load held another CLIP than the one the run trained with.
    cfg = load_config("debug-clip-mod")
    torch.manual_seed(1)
    first = build_model(cfg).pooled_text.model.state_dict()
    torch.manual_seed(2)
    again = build_model(cfg).pooled_text.model.state_dict()
    assert first.keys() == again.keys() and all(torch.equal(first[k], again[k]) for k in first)
    other = build_model(load_config("debug-clip-mod", ["train.seed=1"])).pooled_text.model.state_dict()
    assert not all(torch.equal(first[k], other[k]) for k in first)  # the run's seed chooses it
