"""LoRA adapters through peft (fusedit.adapters): on a tiny LLM (joint fine-tuning) and on a trained model's
DiT (fine-tuning from train.init_from); saved apart from the plain weights, resumed, merged for sampling
and export."""

from __future__ import annotations

import sys

import pytest
import torch

from conftest import tiny_config
from fusedit import adapters as lora
from fusedit.adapters import Parts
from fusedit.checkpoints import find_checkpoint, load_model, load_tensors
from fusedit.config import ConfigError
from fusedit.pipeline import export_run, from_pretrained
from fusedit.system import build_model
from fusedit.train.loop import train
from fusedit.train.stages import apply_parts

pytest.importorskip("peft")

PROMPTS = ["a red circle", "a blue square to the left of a green triangle", ""]


def velocity(model, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x, t = torch.randn(3, 3, 16, 16, generator=gen), torch.rand(3, generator=gen)
    with torch.no_grad():
        return model(x, t, model.encode_prompts(PROMPTS))


def test_llm_adapters_sit_in_the_top_layers_start_as_the_identity_and_merge_exactly():
    model = build_model(tiny_config())
    before = model.encode_prompts(PROMPTS)
    tc = tiny_config(train={"trainable": ["llm"], "llm_lora": {"rank": 2}, "llm_top_layers": 1}).train
    apply_parts(model, Parts.of(tc), None, seed=0, stage=0)
    llm = model.text.llm
    adapted = {name for name, _ in lora.adapted_layers(llm)}
    # the top layer the design reads is the last fused one, read through its K/V projections only
    assert adapted == {"layers.2.self_attn.k_proj", "layers.2.self_attn.v_proj"}
    assert all((".lora_" in n) == p.requires_grad for n, p in llm.named_parameters())
    after = model.encode_prompts(PROMPTS)  # B starts at zero: the LLM computes what it did
    for (k0, v0), (k1, v1) in zip(before.kv, after.kv):
        assert torch.equal(k0, k1) and torch.equal(v0, v1)
    with torch.no_grad():
        for p in lora.adapter_parameters(llm):
            p.add_(torch.randn_like(p) * 0.1)
    adapted_kv = model.encode_prompts(PROMPTS).kv
    merged_state = lora.merged_state_dict(llm)
    assert set(merged_state) == set(build_model(tiny_config()).text.llm.state_dict())  # plain names
    assert lora.merge_adapters(llm) == 2 and not lora.has_adapters(llm)
    for (k0, v0), (k1, v1) in zip(adapted_kv, model.encode_prompts(PROMPTS).kv):
        torch.testing.assert_close(k0, k1, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(v0, v1, atol=1e-6, rtol=1e-5)
    assert all(torch.equal(v, merged_state[k]) for k, v in llm.state_dict().items())


def test_adapter_init_is_seeded_by_stage_not_by_the_global_generator():
    tc = tiny_config(train={"dit_lora": {"rank": 2}}).train
    a, b = build_model(tiny_config()), build_model(tiny_config())
    apply_parts(a, Parts.of(tc), None, seed=0, stage=1)
    torch.manual_seed(123)  # whatever the global generator's state, and it is left as it was
    apply_parts(b, Parts.of(tc), None, seed=0, stage=1)
    drawn = torch.rand(1)
    torch.manual_seed(123)
    assert torch.equal(drawn, torch.rand(1))
    assert all(
        torch.equal(x, y)
        for x, y in zip(lora.adapter_parameters(a.denoiser), lora.adapter_parameters(b.denoiser))
    )


def _hub_like_llm(tmp_path) -> str:
    """A tiny random LLM saved as a local Hugging Face folder (a stand-in for a hub id), with a tokenizer."""
    from transformers import AutoConfig, AutoModel

    from conftest import TINY_ARCH
    from fusedit.data.shapes import vocabulary
    from fusedit.text.tokenizer import word_tokenizer

    folder = tmp_path / "llm"
    torch.manual_seed(1)
    AutoModel.from_config(AutoConfig.for_model("gemma", **TINY_ARCH)).save_pretrained(folder)
    word_tokenizer(vocabulary()).save_pretrained(folder)
    return str(folder)


def test_a_hub_llm_trained_through_adapters_saves_only_its_adapters(tmp_path):
    cfg = tiny_config(
        text={"model_id": _hub_like_llm(tmp_path)},
        train={"trainable": ["dit", "llm"], "llm_lora": {"rank": 2}, "steps": 3, "checkpoint_every": 3},
    )
    result = train(cfg, tmp_path / "run", progress=False)
    ckpt = find_checkpoint(tmp_path / "run")
    names = {p.name for p in ckpt.iterdir()}
    assert "llm_lora.safetensors" in names and "llm.safetensors" not in names  # its base reloads from the hub
    assert "optimizer_llm.pt" in names
    saved = load_tensors(ckpt, "llm_lora")
    assert saved.keys() == lora.adapter_state_dict(result["model"].text.llm).keys()
    loaded, _, _ = load_model(tmp_path / "run", use_ema=False)
    assert not lora.has_adapters(loaded.text.llm) and not lora.has_adapters(loaded.denoiser)
    torch.testing.assert_close(velocity(loaded), velocity(result["model"]), atol=1e-5, rtol=1e-4)


def test_init_from_saves_a_hub_llm_only_when_its_checkpoint_changed_it(tmp_path):
    """A fine-tune of a run whose hub LLM stayed frozen holds no LLM (it reloads from the hub, gigabytes
    saved per checkpoint); of a run that trained LLM adapters, the merged LLM whole."""
    hub = {"model_id": _hub_like_llm(tmp_path)}
    short = {"steps": 1, "checkpoint_every": 1}
    train(tiny_config(text=hub, train=short), tmp_path / "frozen", progress=False)
    tuned = {**short, "init_from": str(tmp_path / "frozen"), "dit_lora": {"rank": 2}}
    train(tiny_config(text=hub, train=tuned), tmp_path / "a", progress=False)
    assert not list(find_checkpoint(tmp_path / "a").glob("llm*"))

    adapted = {**short, "trainable": ["dit", "llm"], "llm_lora": {"rank": 2}}
    train(tiny_config(text=hub, train=adapted), tmp_path / "adapted", progress=False)
    tuned["init_from"] = str(tmp_path / "adapted")
    train(tiny_config(text=hub, train=tuned), tmp_path / "b", progress=False)
    assert (find_checkpoint(tmp_path / "b") / "llm.safetensors").is_file()


def test_dit_lora_fine_tunes_a_trained_model_and_merges_for_export(tmp_path):
    base = train(tiny_config(train={"steps": 3, "checkpoint_every": 3}), tmp_path / "base", progress=False)
    cfg = tiny_config(
        train={
            "steps": 3,
            "checkpoint_every": 3,
            "init_from": str(tmp_path / "base"),
            "dit_lora": {"rank": 4, "alpha": 8},
        }
    )
    tuned = train(cfg, tmp_path / "tuned", progress=False)
    ckpt = find_checkpoint(tmp_path / "tuned")
    assert {"denoiser_lora.safetensors", "llm.safetensors"} <= {p.name for p in ckpt.iterdir()}
    # Started from the trained model's EMA; its own weights stayed frozen under the adapters.
    plain, base_ema = load_tensors(ckpt, "denoiser"), base["ema"].state_dict()
    assert plain.keys() == base_ema.keys() and all(torch.equal(plain[k], base_ema[k]) for k in plain)
    adapters = load_tensors(ckpt, "denoiser_lora")
    assert adapters and all(".lora_" in k for k in adapters)
    assert any(v.abs().sum() > 0 for k, v in adapters.items() if "lora_B" in k)  # they trained
    # Sampling and export read a plain model with the adapters merged in.
    raw, _, _ = load_model(tmp_path / "tuned", use_ema=False)
    assert not lora.has_adapters(raw.denoiser)
    torch.testing.assert_close(velocity(raw), velocity(tuned["model"]), atol=1e-5, rtol=1e-4)
    export_run(tmp_path / "tuned", tmp_path / "export", use_ema=False)
    exported, _ = from_pretrained(tmp_path / "export")
    torch.testing.assert_close(velocity(exported), velocity(raw))
    # the EMA is of the merged weights, under plain names
    ema_model, _, _ = load_model(tmp_path / "tuned")
    assert all(
        torch.equal(v, tuned["ema"].state_dict()[k]) for k, v in ema_model.denoiser.state_dict().items()
    )


def test_init_from_a_different_architecture_is_a_config_error(tmp_path):
    train(tiny_config(train={"steps": 1, "checkpoint_every": 1}), tmp_path / "base", progress=False)
    cfg = tiny_config(model={"dit_hidden_size": 64}, train={"steps": 1, "init_from": str(tmp_path / "base")})
    with pytest.raises(ConfigError, match=r"train.init_from=.* does not fit this model: ema weight ") as e:
        train(cfg, tmp_path / "other", progress=False)
    assert "has shape [32, 12] in the checkpoint but [64, 12] in the configured model" in str(e.value)
    assert len(str(e.value)) < 400 and "\n" not in str(e.value)


def test_missing_peft_is_a_one_line_error_naming_the_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "peft", None)
    model = build_model(tiny_config())
    tc = tiny_config(train={"dit_lora": {"rank": 2}}).train
    with pytest.raises(ConfigError) as e:
        apply_parts(model, Parts.of(tc), None, seed=0, stage=0)
    assert (
        "pip install peft" in str(e.value) and "train.dit_lora" in str(e.value) and "\n" not in str(e.value)
    )


def test_adapters_on_a_bf16_llm_are_float32_and_reached_by_the_gradient():
    model = build_model(tiny_config(text={"dtype": "bfloat16"}))
    tc = tiny_config(train={"trainable": ["dit", "llm"], "llm_lora": {"rank": 2}}).train
    apply_parts(model, Parts.of(tc), None, seed=0, stage=0)
    adapters = lora.adapter_parameters(model.text.llm)
    assert {p.dtype for p in adapters} == {torch.float32}
    assert {p.dtype for n, p in model.text.llm.named_parameters() if ".lora_" not in n} == {torch.bfloat16}
    text = model.encode_prompts(PROMPTS)
    model(torch.randn(3, 3, 16, 16), torch.rand(3), text).pow(2).mean().backward()
    assert any(p.grad is not None for p in adapters)


@pytest.mark.parametrize(
    "train, key, of",
    [
        ({"dit_lora": {"rank": 2, "targets": ["q_proj", "foo"]}}, "dit_lora", "the denoiser"),
        (
            {"trainable": ["dit", "llm"], "llm_lora": {"rank": 2, "targets": ["q_proj", "foo"]}},
            "llm_lora",
            "what the design reads of llm",
        ),
    ],
)
def test_a_lora_target_that_matches_nothing_is_refused_next_to_one_that_matches(train, key, of):
    """peft adapts the targets that match and ignores the rest: each one must match, or the run is refused
    before its first step, naming it and the names that would."""
    from fusedit.config import resolved_stages
    from fusedit.train.stages import check_stages

    cfg = tiny_config(train=train)
    with pytest.raises(ConfigError) as e:
        check_stages(build_model(cfg), resolved_stages(cfg))
    # A run without stages is named by no stage; a Sequential's positions (0, 2) are no target names.
    allowed = str(e.value).split("(allowed: ", 1)[1].rstrip(")").split(", ")
    assert str(e.value).startswith(
        f"train.{key}.targets=['q_proj', 'foo']: 'foo' matches no linear layer of {of} (allowed: "
    )
    assert {"down_proj", "gate_proj", "k_proj"} <= set(allowed) and "foo" not in allowed
    assert not [name for name in allowed if name.isdigit()]
    # A staged run's message names the stage.
    staged = tiny_config(train=train, stages=[{"name": "tune", "steps": 1}])
    with pytest.raises(ConfigError, match=rf"^stages\.0 \(tune\): train\.{key}\.targets="):
        check_stages(build_model(staged), resolved_stages(staged))
    # Of the default targets one match is enough: deep fusion reads only K/V of the top layer it trains.
    top = tiny_config(train={"trainable": ["dit", "llm"], "llm_lora": {"rank": 2}, "llm_top_layers": 1})
    check_stages(build_model(top), resolved_stages(top))
