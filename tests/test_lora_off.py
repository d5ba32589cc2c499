"""Turning LoRA adapters off in a later stage: ``llm_lora: null`` (the section's default, forgetting the
earlier alpha and targets) and ``llm_lora: {rank: 0}`` (without a warning about the alpha it inherits)."""

from __future__ import annotations

import pytest
import yaml

from fusedit.adapters import Parts
from fusedit.config import ConfigError, LoRAConfig, load_config, resolved_stages, save_config
from fusedit.train.stages import idle_settings

JOINT = {"trainable": ["dit", "llm"]}


def _staged(tmp_path, *later: dict, overrides: list[str] | None = None):
    """The debug config, staged: LoRA rank 4 alpha 8 on the LLM, then the ``later`` stages' train sections."""
    stages = [{"name": "lora", "steps": 2, "train": {**JOINT, "llm_lora": {"rank": 4, "alpha": 8}}}]
    stages += [{"name": f"s{i}", "steps": 2, "train": train} for i, train in enumerate(later, 1)]
    path = tmp_path / "staged.yaml"
    path.write_text(yaml.safe_dump({"base": "debug", "stages": stages}))
    return load_config(path, overrides)


@pytest.mark.parametrize("off", [None, {"rank": 0}], ids=["null", "rank0"])
def test_a_later_stage_turns_llm_lora_off_without_idle_warnings(tmp_path, off):
    cfg = _staged(tmp_path, {"llm_lora": off})
    lora, full = (stage.config.train for stage in resolved_stages(cfg))
    assert Parts.of(lora).llm_adapters == (4, 8.0, ("q_proj", "k_proj", "v_proj", "o_proj"), None)
    assert full.llm_lora == LoRAConfig()
    assert Parts.of(full).llm_adapters is None and Parts.of(full).describe() == "DiT, LLM (fully, all layers)"
    assert idle_settings(full) == []  # the inherited alpha=8 is no setting of this stage
    save_config(cfg, tmp_path / "saved.yaml")
    assert load_config(tmp_path / "saved.yaml") == cfg


def test_null_forgets_the_adapters_settings_and_rank_0_keeps_them_for_a_later_rank(tmp_path):
    # {rank: 0} then {rank: 2}: the earlier alpha comes back with the rank (as configs saved before meant);
    # null then {rank: 2}: the section starts from its defaults (alpha = rank).
    kept = _staged(tmp_path, {"llm_lora": {"rank": 0}}, {"llm_lora": {"rank": 2}})
    assert resolved_stages(kept)[2].config.train.llm_lora == LoRAConfig(rank=2, alpha=8)
    forgot = _staged(tmp_path, {"llm_lora": None}, {"llm_lora": {"rank": 2}})
    assert resolved_stages(forgot)[2].config.train.llm_lora == LoRAConfig(rank=2)


def test_a_stages_own_alpha_at_rank_0_is_still_idle(tmp_path):
    cfg = _staged(tmp_path, {"llm_lora": {"rank": 0, "alpha": 4}})
    assert idle_settings(resolved_stages(cfg)[1].config.train) == [
        "train.llm_lora.alpha=4.0 (rank 0: no adapters)"
    ]


def test_a_top_level_alpha_no_stage_gives_a_rank_is_still_idle_in_every_stage(tmp_path):
    # No stage trains with it: it does nothing in the whole run, so each stage warns of it. Once a stage
    # has trained with it, a later one at rank 0 does not.
    stages = [{"name": "a", "steps": 2, "train": {}}, {"name": "b", "steps": 2, "train": {}}]
    path = tmp_path / "top.yaml"
    path.write_text(
        yaml.safe_dump({"base": "debug", "train": {**JOINT, "llm_lora": {"alpha": 8}}, "stages": stages})
    )
    idle = ["train.llm_lora.alpha=8.0 (rank 0: no adapters)"]
    assert [idle_settings(s.config.train) for s in resolved_stages(load_config(path))] == [idle, idle]
    used = load_config(path, ["stages.0.train.llm_lora.rank=4"])
    assert [idle_settings(s.config.train) for s in resolved_stages(used)] == [[], []]


def test_null_on_the_command_line_and_at_the_top_level(tmp_path):
    cfg = _staged(tmp_path, {}, overrides=["stages.1.train.llm_lora=null"])
    assert resolved_stages(cfg)[1].config.train.llm_lora == LoRAConfig()
    assert (
        load_config("debug", ["train.dit_lora.rank=4", "train.dit_lora=null"]).train.dit_lora == LoRAConfig()
    )


def test_a_key_under_null_on_the_command_line_builds_on_the_default_or_is_refused(tmp_path):
    # null, then a rank: the section's defaults with that rank, the earlier stage's alpha forgotten.
    cfg = _staged(tmp_path, {}, overrides=["stages.1.train.llm_lora=null", "stages.1.train.llm_lora.rank=2"])
    assert resolved_stages(cfg)[1].config.train.llm_lora == LoRAConfig(rank=2)
    assert load_config(
        "debug", ["train.dit_lora=null", "train.dit_lora.rank=4"]
    ).train.dit_lora == LoRAConfig(rank=4)
    # A section that takes no null, or a value that holds no keys: one line naming both overrides.
    for first, then in (("flow=null", "flow.shift=2"), ("train.lr=0.1", "train.lr.x=1")):
        with pytest.raises(ConfigError) as e:
            load_config("debug", [first, then])
        assert str(e.value) == (
            f"override {then!r} sets a key inside {first.partition('=')[0]}, which the earlier override "
            f"{first!r} set to {yaml.safe_load(first.partition('=')[2])!r} (allowed: one of the two)"
        )


def test_other_null_values_are_still_refused(tmp_path):
    """Only a LoRA section itself takes null (its default): its rank, and another section, are refused."""
    with pytest.raises(ConfigError, match=r"^stages\.1\.train\.llm_lora\.rank=None"):
        _staged(tmp_path, {"llm_lora": {"rank": None}})
    with pytest.raises(ConfigError, match="flow must be a mapping, got None"):
        load_config("debug", ["flow=null"])
