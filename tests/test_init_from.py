"""Fine-tuning from a trained model (train.init_from): which of its weights start the run (EMA or raw), the
model-defining settings it was trained with, an LLM pretraining it would overwrite; and a resumed run's
trainable parts and adapters, which a resume keeps."""

from __future__ import annotations

import logging

import pytest
import torch

from conftest import tiny_config
from fusedit.checkpoints import find_checkpoint, load_tensors
from fusedit.config import ConfigError, checked
from fusedit.pipeline import export_run
from fusedit.system import build_model
from fusedit.train.checkpoint import init_weights
from fusedit.train.loop import train
from fusedit.train.stages import idle_settings


def _warnings(caplog, text: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and text in r.getMessage()]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A 2-step run whose EMA (decay 0.9 every step) still holds 81% of its random init."""
    run = tmp_path_factory.mktemp("init") / "base"
    train(tiny_config(train={"steps": 2, "ema_decay": 0.9, "checkpoint_every": 2}), run, progress=False)
    return run


def _tuned(source, tmp_path, caplog, **overrides):
    """The warnings naming train.init_from of a 1-step fine-tune of ``source`` with ``overrides``."""
    sections = {k: v for k, v in overrides.items() if k != "train"}
    cfg = tiny_config(train={"steps": 1, "init_from": str(source), **overrides.get("train", {})}, **sections)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="fusedit"):
        train(cfg, tmp_path / "tuned", overwrite=True, progress=False)
    return _warnings(caplog, "train.init_from=")


def _initialised(source, **train_cfg) -> dict:
    """The denoiser state that init_weights loads from ``source`` into a tiny model."""
    cfg = checked(tiny_config(train={"init_from": str(source), **train_cfg}))
    model = build_model(cfg)
    init_weights(model, cfg.train.init_from, cfg)
    return model.denoiser.state_dict()


def test_init_from_an_early_ema_warns_and_init_from_ema_false_starts_from_the_raw_weights(
    base, tmp_path, caplog
):
    """init_from always took the source's EMA, even one that was still mostly its random init: a fine-tune
    then started from about a random model, without a word and without a way to take the raw weights."""
    assert _tuned(base, tmp_path, caplog) == [
        f"train.init_from={str(base)!r}: its EMA weights at step 2 still hold 81% of its run's random initial "
        "weights (train.ema_decay=0.9 every train.ema_every=1 steps), so this run starts from mostly those: "
        "train.init_from_ema=false starts it from the trained (raw) weights"
    ]
    assert _tuned(base, tmp_path, caplog, train={"init_from_ema": False}) == []
    ckpt = find_checkpoint(base)
    ema, raw = load_tensors(ckpt, "ema"), load_tensors(ckpt, "denoiser")
    assert not all(torch.equal(raw[k], ema[k]) for k in raw)
    loaded = _initialised(base)
    assert all(torch.equal(loaded[k], ema[k]) for k in ema)
    loaded = _initialised(base, init_from_ema=False)
    assert all(torch.equal(loaded[k], raw[k]) for k in raw)


def test_init_from_an_export_of_an_early_ema_warns_and_cannot_give_raw_weights(base, tmp_path, caplog):
    export_run(base, tmp_path / "export")
    made = f"the EMA weights of step 2 of {find_checkpoint(base).resolve()}"
    assert _tuned(tmp_path / "export", tmp_path, caplog) == [
        f"train.init_from={str(tmp_path / 'export')!r} holds {made}, which still held 81% of the weights its "
        "run started from, so this run starts from mostly those: train.init_from= that checkpoint with "
        "train.init_from_ema=false starts it from the trained (raw) weights"
    ]
    with pytest.raises(ConfigError) as e:
        _tuned(tmp_path / "export", tmp_path, caplog, train={"init_from_ema": False})
    assert str(e.value) == (
        f"train.init_from_ema=false asks for raw weights, but the pipeline folder {str(tmp_path / 'export')!r} "
        f"holds {made} (allowed: train.init_from= that checkpoint, or an export of it with --no-ema)"
    )


def test_init_from_a_run_trained_as_another_model_names_each_difference(base, tmp_path, caplog):
    """Weights trained under 2D RoPE loaded into an APE model (or read from another LLM layer) passed every
    shape check without a word; a change that does not change what the weights mean stays quiet."""
    other = tmp_path / "rope"
    train(tiny_config(model={"pos_embed": "2d-rope"}, text={"hidden_layer": -2}, train={"steps": 1}), other)
    assert [w for w in _tuned(other, tmp_path, caplog, text={"max_length": 24}) if "another model" in w] == [
        f"train.init_from={str(other)!r} was trained as another model than this run builds, and its weights "
        "start it all the same: model.pos_embed='2d-rope' (this run: 'ape'); text.hidden_layer=-2 (this run: -1)"
    ]
    quiet = {"max_length": 24, "attn_implementation": "eager"}
    assert [w for w in _tuned(base, tmp_path, caplog, text=quiet) if "another model" in w] == []


def test_init_from_of_another_shape_names_the_setting_that_differs(base, tmp_path, caplog):
    with pytest.raises(ConfigError) as e:
        _tuned(base, tmp_path, caplog, model={"dit_hidden_size": 64})
    assert str(e.value).endswith(
        "has shape [32, 12] in the checkpoint but [64, 12] in the configured model (it was trained with "
        "model.dit_hidden_size=32 (this run: 64))"
    )


def test_pretraining_an_llm_that_init_from_replaces_is_refused_at_start(base, tmp_path):
    """text.pretrain_steps pretrained the LLM, then init_from overwrote it with its own, and config.yaml
    said it was pretrained."""
    cfg = tiny_config(text={"pretrain_steps": 20}, train={"steps": 1, "init_from": str(base)})
    with pytest.raises(ConfigError) as e:
        train(cfg, tmp_path / "tuned", progress=False)
    assert str(e.value) == (
        f"text.pretrain_steps=20 pretrains an LLM that train.init_from={str(base)!r} replaces with the one it "
        "holds (allowed: text.pretrain_steps=0 with that init_from)"
    )
    assert not (tmp_path / "tuned").exists()


@pytest.mark.parametrize(
    ("change", "key", "old", "new"),
    [
        ({"dit_lora": {"rank": 4}}, "dit_lora.rank", 2, 4),
        ({"dit_lora": {"rank": 2, "alpha": 8}}, "dit_lora.alpha", None, 8.0),
        ({"dit_lora": {"rank": 2, "targets": ["q_proj"]}}, "dit_lora.targets", [], ["q_proj"]),
        ({"trainable": ["dit", "llm"], "dit_lora": {"rank": 2}}, "trainable", ["dit"], ["dit", "llm"]),
    ],
)
def test_a_resume_that_changes_the_adapters_is_refused_in_config_words(
    tmp_path, caplog, change, key, old, new
):
    """A resume with another adapter rank first warned it was resuming with the change, then failed in peft's
    key names; another alpha was accepted, rescaling the trained adapters at once."""
    run = tmp_path / "run"
    train(tiny_config(train={"steps": 2, "dit_lora": {"rank": 2}}), run, stop_at=1, progress=False)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="fusedit"), pytest.raises(ConfigError) as e:
        train(tiny_config(train={"steps": 2, **change}), run, resume=True, progress=False)
    assert str(e.value) == (
        f"checkpoint {str(find_checkpoint(run))!r} was trained with train.{key}={old!r}, this config has "
        f"{new!r}: a resumed run trains the same parts through the same LoRA adapters (allowed: {old!r}; "
        "change it in a later stage, or start a new --out from these weights with train.init_from)"
    )
    assert _warnings(caplog, "changed setting") == []


def test_a_run_without_stages_logs_what_it_trains_and_resumes_with_an_alpha_equal_to_the_rank(
    tmp_path, caplog
):
    """Only staged runs said what trains: a LoRA fine-tune's log could not be told from a full one's."""
    run = tmp_path / "run"
    with caplog.at_level(logging.INFO, logger="fusedit"):
        train(tiny_config(train={"steps": 2, "dit_lora": {"rank": 2}}), run, stop_at=1, progress=False)
    assert [r.getMessage() for r in caplog.records if "trains" in r.getMessage()] == [
        "the run trains DiT (LoRA rank 2)"
    ]
    lora = {"rank": 2, "alpha": 2}
    assert (
        train(tiny_config(train={"steps": 2, "dit_lora": lora}), run, resume=True, progress=False)["step"]
        == 2
    )


def test_lora_alpha_and_targets_without_a_rank_are_idle_settings():
    tc = tiny_config(train={"dit_lora": {"alpha": 8}, "llm_lora": {"targets": ["q_proj"]}}).train
    assert idle_settings(tc) == [
        "train.dit_lora.alpha=8.0 (rank 0: no adapters)",
        "train.llm_lora.targets=['q_proj'] (rank 0: no adapters)",
    ]


def test_init_from_ema_false_without_an_init_from_is_refused():
    with pytest.raises(ConfigError) as e:
        tiny_config(train={"init_from_ema": False})
    assert str(e.value) == (
        "train.init_from_ema=false chooses the raw weights of train.init_from, which is not set (allowed: a "
        "train.init_from, or train.init_from_ema=true)"
    )


def test_the_builtin_tokenizer_warning_of_a_fine_tune_does_not_advise_another_tokenizer(tmp_path, caplog):
    """A fine-tune was told to set text.tokenizer, which init_from's vocabulary check then refuses."""
    from fusedit.system import builtin_words

    def warned(**train_cfg):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="fusedit"):
            builtin_words(tiny_config(data={"source": "folder", "root": str(tmp_path)}, train=train_cfg))
        return _warnings(caplog, "built-in")

    assert warned(init_from=str(tmp_path)) == [
        "data.source=folder with the built-in shapes-world tokenizer: other words become <unk>; "
        "train.init_from's model knows only the words it was trained with: caption in those"
    ]
    assert warned() == [
        "data.source=folder with the built-in shapes-world tokenizer: other words become <unk>; set "
        "text.tokenizer (or text.model_id)"
    ]
