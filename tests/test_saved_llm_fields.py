"""The config a run saves records its LLM's own family and arch (config.paths.with_model_llm_fields), not a
preset's that stayed beside a user's text.model_id; the command the run was started with, still carrying
the preset's, resumes and fine-tunes from it without a refusal or a reported change (with a model_id the
family and arch only stand in for the model's config offline)."""

import logging

import pytest
from transformers import AutoConfig

from conftest import TINY_ARCH, tiny_config
from fusedit.bench import random_init_text
from fusedit.config import TextConfig, arch_config, load_config, model_family_arch, with_model_llm_fields
from fusedit.train.checkpoint import find_checkpoint
from fusedit.train.loop import train
from test_designs import _saved_llm


def test_a_run_saves_its_llms_own_family_and_resumes_with_the_presets(tmp_path, caplog):
    llm = _saved_llm(tmp_path / "llm", "qwen2")["model_id"]
    # The family and arch a preset left beside the user's Qwen2 folder: another LLM's.
    preset = {"family": "gemma", "arch": {"num_attention_heads": 8, "hidden_size": 64}}

    def config(steps, **train_extra):
        return tiny_config(
            text={"model_id": llm, **preset},
            model={"num_layers": 2},
            train={"steps": steps, "checkpoint_every": 1, **train_extra},
        )

    run = tmp_path / "run"
    train(config(1), run, progress=False)
    for saved in (run / "config.yaml", find_checkpoint(run) / "config.yaml"):
        text = load_config(saved).text
        assert text.family == "qwen2"
        assert text.arch["hidden_size"] == TINY_ARCH["hidden_size"]
        assert text.arch["num_attention_heads"] == TINY_ARCH["num_attention_heads"]
    with caplog.at_level(logging.WARNING):
        assert train(config(2), run, resume=True, progress=False)["step"] == 2
        # A fine-tune from the run, with the same command's preset fields: nothing model-defining changed.
        train(config(1, init_from=str(run)), tmp_path / "tuned", progress=False)
    said = " ".join(r.getMessage() for r in caplog.records)
    assert "text.family" not in said and "text.arch" not in said
    assert load_config(run / "config.yaml").text.family == "qwen2"


@pytest.mark.parametrize(
    "family, shape",
    [
        # Mistral-Nemo: head_dim 128 where MistralConfig's default is hidden / heads = 160.
        (
            "mistral",
            {"hidden_size": 5120, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128},
        ),
        # head_dim 128 where LlamaConfig's default is 3072 / 32 = 96; kv heads = heads, LlamaConfig's default.
        (
            "llama",
            {"hidden_size": 3072, "num_attention_heads": 32, "num_key_value_heads": 32, "head_dim": 128},
        ),
    ],
    ids=["mistral-nemo", "llama"],
)
def test_a_field_equal_to_a_computed_default_is_recorded_and_rebuilt(family, shape):
    config = AutoConfig.for_model(family, num_hidden_layers=2, intermediate_size=64, vocab_size=64, **shape)
    found, arch = model_family_arch(config)
    rebuilt = arch_config(TextConfig(family=found, arch=arch))
    assert found == family
    assert {k: getattr(rebuilt, k) for k in shape} == shape
    assert {k: v for k, v in rebuilt.to_dict().items() if k in arch} == arch


def test_a_model_type_no_family_allows_keeps_the_users_section(tmp_path):
    phi = tmp_path / "phi3"
    AutoConfig.for_model(
        "phi3",
        vocab_size=64,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
    ).save_pretrained(phi)
    user = TextConfig(model_id=str(phi), family="gemma", arch=dict(TINY_ARCH))
    cfg = tiny_config()
    cfg.text = user
    saved = with_model_llm_fields(cfg)
    assert saved.text == user  # not gemma with an empty arch: the default 28-layer Gemma
    assert random_init_text(saved.text, "text")[0].arch == TINY_ARCH


def test_an_odd_computed_head_dim_is_not_built_on_the_way_to_the_saved_arch(tmp_path):
    """A Llama that sets head_dim 128 where hidden 120 / 8 heads computes 15: the arch built from the fields
    that differ from the defaults alone had an odd RoPE width, which transformers refuses, and the run
    crashed at its first config save. The attention sizes are written as the model has them."""
    shape = {"hidden_size": 120, "num_attention_heads": 8, "head_dim": 128, "num_hidden_layers": 2}
    AutoConfig.for_model("llama", vocab_size=64, intermediate_size=64, **shape).save_pretrained(
        tmp_path / "l"
    )
    saved = with_model_llm_fields(load_config("debug", [f"text.model_id={tmp_path / 'l'}"]))
    built = arch_config(saved.text)
    assert saved.text.family == "llama" and {k: getattr(built, k) for k in shape} == shape
