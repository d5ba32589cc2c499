"""Design traits (fusedit.config.DESIGN_TRAITS): deep fusion or shallow, self- or cross-attention.

The table is the one place that says what each model.design is; the config checks and the public-code
converter ask it instead of matching design names. The behaviour tests at the end pin what those checks
and the converter do for each design (they hold with or without the table)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fusedit.config import ConfigError, ModelConfig, choices_of, load_config
from fusedit.convert.fusedit_official import official_config

DESIGNS = ("fusedit", "fusedit-cross", "dit-self", "dit-cross")
PUBLIC_CONFIG = json.loads(
    (Path(__file__).parent / "fixtures" / "fusedit-official-tiny" / "transformer" / "config.json").read_text()
)


# --- the table -------------------------------------------------------------------------------------------


def test_traits_cover_exactly_the_designs_the_config_allows():
    from fusedit.config import DESIGN_TRAITS
    from fusedit.models import DESIGNS as BUILDERS

    assert tuple(DESIGN_TRAITS) == choices_of(ModelConfig, "design") == DESIGNS
    assert set(BUILDERS) == set(DESIGN_TRAITS)  # every design with traits can be built


def test_traits_of_each_design():
    from fusedit.config import DESIGN_TRAITS, DesignTraits, attention_kind, design_traits, is_deep, is_shallow

    assert [d for d in DESIGNS if is_deep(d)] == ["fusedit", "fusedit-cross"]
    assert [d for d in DESIGNS if is_shallow(d)] == ["dit-self", "dit-cross"]
    assert [d for d in DESIGNS if attention_kind(d) == "self"] == ["fusedit", "dit-self"]
    assert [d for d in DESIGNS if attention_kind(d) == "cross"] == ["fusedit-cross", "dit-cross"]
    assert all(design_traits(d) is DESIGN_TRAITS[d] for d in DESIGNS)
    # Every (deep, attention) pair names exactly one design: the converter maps them back.
    assert len({(t.deep, t.attention) for t in DESIGN_TRAITS.values()}) == len(DESIGNS)
    with pytest.raises(AttributeError):  # frozen
        DESIGN_TRAITS["fusedit"].deep = False  # type: ignore[misc]
    assert DESIGN_TRAITS["fusedit"] == DesignTraits(deep=True, attention="self")


def test_the_model_classes_agree_with_the_traits():
    from fusedit.config import is_deep
    from fusedit.models import DESIGNS as BUILDERS
    from fusedit.models.fusedit import DeepFusionCrossDiT, DeepFusionDiT
    from fusedit.models.shallow import CrossAttentionDiT, ShallowDiT

    for design, cls in BUILDERS.items():
        assert issubclass(cls, DeepFusionDiT) == is_deep(design), design
        assert issubclass(cls, ShallowDiT) == (not is_deep(design)), design
    assert [d for d, c in BUILDERS.items() if issubclass(c, (DeepFusionCrossDiT, CrossAttentionDiT))] == [
        "fusedit-cross",
        "dit-cross",
    ]


@pytest.mark.parametrize("name", ["attention_kind", "design_traits", "is_deep", "is_shallow"])
def test_an_unknown_design_is_a_one_line_error(name):
    import fusedit.config

    with pytest.raises(ConfigError) as e:
        getattr(fusedit.config, name)("dit-fused")
    message = str(e.value)
    assert "\n" not in message
    assert "'dit-fused'" in message and "fusedit, fusedit-cross, dit-self, dit-cross" in message


# --- behaviour: what the checks and the converter do per design (no new names) -----------------------------


def _error(design: str, overrides: list[str]) -> str | None:
    """The one-line ConfigError of the debug preset with ``design`` and ``overrides``, or None."""
    try:
        load_config("debug", [f"model.design={design}", *overrides])
    except ConfigError as e:
        assert "\n" not in str(e)
        return str(e)
    return None


SHALLOW_ONLY = [
    ["model.refiner_depth=1"],
    ["model.num_heads=2", "model.head_dim=16"],
    ["model.pos_embed=2d-rope", "model.rope_layout=image-only"],
    ["train.trainable=[dit,refiner]"],
]


@pytest.mark.parametrize("design", DESIGNS)
def test_config_checks_per_design(design):
    shallow = design in ("dit-self", "dit-cross")
    assert _error(design, []) is None
    for overrides in SHALLOW_ONLY:
        error = _error(design, overrides)
        assert (error is None) == shallow, (overrides, error)
    error = _error(design, ["model.initial_layers=1", "model.num_layers=5"])
    assert (error is None) == (not shallow), error
    # The public code's left-padded joint rotations: deep fusion with joint self-attention only.
    error = _error(design, ["model.pos_embed=2d-rope", "model.rope_left_pad=16"])
    assert (error is None) == (design == "fusedit"), error


@pytest.mark.parametrize(
    "public, design",
    [
        ({}, "fusedit"),
        ({"attention": "cross"}, "fusedit-cross"),
        ({"model_type": "DiT"}, "dit-self"),
        ({"model_type": "DiT", "attention": "cross"}, "dit-cross"),
    ],
)
def test_public_attention_and_model_type_name_the_design(public, design):
    llm = "" if public.get("model_type") != "DiT" else "google/gemma-2b"  # a DiT's LLM is separate
    assert official_config({**PUBLIC_CONFIG, **public}, llm=llm).model.design == design


def test_public_attention_outside_self_and_cross_fails():
    with pytest.raises(ConfigError, match=r"attention='joint' is not supported \(allowed: self, cross\)"):
        official_config({**PUBLIC_CONFIG, "attention": "joint"})
