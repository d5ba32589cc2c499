"""The config a run saves records its LLM's own family and arch (config.paths.with_model_llm_fields), not a
preset's that stayed beside a user's text.model_id; the command the run was started with, still carrying
the preset's, resumes and fine-tunes from it without a refusal or a reported change (with a model_id the
family and arch only stand in for the model's config offline)."""

import logging

from transformers import AutoConfig, AutoModelForCausalLM

from conftest import TINY_ARCH, tiny_config
from fusedit.config import load_config
from fusedit.data.shapes import vocabulary
from fusedit.text.tokenizer import word_tokenizer
from fusedit.train.checkpoint import find_checkpoint
from fusedit.train.loop import train


def test_a_run_saves_its_llms_own_family_and_resumes_with_the_presets(tmp_path, caplog):
    llm = tmp_path / "llm"
    AutoModelForCausalLM.from_config(AutoConfig.for_model("qwen2", **TINY_ARCH)).save_pretrained(llm)
    word_tokenizer(vocabulary()).save_pretrained(llm)
    # The family and arch a preset left beside the user's Qwen2 folder: another LLM's.
    preset = {"family": "gemma", "arch": {"num_attention_heads": 8, "hidden_size": 64}}

    def config(steps, **train_extra):
        return tiny_config(
            text={"model_id": str(llm), **preset},
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
