"""Staged training (fusedit.train.stages, docs/recipes.md): stage configs, transitions (weights, EMA and
optimizer state carried or rebuilt), resume at any step of any stage, exactly which parts receive
gradients, joint LLM fine-tuning, resolution changes, and the recipe presets."""

from __future__ import annotations

import json
import logging
import re

import pytest
import torch
import torch.distributed as dist

from conftest import POSITIONS, randomize, tiny_config, watch_llm_forwards
from fusedit import adapters as lora
from fusedit.adapters import Parts
from fusedit.checkpoints import find_checkpoint, load_model, load_tensors, stage_of_checkpoint
from fusedit.config import ConfigError, load_config, resolved_stages, save_config
from fusedit.sampling.generation import generate
from fusedit.system import build_model
from fusedit.train import loop
from fusedit.train.loop import train
from fusedit.train.stages import (
    _check_global_batch,
    apply_parts,
    describe_stages,
    idle_settings,
    training_flops_per_image,
)

PROMPTS = ["a red circle", "a blue square to the left of a green triangle", ""]
JOINT = {"trainable": ["dit", "llm"], "llm_lr": 3e-4}

# Three stages over the tiny model: 16 px DiT only; 24 px with the LLM trained jointly (top 2 layers);
# LoRA adapters on DiT and LLM. Every transition changes the parameter set.
THREE = [
    {"name": "low-res", "steps": 3},
    {"name": "joint", "steps": 3, "data": {"image_size": 24}, "train": {**JOINT, "llm_top_layers": 2}},
    {"name": "lora", "steps": 3, "train": {**JOINT, "dit_lora": {"rank": 4}, "llm_lora": {"rank": 2}}},
]


def three_stage(**sections):
    return tiny_config(
        stages=THREE,
        model={"ape_base_size": 8},
        train={"checkpoint_every": 2, "keep_checkpoints": 20},
        **sections,
    )


def logged(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _keep_until(run_dir, step: int) -> None:
    (run_dir / "checkpoints" / "latest").write_text(f"step_{step:08d}")


# ------------------------------------------------------------------------------------------------ config


def test_stages_resolve_cumulatively_with_global_step_boundaries():
    cfg = three_stage()
    stages = resolved_stages(cfg)
    assert cfg.train.steps == 9
    assert [(s.name, s.start, s.end) for s in stages] == [("low-res", 0, 3), ("joint", 3, 6), ("lora", 6, 9)]
    # each stage applies on top of the one before: "lora" keeps "joint"'s 24 px and top-2-layer setting
    assert [s.config.data.image_size for s in stages] == [16, 24, 24]
    assert stages[2].config.train.llm_top_layers == 2 and stages[2].config.train.dit_lora.rank == 4
    assert [s.config.train.steps for s in stages] == [3, 3, 3]
    assert all(s.config.stages == [] and s.config.model == cfg.model for s in stages)
    # a config without stages is one implicit stage: the config itself
    plain = tiny_config()
    assert resolved_stages(plain)[0].config is plain and resolved_stages(plain)[0].end == plain.train.steps


def test_stage_overrides_on_the_command_line_and_round_trip(tmp_path):
    cfg = load_config("recipe-shapes-3stage", ["stages.1.steps=7", "stages.2.train.dit_lora.rank=2"])
    assert cfg.stages[1].steps == 7 and cfg.train.steps == 800 + 7 + 300
    assert resolved_stages(cfg)[2].config.train.dit_lora.rank == 2
    save_config(cfg, tmp_path / "c.yaml")
    assert load_config(tmp_path / "c.yaml") == cfg


def test_a_top_level_override_a_stage_sets_itself_is_warned_about(caplog):
    """`fusedit train recipe-shapes-3stage train.batch_size=4` trained every stage at the recipe's 32 in
    silence: a stage's value wins over the top-level one. The warning names the stages it misses and the
    stage overrides (only stages setting the key; later ones inherit) that would set it."""
    with caplog.at_level(logging.WARNING, logger="fusedit"):
        cfg = load_config("recipe-shapes-3stage", ["train.batch_size=4", "train.lr=0.001", "sample.steps=5"])
    assert [r.getMessage() for r in caplog.records] == [
        "train.batch_size=4 does not reach stages.0 (low-res) at 32, stages.1 (joint-32px) at 32, stages.2 "
        "(lora-position) at 32: a stage's value (its own or an earlier stage's) wins over the top-level one; "
        "to set it there, override stages.0.train.batch_size=4",
        "train.lr=0.001 does not reach stages.0 (low-res) at 0.002: a stage's value (its own or an earlier "
        "stage's) wins over the top-level one; to set it there, override stages.0.train.lr=0.001",
    ]
    assert [s.config.train.batch_size for s in resolved_stages(cfg)] == [32, 32, 32]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="fusedit"):  # a nested key, which stage 2 sets itself
        load_config("recipe-shapes-3stage", ["train.dit_lora.rank=16"])
    assert [r.getMessage() for r in caplog.records] == [
        "train.dit_lora.rank=16 does not reach stages.2 (lora-position) at 8: a stage's value (its own or an "
        "earlier stage's) wins over the top-level one; to set it there, override stages.2.train.dit_lora.rank=16"
    ]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="fusedit"):
        cfg = load_config("recipe-shapes-3stage", ["train.batch_size=4", "stages.0.train.batch_size=4"])
        load_config("recipe-fusedit-paper", ["train.global_batch=null", "stages.0.train.global_batch=null"])
        load_config("recipe-shapes-3stage")
    assert caplog.records == []
    assert [s.config.train.batch_size for s in resolved_stages(cfg)] == [4, 4, 4]


@pytest.mark.parametrize(
    "override, message",
    [
        (
            "stages.0.train.steps=4",
            "stages.0.train.steps is set, but train.steps is the run's, not a stage's (allowed: stages.0.steps",
        ),
        (
            "stages.1.train.seed=0",  # the run's own value
            "stages.1.train.seed is set, but train.seed is the run's, not a stage's (allowed: set train.seed)",
        ),
        ("stages.0.model.dit_hidden_size=64", "unknown config key 'stages.0.model'"),
        ("stages.1.data.image_size=30", "stages.1 (joint-32px): data.image_size=30 must be divisible by"),
        (
            "stages.2.train.trainable=[dit, vae]",
            "'vae' is not allowed (allowed: a list of dit, refiner, llm)",
        ),
        ("stages.2.train.trainable=[]", "stages.2.train.trainable=[]: is empty"),
        ("stages.1.train.trainable=[refiner]", "names 'refiner' but model.design='fusedit' has none"),
        ("stages.5.steps=3", "stages.5: no such item (allowed: 0..2)"),
        ("stages.0.steps=null", "stages.0.steps is required"),
        ("text.dtype=bfloat16", "(full fine-tuning) but text.dtype='bfloat16': AdamW needs float32"),
        ("train.shard_llm=true", "train.shard_llm=true needs a frozen LLM"),
        ("train.steps=100", "train.steps=100 cannot be set on a staged config"),
    ],
)
def test_bad_stages_fail_with_one_line_errors(override, message):
    with pytest.raises(ConfigError) as e:
        load_config("recipe-shapes-3stage", [override])
    assert message in str(e.value) and "\n" not in str(e.value)


# ------------------------------------------------------------------------------------------------ gradients


def _grads_after_one_loss(cfg, trainable: list[str], **train):
    """A fresh model made to train ``trainable``; one flow loss backward; -> (model, params with a grad)."""
    model = build_model(cfg)
    tc = tiny_config(model={"design": cfg.model.design}, train={"trainable": trainable, **train}).train
    apply_parts(model, Parts.of(tc), None, seed=0, stage=0)
    # Zero-initialised outputs (adaLN-Zero, the output projection, refiner gates, LoRA's B) would make
    # every gradient behind them exactly zero: give them values so that "nonzero" means "reached".
    randomize(model.denoiser)
    for enc in model.encoders:
        with torch.no_grad():
            for q in lora.adapter_parameters(enc.llm):
                q.add_(torch.randn_like(q) * 0.1)
    text = model.encode_prompts(PROMPTS)
    model(torch.randn(3, 3, 16, 16), torch.rand(3), text).pow(2).mean().backward()
    with_grad = {
        (key, n)
        for key, m in [
            ("denoiser", model.denoiser),
            *((f"llm{i}", e.llm) for i, e in enumerate(model.encoders)),
        ]
        for n, p in m.named_parameters()
        if p.grad is not None and p.grad.abs().sum() > 0
    }
    for m in [model.denoiser, *(e.llm for e in model.encoders)]:
        for p in m.parameters():  # frozen weights get no gradient at all (None, not zeros)
            assert p.requires_grad or p.grad is None
    return model, with_grad


def _names(module, prefix: str, keep=lambda n: True) -> set:
    return {(prefix, n) for n, _ in module.named_parameters() if keep(n)}


def test_deep_fusion_llm_gradient_arrives_only_through_the_image_queries_attention_to_its_kv():
    cfg = tiny_config()
    model, grads = _grads_after_one_loss(cfg, ["dit", "llm"])
    last = f"layers.{len(model.text.llm.layers) - 1}."
    # The last fused layer is read only through its input norm and K/V projections; its queries, attention
    # output, MLP and the final norm never reach the image: the text stream never sees the image. They
    # could get no gradient, so they stay frozen; everything else of the LLM gets one.
    unread = ("self_attn.q_proj", "self_attn.o_proj", "post_attention_layernorm", "mlp.")
    llm = model.text.llm
    expected_llm = _names(
        llm,
        "llm0",
        lambda n: n != "norm.weight" and not (n.startswith(last) and n[len(last) :].startswith(unread)),
    )
    assert {g for g in grads if g[0] == "llm0"} == expected_llm
    assert {("llm0", n) for n, p in llm.named_parameters() if p.requires_grad} == expected_llm
    assert {g for g in grads if g[0] == "denoiser"} == _names(model.denoiser, "denoiser")

    # frozen LLM: nothing of it is kept for backward, the DiT trains as before
    model, grads = _grads_after_one_loss(cfg, ["dit"])
    assert grads == _names(model.denoiser, "denoiser")
    assert not model.text.trainable

    # only the LLM trains: the DiT passes the gradient through without receiving any
    model, grads = _grads_after_one_loss(cfg, ["llm"])
    assert {g for g in grads} == expected_llm


def test_llm_top_layers_train_alone_and_autograd_starts_there():
    cfg = tiny_config(model={"design": "dit-self"})  # reads the last hidden state: every layer matters
    model, grads = _grads_after_one_loss(cfg, ["llm"], llm_top_layers=1)
    assert grads == _names(model.text.llm, "llm0", lambda n: n.startswith("layers.2.") or n == "norm.weight")
    text = model.encode_prompts(PROMPTS)
    assert text.hidden.requires_grad  # the graph starts at the top layer: the layers below record nothing
    model, grads = _grads_after_one_loss(cfg, ["llm"])
    assert grads == _names(model.text.llm, "llm0")


def test_shallow_and_lidit_designs_train_exactly_the_parts_named():
    cfg = load_config("debug-lidit", ["data.image_size=16", "model.patch_size=2"])
    model, grads = _grads_after_one_loss(cfg, ["refiner"])
    assert grads == {("denoiser", f"context.{n}") for n, _ in model.denoiser.context.named_parameters()}
    # The default trains the whole denoiser: the refiners (their gates included) learn with the DiT.
    assert load_config("debug-lidit").train.trainable == ["dit"]
    model, grads = _grads_after_one_loss(cfg, ["dit"])
    assert grads == _names(model.denoiser, "denoiser")
    # Through the DiT's adapters, the refiners stay frozen unless named.
    model, grads = _grads_after_one_loss(cfg, ["dit"], dit_lora={"rank": 2})
    assert not any(n.startswith("context.") for _, n in grads)
    model, grads = _grads_after_one_loss(cfg, ["dit", "refiner"], dit_lora={"rank": 2})
    assert {n for _, n in grads if n.startswith("context.")} == {
        f"context.{n}" for n, _ in model.denoiser.context.named_parameters()
    }
    model, grads = _grads_after_one_loss(cfg, ["dit", "refiner", "llm"])
    # both LLMs of LI-DiT train jointly, through the refiners: the blocks up to the hidden state each one
    # reads (-3 of 6 and of 4); the block past it and the final norm stay frozen
    for key, enc, read in (("llm0", model.text.llm, 4), ("llm1", model.extra_text[0].llm, 2)):
        layers = {int(n.split(".")[1]) for k, n in grads if k == key and n.startswith("layers.")}
        assert layers == set(range(read)) and len(enc.layers) == read + 1
        assert {n for n, p in enc.named_parameters() if p.requires_grad} == {n for k, n in grads if k == key}
    assert {n for k, n in grads if k == "denoiser"} == {n for n, _ in model.denoiser.named_parameters()}


def test_lora_parts_train_only_their_adapters():
    cfg = tiny_config()
    model, grads = _grads_after_one_loss(
        cfg, ["dit", "llm"], dit_lora={"rank": 2}, llm_lora={"rank": 2}, llm_top_layers=1
    )
    assert grads and all(".lora_" in n for _, n in grads)
    assert {n.split(".")[1] for k, n in grads if k == "llm0"} == {"2"}  # the top layer only
    assert {n.split(".lora_")[0].rsplit(".", 1)[1] for k, n in grads if k == "denoiser"} == {
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    }


# ------------------------------------------------------------------------------------------------ training


def test_joint_stage_runs_the_llm_with_autograd_and_changes_it_while_a_frozen_stage_does_not(
    tmp_path, monkeypatch
):
    calls = watch_llm_forwards(monkeypatch)
    stages = [{"name": "frozen", "steps": 2}, {"name": "joint", "steps": 2, "train": JOINT}]
    cfg = tiny_config(stages=stages, train={"checkpoint_every": 1, "keep_checkpoints": 10})
    torch.manual_seed(cfg.train.seed)  # the run builds the same random LLM from train.seed
    initial = build_model(cfg).text.llm.state_dict()
    train(cfg, tmp_path / "run", progress=False)
    assert calls == [False, False, True, True]  # one LLM forward per step; a graph only when it trains
    ckpts = tmp_path / "run" / "checkpoints"
    after = {s: load_tensors(ckpts / f"step_{s:08d}", "llm") for s in (1, 2, 3, 4)}
    assert all(torch.equal(after[s][k], initial[k]) for s in (1, 2) for k in initial)  # frozen: unchanged
    assert any(not torch.equal(after[3][k], initial[k]) for k in initial)  # joint: it trains
    assert (ckpts / "step_00000004" / "optimizer_llm.pt").is_file()
    records = logged(tmp_path / "run")
    assert [r["stage"] for r in records] == [0, 0, 1, 1] and "llm_lr" in records[-1]
    assert records[-1]["llm_lr"] == 3e-4 and "llm_lr" not in records[0]


def test_transitions_carry_weights_ema_and_optimizer_state_or_rebuild_it(tmp_path, monkeypatch, caplog):
    """The start of every stage, seen from inside the run, equals the checkpoint written at the end of the
    stage before: weights and EMA carried; Adam state carried for tensors that keep training."""
    seen = {}
    original = loop._Run.stage

    def watching(self, stage, steps, forward, stage_parallel, opts, ema, data_state):
        seen[stage.index] = (
            {k: v.clone() for k, v in self.model.denoiser.state_dict().items()},
            {k: v.clone() for k, v in ema.state_dict().items()},
            {
                k: {p: {n: t.clone() for n, t in st.items()} for p, st in o.state.items()}
                for k, o in opts.by_module.items()
            },
            opts.named(),
        )
        return original(self, stage, steps, forward, stage_parallel, opts, ema, data_state)

    monkeypatch.setattr(loop._Run, "stage", watching)
    stages = [
        {"name": "a", "steps": 2},
        {"name": "b", "steps": 2, "data": {"image_size": 24}, "train": {"lr": 5e-4}},  # same parameters
        {"name": "c", "steps": 2, "train": JOINT},  # the LLM joins
    ]
    cfg = tiny_config(stages=stages, train={"checkpoint_every": 2, "keep_checkpoints": 10})
    with caplog.at_level(logging.INFO, logger="fusedit"):
        train(cfg, tmp_path / "run", progress=False)
    log = caplog.text
    assert "stage 1 'b': steps 2..4, 24 px, batch 4 (4 x 1), lr 0.0005, trains DiT" in log
    assert "stage 1 'b': optimizer: the same" in log and "Adam state carried" in log
    assert "stage 2 'c': optimizer rebuilt for a changed parameter set" in log
    for index, boundary in ((1, 2), (2, 4)):
        ckpt = tmp_path / "run" / "checkpoints" / f"step_{boundary:08d}"
        weights, ema, state, named = seen[index]
        assert json.loads((ckpt / "state.json").read_text())["stage"] == index - 1
        saved = load_tensors(ckpt, "denoiser")
        assert all(torch.equal(weights[k], saved[k]) for k in saved)
        saved_ema = load_tensors(ckpt, "ema")
        assert all(torch.equal(ema[k], saved_ema[k]) for k in saved_ema)
        saved_opt = torch.load(ckpt / "optimizer.pt", weights_only=True)["state"]
        params = list(named["denoiser"].values())
        for i, p in enumerate(params):  # the denoiser's Adam moments continue where they were
            assert torch.equal(state["denoiser"][p]["exp_avg"], saved_opt[i]["exp_avg"])
    assert seen[2][2]["llm"] == {}  # the LLM's optimizer starts fresh


def test_each_finished_stages_last_checkpoint_outlives_keep_checkpoints(tmp_path):
    """train.keep_checkpoints=1 pruned a stage's last checkpoint (its 16 px model) at the next stage's first
    save. The newest stays the one --resume takes, and a fresh run still deletes them all."""
    stages = [
        {"name": "low", "steps": 2},
        {"name": "high", "steps": 2, "data": {"image_size": 24}},
        {"name": "more", "steps": 2},
    ]
    cfg = tiny_config(
        stages=stages, model={"ape_base_size": 8}, train={"checkpoint_every": 1, "keep_checkpoints": 1}
    )
    run = tmp_path / "run"

    def kept() -> list[str]:
        return sorted(p.name for p in (run / "checkpoints").glob("step_*"))

    train(cfg, run, stop_at=5, progress=False)
    assert kept() == ["step_00000002", "step_00000004", "step_00000005"]
    assert find_checkpoint(run).name == "step_00000005"
    assert train(cfg, run, resume=True, progress=False)["start_step"] == 5
    assert kept() == ["step_00000002", "step_00000004", "step_00000006"]
    assert find_checkpoint(run).name == "step_00000006"
    _, first, _ = load_model(run / "checkpoints" / "step_00000002")
    assert first.data.image_size == 16  # the first stage's result, as it trained
    train(cfg, run, overwrite=True, stop_at=1, progress=False)
    assert kept() == ["step_00000001"]


def test_a_stage_announces_its_global_batch_and_its_split(caplog):
    """Under torchrun the stage line showed the per-process batch only; recipes reason in global batches."""
    cfg = load_config("recipe-shapes-3stage", ["stages.0.train.grad_accum=2"])
    with caplog.at_level(logging.INFO, logger="fusedit"):
        loop._announce_stage(cfg, resolved_stages(cfg)[0], True, 2)
    assert "stage 0 'low-res': steps 0..800, 16 px, batch 128 (32 x 2 x 2 processes), lr 0.002" in caplog.text


def test_re_created_adapters_start_with_fresh_adam_state(tmp_path, caplog):
    """Two LoRA stages of the same rank but another alpha: the old adapters are merged and new ones made
    under the same names and shapes; those must not inherit the old adapters' moments. alpha None and
    alpha = rank are the same adapters and keep theirs."""
    lora_stage = lambda name, **lora: {  # noqa: E731
        "name": name,
        "steps": 1,
        "train": {"trainable": ["dit"], "dit_lora": {"rank": 2, **lora}},
    }
    stages = [lora_stage("a"), lora_stage("b", alpha=2), lora_stage("c", alpha=4)]
    cfg = tiny_config(stages=stages, train={"checkpoint_every": 1})
    with caplog.at_level(logging.INFO, logger="fusedit"):
        train(cfg, tmp_path / "run", progress=False)
    log = caplog.text
    assert "stage 1 'b': optimizer: the same" in log
    assert "stage 2 'c': optimizer rebuilt for a changed parameter set: Adam state carried for the 0 " in log


@pytest.mark.parametrize(
    "later, message",
    [
        ({"trainable": ["dit", "llm"], "llm_top_layers": 50}, "stages.1 (b): train.llm_top_layers=50 but"),
        (
            {"trainable": ["dit"], "dit_lora": {"rank": 2, "targets": ["nope"]}},
            "stages.1 (b): train.dit_lora",
        ),
    ],
)
def test_a_later_stage_that_cannot_run_fails_before_the_first_step(tmp_path, later, message):
    stages = [{"name": "a", "steps": 1}, {"name": "b", "steps": 1, "train": later}]
    with pytest.raises(ConfigError, match=re.escape(message)):
        train(tiny_config(stages=stages, train={"checkpoint_every": 1}), tmp_path / "run", progress=False)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_resume_in_the_middle_of_a_later_stage_equals_an_uninterrupted_run(tmp_path):
    cfg = three_stage()
    full = train(cfg, tmp_path / "a", progress=False)
    assert len(full["losses"]) == 9
    first = train(cfg, tmp_path / "b", stop_at=5, progress=False)["losses"]  # checkpoints 2, 3, 4, 5
    _keep_until(tmp_path / "b", 4)  # interrupted in stage "joint", one checkpoint lost
    rest = train(cfg, tmp_path / "b", resume=True, progress=False)["losses"]
    assert first == full["losses"][:5] and rest == full["losses"][4:]  # bit-identical through two transitions
    assert [r["loss"] for r in logged(tmp_path / "b")] == full["losses"]
    # resumed exactly at a stage boundary (the checkpoint written at the end of stage "low-res")
    _keep_until(tmp_path / "b", 3)
    assert train(cfg, tmp_path / "b", resume=True, progress=False)["losses"] == full["losses"][3:]
    # an earlier stage made longer moves the checkpoint's stage under its data position: refused by key
    # before anything trains (before, the data loader's "data state is for step 1" after the model built)
    _keep_until(tmp_path / "b", 4)
    longer = tiny_config(
        stages=[{**THREE[0], "steps": 4}, *THREE[1:]],
        model={"ape_base_size": 8},
        train={"checkpoint_every": 2, "keep_checkpoints": 20},
    )
    with pytest.raises(ConfigError, match=r"^stages.0.steps=4 moves the start of stage 1 'joint'"):
        train(longer, tmp_path / "b", resume=True, progress=False)
    # the last checkpoint holds the LoRA stage: adapters apart, plain weights, merged EMA, both optimizers
    ckpt = find_checkpoint(tmp_path / "a")
    names = {p.name for p in ckpt.iterdir()}
    assert {
        "denoiser_lora.safetensors",
        "llm.safetensors",
        "llm_lora.safetensors",
        "optimizer_llm.pt",
    } <= names
    assert json.loads((ckpt / "state.json").read_text())["stage"] == 2
    model, stage_cfg, _ = load_model(tmp_path / "a")
    assert stage_cfg.data.image_size == 24 and stage_cfg.stages == []
    ema = full["ema"].state_dict()
    assert all(torch.equal(v, ema[k]) for k, v in model.denoiser.state_dict().items())


@pytest.mark.parametrize("pos", POSITIONS)
def test_a_model_trained_at_one_resolution_samples_at_another(tmp_path, pos):
    # APE interpolates over the first grid (ape_base_size); RoPE grids follow (h, w) at every call.
    model_cfg = {"pos_embed": pos, **({"ape_base_size": 8} if pos == "ape" else {})}
    stages = [{"name": "16px", "steps": 2}, {"name": "24px", "steps": 1, "data": {"image_size": 24}}]
    cfg = tiny_config(stages=stages, model=model_cfg, train={"checkpoint_every": 3})
    train(cfg, tmp_path / "run", progress=False)
    model, stage_cfg, _ = load_model(tmp_path / "run")
    for size in (16, 24, 32):
        kw = dict(image_size=size, steps=2, guidance=3.0, seed=0)
        images = generate(model, PROMPTS[:2], **kw)
        assert images.shape == (2, 3, size, size) and torch.isfinite(images).all()
        torch.testing.assert_close(images, generate(model, PROMPTS[:2], cache_text=False, **kw))


def test_joint_llm_sampling_caches_the_text_context_and_equals_uncached(tmp_path):
    cfg = tiny_config(train={**JOINT, "steps": 2, "checkpoint_every": 2})
    model = train(cfg, tmp_path / "run", progress=False)["model"].eval()
    assert model.text.trainable  # still set up for training: sampling runs under no_grad regardless
    kw = dict(image_size=16, steps=2, guidance=3.0, seed=0)
    torch.testing.assert_close(
        generate(model, PROMPTS, **kw), generate(model, PROMPTS, cache_text=False, **kw)
    )
    loaded, _, _ = load_model(
        tmp_path / "run", use_ema=False
    )  # the trained LLM comes back from llm.safetensors
    assert all(
        torch.equal(v, model.text.llm.state_dict()[k]) for k, v in loaded.text.llm.state_dict().items()
    )


def test_shapes_recipe_runs_end_to_end_and_resumes_inside_its_second_stage(tmp_path):
    """The shipped three-stage recipe, shortened: interrupted in its joint stage, resumed, equal."""
    from fusedit.cli import main

    short = ["stages.0.steps=2", "stages.1.steps=3", "stages.2.steps=2", "stages.0.train.batch_size=4"]
    args = ["train", "recipe-shapes-3stage", *short, "train.checkpoint_every=1", "--quiet"]
    assert main([*args, "--out", str(tmp_path / "a")]) == 0
    assert main([*args, "--out", str(tmp_path / "b"), "--stop-at", "4"]) == 0
    assert main([*args, "--out", str(tmp_path / "b"), "--resume"]) == 0
    a, b = logged(tmp_path / "a"), logged(tmp_path / "b")
    assert [r["loss"] for r in a] == [r["loss"] for r in b] and [r["stage"] for r in a] == [
        0,
        0,
        1,
        1,
        1,
        2,
        2,
    ]
    assert (
        main(
            [
                "sample",
                str(tmp_path / "b"),
                "--prompt",
                "a red circle",
                "--steps",
                "2",
                "--out",
                str(tmp_path / "s"),
                "--quiet",
            ]
        )
        == 0
    )
    assert (tmp_path / "s" / "00000.png").is_file()


@pytest.mark.slow
@pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="this torch build has no gloo"
)
def test_two_processes_train_the_llm_jointly_and_through_lora_like_one(tmp_path):
    """DDP reduces the denoiser it wraps; a jointly trained LLM's gradients are averaged by the loop. The
    Distributed Checkpoints (adapters in their own sections) resume on one process and sample merged."""
    import shutil

    from test_distributed import TOL, logged_losses, torchrun

    stages = [
        {"name": "joint", "steps": 2, "train": JOINT},
        {"name": "lora", "steps": 2, "train": {**JOINT, "dit_lora": {"rank": 2}, "llm_lora": {"rank": 2}}},
    ]
    run = {"checkpoint_every": 2, "keep_checkpoints": 4, "device": "cpu"}
    save_config(tiny_config(stages=stages, train={**run, "batch_size": 4}), tmp_path / "ddp.yaml")
    torchrun(2, tmp_path / "ddp.yaml", tmp_path / "ddp")
    one = tiny_config(stages=stages, train={**run, "batch_size": 8})
    ref = train(one, tmp_path / "ref", progress=False)
    assert logged_losses(tmp_path / "ddp") == pytest.approx(ref["losses"], **TOL)
    two, _, _ = load_model(tmp_path / "ddp", use_ema=False)  # DCP sections "llm", "llm_lora", "model_lora"
    merged, _, _ = load_model(tmp_path / "ref", use_ema=False)
    for a, b in ((two.text.llm, merged.text.llm), (two.denoiser, merged.denoiser)):
        for k, v in b.state_dict().items():
            torch.testing.assert_close(a.state_dict()[k], v, atol=1e-5, rtol=1e-4)
    # the 2-process checkpoint at the end of stage "joint" resumes on one process through the transition
    shutil.copytree(tmp_path / "ddp", tmp_path / "resumed")
    _keep_until(tmp_path / "resumed", 2)
    rest = train(one, tmp_path / "resumed", resume=True, progress=False)["losses"]
    assert rest == pytest.approx(ref["losses"][2:], **TOL)


# ------------------------------------------------------------------------------------------------ recipes


def test_paper_recipes_match_design_space_section_3():
    for name, steps in (("recipe-fusedit-paper", 500_000), ("recipe-fusedit-large", 1_000_000)):
        cfg = load_config(name)
        (stage,) = resolved_stages(cfg)
        tc, sc = stage.config.train, stage.config
        assert stage.steps == steps == cfg.train.steps
        assert (tc.lr, tc.weight_decay, tc.warmup_steps, tc.schedule, tc.grad_clip) == (
            1e-4,
            1e-4,
            0,
            "constant",
            1.0,
        )
        assert (tc.beta1, tc.beta2, tc.precision, tc.trainable) == (0.9, 0.999, "bf16", ["dit"])
        assert (tc.ema_decay, tc.ema_every, tc.batch_size * tc.grad_accum) == (0.99, 100, 512)
        assert (sc.data.image_size, sc.data.caption_dropout, sc.data.source) == (512, 0.1, "webdataset")
        assert (sc.flow.logit_mean, sc.flow.logit_std, sc.flow.shift) == (0.0, 1.0, 3.0)
        assert (cfg.text.max_length, cfg.vae.latent_channels, cfg.vae.downsample, cfg.model.patch_size) == (
            256,
            16,
            8,
            2,
        )
    # The LI-DiT recipe takes the same optimizer, EMA, caption dropout and precision (from lidit-1b).
    lidit = resolved_stages(load_config("recipe-lidit-3stage"))
    for stage in lidit:
        tc = stage.config.train
        assert (tc.weight_decay, tc.schedule, tc.grad_clip, tc.ema_decay, tc.ema_every, tc.precision) == (
            1e-4,
            "constant",
            1.0,
            0.99,
            100,
            "bf16",
        )
        assert stage.config.data.caption_dropout == 0.1
    assert [s.config.train.lr for s in lidit] == [1e-4, 1e-4, 2e-5]
    large = load_config("recipe-fusedit-large")
    assert (large.model.pos_embed, large.model.timestep_conditioning, large.model.sandwich_norm) == (
        "2d-rope",
        "none",
        True,
    )


def test_lidit_and_shapes_recipes_change_resolution_by_stage():
    sizes = [s.config.data.image_size for s in resolved_stages(load_config("recipe-lidit-3stage"))]
    assert sizes == [256, 512, 1024]
    shapes = resolved_stages(load_config("recipe-shapes-3stage"))
    parts = [Parts.of(s.config.train) for s in shapes]
    assert [s.config.data.image_size for s in shapes] == [16, 32, 32]
    assert [p.llm for p in parts] == [False, True, True]
    assert parts[2].dit_adapters and parts[2].llm_adapters and not parts[1].llm_adapters


def test_describe_prints_each_stage_compute_budget(capsys):
    from fusedit.cli import main

    assert main(["describe", "recipe-lidit-3stage"]) == 0
    out = capsys.readouterr().out
    assert "stage 0 'base-256px': steps 0..300000, 256 px, batch 1024x1" in out
    assert "stage 2 'finetune-1024px'" in out and "whole run:" in out and "PFLOP/s-days" in out
    cfg = load_config("recipe-fusedit-paper")
    (line, total) = describe_stages(cfg, build_model(cfg, "meta"))
    assert "13.785 TFLOP per image" in line  # design-space.md s.3: about 13.8 TFLOP per 512 px image


def test_describe_counts_the_training_cost_of_what_a_single_stage_run_trains(capsys):
    from fusedit.cli import main

    def training_line(*overrides) -> str:
        assert main(["describe", "fusedit-gemma2b", *overrides]) == 0
        return next(line for line in capsys.readouterr().out.splitlines() if line.startswith("512 px"))

    # DiT 4.253 and LLM 1.024 TFLOP forward: 3 x DiT + LLM, and the LLM's backward (2 x) once it trains.
    assert training_line().endswith("training 13.785 TFLOP per image")
    assert training_line("train.trainable=[dit,llm]", "text.dtype=float32").endswith(
        "training 15.834 TFLOP per image"
    )


def test_a_recipes_global_batch_is_kept_on_any_number_of_processes(tmp_path):
    """The recipes name their global batch (train.global_batch): batch_size x grad_accum x processes must
    make it, else training is refused at start with a per-process batch that does; null opts out."""
    paper = resolved_stages(load_config("recipe-fusedit-paper"))
    _check_global_batch(paper, 1, staged=True)  # 512 x 1 x 1
    with pytest.raises(ConfigError) as e:
        _check_global_batch(paper, 8, staged=True)
    assert str(e.value) == (
        "stages.0.train.global_batch=512, but stages.0.train.batch_size=512 x grad_accum=1 x 8 process(es) = "
        "4096 (allowed: stages.0.train.batch_size=64 on 8 process(es), or stages.0.train.global_batch=null "
        "to train at 4096)"
    )
    _check_global_batch(
        resolved_stages(load_config("recipe-fusedit-paper", ["stages.0.train.batch_size=64"])), 8, staged=True
    )
    accum = ["stages.0.train.batch_size=16", "stages.0.train.grad_accum=3"]
    with pytest.raises(ConfigError, match=r"batch_size=64 stages.0.train.grad_accum=1 on 8 process"):
        _check_global_batch(resolved_stages(load_config("recipe-fusedit-paper", accum)), 8, staged=True)
    with pytest.raises(ConfigError, match=r"allowed: a number of processes that divides 512, or"):
        _check_global_batch(paper, 3, staged=True)
    opted_out = load_config("recipe-fusedit-paper", ["stages.0.train.global_batch=null"])
    _check_global_batch(resolved_stages(opted_out), 8, staged=True)
    # Each stage of a recipe is checked with its own batch; a run without stages names train.*.
    lidit = resolved_stages(load_config("recipe-lidit-3stage", ["stages.1.train.batch_size=64"]))
    with pytest.raises(ConfigError, match=r"^stages.1.train.global_batch=512, but"):
        _check_global_batch(lidit, 1, staged=True)
    # train() refuses it before building anything.
    cfg = tiny_config(train={"global_batch": 8})
    with pytest.raises(
        ConfigError, match=r"^train.global_batch=8, but train.batch_size=4 x grad_accum=1 x 1"
    ):
        train(cfg, tmp_path / "run", progress=False)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_training_flops_count_what_each_part_needs():
    frozen = Parts.of(tiny_config().train)
    joint = Parts.of(tiny_config(train=JOINT).train)
    top = Parts.of(tiny_config(train={**JOINT, "llm_top_layers": 1}).train)
    adapters = Parts.of(tiny_config(train={**JOINT, "dit_lora": {"rank": 2}, "llm_lora": {"rank": 2}}).train)
    assert training_flops_per_image(frozen, 10, 4, 2) == 3 * 10 + 4
    assert training_flops_per_image(joint, 10, 4, 2) == 3 * 10 + 3 * 4
    assert training_flops_per_image(top, 10, 4, 2) == 3 * 10 + 4 + 4  # 2 x its half of the LLM
    assert training_flops_per_image(adapters, 10, 4, 2) == 2 * 10 + 2 * 4


def test_settings_for_a_part_that_does_not_train_are_named_in_a_warning(tmp_path, caplog):
    """A stage that leaves the LLM frozen ignores the LLM's LoRA, learning rate and layer choice (inherited
    from the run's train section by every stage): warned, naming each, rather than silently dropped."""
    stages = [
        {"name": "dit-only", "steps": 1},
        {"name": "joint", "steps": 1, "train": {"trainable": ["dit", "llm"]}},
    ]
    train_keys = {"llm_lr": 3e-4, "llm_top_layers": 2, "llm_lora": {"rank": 2}, "checkpoint_every": 2}
    cfg = tiny_config(stages=stages, train=train_keys)
    with caplog.at_level(logging.WARNING, logger="fusedit"):
        train(cfg, tmp_path / "run", progress=False)
    warned = [r.getMessage() for r in caplog.records if "do nothing" in r.getMessage()]
    assert warned == [
        "stage 0 (dit-only) trains DiT (train.trainable=['dit']), so these settings do nothing: "
        "train.llm_lora.rank=2 (LLM), train.llm_lr=0.0003 (LLM), train.llm_top_layers=2 (LLM)"
    ]
    llm_only = tiny_config(train={"trainable": ["llm"], "dit_lora": {"rank": 4}, "llm_lr": 1e-5}).train
    assert idle_settings(llm_only) == ["train.dit_lora.rank=4 (DiT)"]


def test_duplicate_stage_names_are_refused_before_training(tmp_path):
    stages = [{"name": "a", "steps": 1}, {"name": "a", "steps": 1}]
    cfg = tiny_config(stages=stages)  # loads: a saved run with such names still samples
    with pytest.raises(
        ConfigError, match=r"stages\.1.name='a' is already the name of stages\.0 \(allowed: distinct"
    ):
        train(cfg, tmp_path / "run", progress=False)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_resuming_after_an_earlier_stage_changed_length_names_the_key():
    """A checkpoint's data position counts the steps since its stage began: a config that moves that start
    (an earlier stage's steps changed) is refused against the checkpoint's own stages, naming the key, the
    old and new boundary and what may change, rather than failing inside the data loader."""
    saved = resolved_stages(three_stage())

    def stages(*steps):
        resized = [{**st, "steps": n} for st, n in zip(THREE, steps)]
        return resolved_stages(tiny_config(stages=resized, model={"ape_base_size": 8}))

    for moved, now in (((4, 3, 3), 4), ((2, 3, 3), 2)):
        with pytest.raises(ConfigError) as e:
            stage_of_checkpoint(stages(*moved), 4, 1, saved)
        assert str(e.value) == (
            f"stages.0.steps={moved[0]} moves the start of stage 1 'joint', where the checkpoint at step 4 was "
            f"written, from step 3 to {now} (allowed: stages.0.steps=3 as the run was trained: only the "
            "current and later stages' steps may change)"
        )
    # a checkpoint without a record is placed by its own stages
    with pytest.raises(ConfigError, match=r"^stages.0.steps=4 moves the start of stage 1 'joint'"):
        stage_of_checkpoint(stages(4, 3, 3), 4, None, saved)
    # the checkpoint's stage and the ones after it may change length
    assert stage_of_checkpoint(stages(3, 5, 1), 4, 1, saved).name == "joint"
    assert stage_of_checkpoint(stages(3, 5, 1), 4, 1, None).name == "joint"


def test_describe_counts_a_recipes_global_batch_as_kept_on_any_number_of_processes():
    """With train.global_batch set, N processes keep the batch (each taking global / N); without it, they
    multiply it. The last line says which, and the totals count the batch that trains."""
    paper = load_config("recipe-fusedit-paper")
    model = build_model(paper, "meta")
    (stage, total) = describe_stages(paper, model)
    assert "batch 512x1 (global batch 512)" in stage
    assert total.endswith(
        "at each stage's global batch (N processes: the same batch and FLOPs, batch_size x grad_accum = "
        "global batch / N per process)"
    )
    # batch_size 64 on 8 GPUs: the same global batch, so the same FLOPs
    (_, on_eight) = describe_stages(
        load_config("recipe-fusedit-paper", ["stages.0.train.batch_size=64"]), model
    )
    assert on_eight == total
    opted_out = load_config("recipe-fusedit-paper", ["stages.0.train.global_batch=null"])
    (stage, total) = describe_stages(opted_out, model)
    assert "batch 512x1," in stage
    assert total.endswith(
        "at batch_size x grad_accum images per step (N processes: N times the batch and the FLOPs)"
    )
    lidit = load_config("recipe-lidit-3stage", ["stages.0.train.global_batch=null"])
    assert "where it is set" in describe_stages(lidit, build_model(lidit, "meta"))[-1]


def test_the_multi_node_docs_global_batch_opt_out_opts_a_recipe_out():
    """The override docs/multi-node.md gives to opt out of a recipe's global batch is one that does."""
    from pathlib import Path

    doc = (Path(__file__).parents[1] / "docs" / "multi-node.md").read_text()
    (row,) = [line for line in doc.splitlines() if line.startswith("| `train.global_batch`")]
    overrides = re.findall(r"`([\w.]*global_batch=null)`", row)
    assert overrides
    for override in overrides:
        key = override.replace(".N.", ".0.")
        for recipe in ("recipe-fusedit-paper", "recipe-lidit-3stage"):
            stages = resolved_stages(load_config(recipe, [key]))
            if key.startswith("stages."):
                assert stages[0].config.train.global_batch is None
            else:  # named as what does not opt a recipe's stage out
                assert stages[0].config.train.global_batch is not None
                assert "does not" in row or "wins over" in row
