"""A study run again over its finished designs whose text.model_id names the user's own LLM: the run folder
saved that LLM's own family and arch (with_model_llm_fields), the design still carries its preset's, and
neither is a recipe change (with a model_id they only stand in for the model's config offline)."""

import pytest
import yaml
from transformers import AutoConfig

from conftest import TINY, TINY_ARCH
from fusedit.config import ConfigError, save_config, with_model_llm_fields
from fusedit.study.file import load_study
from fusedit.study.run import planned_statuses


def test_a_finished_design_with_a_model_id_is_not_refused_for_its_saved_family_and_arch(tmp_path):
    llm, other = tmp_path / "qwen", tmp_path / "other"
    # Shaped unlike the preset's Gemma arch: 4 layers instead of TINY_ARCH's 3.
    AutoConfig.for_model("qwen2", **{**TINY_ARCH, "num_hidden_layers": 4}).save_pretrained(llm)
    AutoConfig.for_model("qwen2", **TINY_ARCH).save_pretrained(other)
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(TINY))
    spec = {
        "name": "own-llm",
        "base": {"train.steps": 4},
        "designs": {"a": {"preset": str(tmp_path / "tiny.yaml"), "overrides": [f"text.model_id={llm}"]}},
        "eval": {"bench": "shapes", "per_category": 1, "steps": 2},
    }
    study, out = load_study(spec), tmp_path / "out"
    cfg = study.designs[0].config
    run = out / "runs" / "a"
    run.mkdir(parents=True)
    saved = with_model_llm_fields(cfg)
    assert (saved.text.family, saved.text.arch["num_hidden_layers"]) == ("qwen2", 4)
    # As a run saves it now, and as one saved before (the preset's family and arch) did.
    for config in (saved, cfg):
        save_config(config, run / "config.yaml")
        assert list(planned_statuses(study, out)) == ["a"]  # not refused
    # Another LLM is still another recipe.
    moved = with_model_llm_fields(cfg)
    moved.text.model_id = str(other)
    save_config(moved, run / "config.yaml")
    with pytest.raises(ConfigError, match=r"different config .*text\.model_id"):
        planned_statuses(study, out)
