import json
import logging
import re

import pytest
import torch

from conftest import tiny_config, tiny_vae, watch_llm_forwards
from fusedit.checkpoints import find_checkpoint, load_model
from fusedit.config import ConfigError
from fusedit.train.loop import train


def test_tiny_overfit_drives_the_loss_down(tmp_path):
    # Eight fixed image-caption pairs seen every step: the loss must fall far below where it starts.
    cfg = tiny_config(
        train={"steps": 60, "batch_size": 8, "lr": 3e-3, "checkpoint_every": 60},
        data={"caption_dropout": 0.0, "num_samples": 8},
    )
    losses = train(cfg, tmp_path / "run", progress=False)["losses"]
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last < 0.6 * first, (first, last)


def test_resume_continues_exactly(tmp_path, caplog):
    cfg = tiny_config(train={"steps": 6, "checkpoint_every": 3})
    full = train(cfg, tmp_path / "a", progress=False)["losses"]
    first = train(cfg, tmp_path / "b", stop_at=4, progress=False)["losses"]  # checkpoints at 3 and 4
    # simulate losing the last checkpoint: resume from step 3
    ckpts = tmp_path / "b" / "checkpoints"
    (ckpts / "latest").write_text("step_00000003")
    with caplog.at_level(logging.WARNING):
        rest = train(cfg, tmp_path / "b", resume=True, progress=False)["losses"]
    assert not [r for r in caplog.records if "changed setting" in r.getMessage()]  # nothing changed
    assert first == full[:4]
    assert rest == full[3:]  # bit-identical losses after resuming
    logged = [
        json.loads(line)["loss"] for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()
    ]
    assert logged == full


@pytest.mark.parametrize("bad", [0, -2])
def test_stop_at_below_one_is_a_one_line_error_that_leaves_the_run_alone(tmp_path, bad):
    cfg = tiny_config(train={"steps": 3, "checkpoint_every": 3})
    train(cfg, tmp_path / "run", progress=False)
    good = find_checkpoint(tmp_path / "run")
    with pytest.raises(
        ConfigError, match=rf"^stop_at={bad} is not allowed \(allowed: a step number, 1 or more"
    ):
        train(cfg, tmp_path / "run", stop_at=bad, progress=False)
    assert find_checkpoint(tmp_path / "run") == good  # not wiped as a fresh start would


def test_run_folder_contents_and_loading(tmp_path):
    cfg = tiny_config()
    result = train(cfg, tmp_path / "run", progress=False)
    ckpt = find_checkpoint(tmp_path / "run")
    assert ckpt.name == "step_00000006"
    names = {p.name for p in ckpt.iterdir()}
    assert {
        "denoiser.safetensors",
        "ema.safetensors",
        "llm.safetensors",
        "optimizer.pt",
        "state.json",
        "config.yaml",
    } <= names
    assert (tmp_path / "run" / "config.yaml").is_file()
    assert len(list((tmp_path / "run" / "checkpoints").glob("step_*"))) == 2  # keep_checkpoints
    model, loaded_cfg, _ = load_model(tmp_path / "run", use_ema=True)
    assert loaded_cfg == cfg
    ema = result["ema"].state_dict()
    for k, v in model.denoiser.state_dict().items():
        assert torch.equal(v, ema[k])


def test_resume_with_a_real_vae_draws_the_same_latents(tmp_path):
    """A diffusers VAE samples its posterior at every step: that draw, like the flow's noise, comes from
    (seed, step, position), so a resumed run gets the uninterrupted run's latents and losses."""
    torch.manual_seed(0)
    tiny_vae().save_pretrained(tmp_path / "vae")
    vae = {"kind": "diffusers", "model_id": str(tmp_path / "vae"), "latent_channels": 4, "downsample": 2}
    cfg = tiny_config(vae=vae, train={"steps": 4, "checkpoint_every": 2})
    full = train(cfg, tmp_path / "a", progress=False)["losses"]
    train(cfg, tmp_path / "b", stop_at=2, progress=False)
    torch.rand(100)  # whatever the process drew before does not matter
    assert train(cfg, tmp_path / "b", resume=True, progress=False)["losses"] == full[2:]


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"source": "folder", "root": "/no/such/folder"}, "data.root='/no/such/folder' is not a folder"),
        ({"source": "folder"}, "data.source=folder needs data.root (an image folder) or data.index_file"),
        ({"source": "latents"}, "data.source=latents needs data.latents_dir"),
        (
            {"source": "webdataset", "shards": ["/no/{0..3}.tar"]},
            "data.shards entry '/no/{0..3}.tar': 4 of 4 shards do not exist (first: '/no/0.tar')",
        ),
        ({"source": "webdataset"}, "data.shards=[] must be a non-empty list of shard patterns"),
    ],
)
def test_a_bad_data_path_fails_before_the_model_is_built(tmp_path, monkeypatch, data, message):
    import fusedit.train.loop as loop

    def not_built(*args, **kwargs):
        raise AssertionError("the model was built before the data paths were checked")

    monkeypatch.setattr(loop, "build_model", not_built)
    with pytest.raises(ConfigError, match=re.escape(message)):
        train(tiny_config(data=data), tmp_path / "run", progress=False)


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint in"):
        find_checkpoint(tmp_path)


def test_training_runs_the_llm_once_per_step_without_autograd(tmp_path, monkeypatch):
    calls = watch_llm_forwards(monkeypatch)
    train(tiny_config(train={"steps": 3, "checkpoint_every": 3}), tmp_path / "run", progress=False)
    assert calls == [False, False, False]  # one LLM forward per step, none of them recording a graph


def test_nan_steps_are_skipped_and_counted_then_stop_the_run(tmp_path, monkeypatch):
    import fusedit.train.loop as loop

    real = loop.flow_loss
    calls = {"n": 0}

    def sometimes_nan(v, x0, noise):
        calls["n"] += 1
        loss = real(v, x0, noise)
        return loss * float("nan") if calls["n"] == 2 else loss

    monkeypatch.setattr(loop, "flow_loss", sometimes_nan)
    cfg = tiny_config(train={"steps": 6, "checkpoint_every": 4})
    result = train(cfg, tmp_path / "a", stop_at=4, progress=False)
    assert result["skipped_steps"] == 1 and len(result["losses"]) == 4
    assert all(torch.isfinite(p).all() for p in result["model"].denoiser.parameters())
    state = json.loads((find_checkpoint(tmp_path / "a") / "state.json").read_text())
    assert state["skipped_steps"] == 1
    # The count is the run's: a resume goes on from it.
    monkeypatch.setattr(loop, "flow_loss", real)
    assert train(cfg, tmp_path / "a", resume=True, progress=False)["skipped_steps"] == 1
    assert json.loads((find_checkpoint(tmp_path / "a") / "state.json").read_text())["skipped_steps"] == 1

    # Bad steps in a row stop the run, counted across a resume too (2 before it, the 3rd after).
    monkeypatch.setattr(loop, "flow_loss", lambda v, x0, noise: real(v, x0, noise) * float("nan"))
    cfg = tiny_config(train={"steps": 10, "max_bad_steps": 3, "checkpoint_every": 2})
    train(cfg, tmp_path / "b", stop_at=2, progress=False)
    with pytest.raises(
        FloatingPointError, match=r"3 steps in a row had a NaN/inf loss or gradient .* at step 3"
    ):
        train(cfg, tmp_path / "b", resume=True, progress=False)


def test_webdataset_training_resumes_exactly_with_its_data_position(tmp_path):
    from fusedit.data.shapes import vocabulary
    from fusedit.text.tokenizer import word_tokenizer
    from test_data_sources import _write_shards

    shards = _write_shards(tmp_path / "shards", "wds", shards=2, per_shard=6, corrupt=((0, 2),))
    word_tokenizer(vocabulary() + ["wds", "json", "0", "1", "2", "3", "4", "5"]).save_pretrained(
        tmp_path / "tok"
    )
    cfg = tiny_config(
        data={"source": "webdataset", "shards": shards, "min_image_size": 16},
        text={"tokenizer": str(tmp_path / "tok")},
        train={"steps": 6, "checkpoint_every": 3},
    )
    full = train(cfg, tmp_path / "a", progress=False)["losses"]
    first = train(cfg, tmp_path / "b", stop_at=3, progress=False)["losses"]
    assert (find_checkpoint(tmp_path / "b") / "data_state.json").is_file()
    rest = train(cfg, tmp_path / "b", resume=True, progress=False)["losses"]
    assert first + rest == full


def test_gradient_checkpointing_and_compiled_blocks_give_the_same_training(tmp_path):
    base = train(tiny_config(train={"steps": 3, "checkpoint_every": 3}), tmp_path / "a", progress=False)
    ckpt = train(
        tiny_config(train={"steps": 3, "checkpoint_every": 3, "grad_checkpointing": True}),
        tmp_path / "b",
        progress=False,
    )
    assert ckpt["model"].denoiser.run_block.__name__ == "_run_block_checkpointed"
    torch.testing.assert_close(torch.tensor(ckpt["losses"]), torch.tensor(base["losses"]))
    # "eager" traces every block with torch.compile without generating code: fast enough for CPU CI
    comp = train(
        tiny_config(train={"steps": 3, "checkpoint_every": 3, "compile": "eager"}),
        tmp_path / "c",
        progress=False,
    )
    torch.testing.assert_close(torch.tensor(comp["losses"]), torch.tensor(base["losses"]))


def test_preview_grids_are_written_during_training(tmp_path):
    from PIL import Image

    train(
        tiny_config(train={"steps": 4, "checkpoint_every": 4, "preview_every": 2}),
        tmp_path / "run",
        progress=False,
    )
    previews = sorted((tmp_path / "run" / "previews").glob("*.png"))
    assert [p.name for p in previews] == ["step_00000002.png", "step_00000004.png"]
    assert Image.open(previews[0]).size[0] > 0


def test_preview_image_i_starts_from_the_noise_of_sample_seed_plus_i(tmp_path, monkeypatch):
    """As `fusedit sample` draws it, so a preview image is one `fusedit sample --seed` makes again; they
    were drawn as one batch from sample.seed, whatever the schema's note said."""
    import fusedit.sampling.generation as sampling

    calls, real = [], sampling.generate
    monkeypatch.setattr(
        sampling,
        "generate",
        lambda model, prompts, **kw: calls.append((prompts, kw)) or real(model, prompts, **kw),
    )
    cfg = tiny_config(train={"steps": 2, "checkpoint_every": 2, "preview_every": 2}, sample={"seed": 7})
    train(cfg, tmp_path / "run", progress=False)
    ((captions, kw),) = calls
    shape = (cfg.vae.latent_channels, cfg.data.image_size, cfg.data.image_size)
    assert len(captions) > 1 and torch.equal(
        kw["noise"], sampling.seeded_noise([7 + i for i in range(len(captions))], shape)
    )


def test_resuming_with_another_model_is_a_one_line_error(tmp_path, monkeypatch, caplog):
    import fusedit.train.loop as loop
    from conftest import TINY_ARCH
    from fusedit.config import ConfigError, load_config

    run = tmp_path / "run"
    trained = tiny_config(train={"steps": 1})
    train(trained, run, progress=False)
    build = loop.build_model

    def not_built(*args, **kwargs):
        raise AssertionError("the model was built before the resume was refused")

    monkeypatch.setattr(loop, "build_model", not_built)
    cases = [
        ({"model": {"dit_hidden_size": 64}}, "model.dit_hidden_size=32, this config has 64"),
        # Same weight shapes, another model: caught by the config, not by the weights.
        ({"model": {"pos_embed": "2d-rope"}}, "model.pos_embed='ape', this config has '2d-rope'"),
        ({"text": {"hidden_layer": -2}}, "text.hidden_layer=-1, this config has -2"),
        ({"text": {"arch": {**TINY_ARCH, "num_hidden_layers": 4}}}, "text.arch={"),
        ({"model": {"qk_norm": False}}, "model.qk_norm=True, this config has False"),
    ]
    for change, detail in cases:
        with pytest.raises(ConfigError, match="a resumed run keeps its model") as e:
            train(tiny_config(train={"steps": 2}, **change), run, resume=True, progress=False)
        message = str(e.value)
        assert detail in message and "\n" not in message, message
        assert "another --out" in message and "train.init_from" in message
    assert load_config(run / "config.yaml") == trained  # the refused resumes left the run as it was
    monkeypatch.setattr(loop, "build_model", build)
    # How the model is run may change: the attention kernel, the text padding, the recipe.
    changed = {
        "model": {"attention_backend": "math"},
        "text": {"trim_padding": False, "attn_implementation": "eager"},
        "flow": {"shift": 2.0},
    }
    with caplog.at_level(logging.WARNING):
        resumed = train(tiny_config(train={"steps": 2}, **changed), run, resume=True, progress=False)
    assert resumed["step"] == 2
    # ... and is named: a resumed run goes on under the new settings (a longer run is no news).
    assert [r.getMessage() for r in caplog.records if "changed setting" in r.getMessage()] == [
        "resuming step_00000001 with 4 changed setting(s): flow.shift: 1.0 -> 2.0; "
        "model.attention_backend: 'auto' -> 'math'; text.attn_implementation: 'auto' -> 'eager'; "
        "text.trim_padding: True -> False"
    ]
    with pytest.raises(
        ConfigError, match=r"the run is at step 2, past train.steps=1 \(allowed: train.steps >= 2"
    ):
        train(trained, run, resume=True, progress=False)


def test_a_resumed_run_finds_its_model_files_moved(tmp_path):
    """A model folder (here the tokenizer's) moved since the run started: the resume names the new place
    and goes on; another folder while the old one is still there is another model, refused."""
    import shutil

    from fusedit.config import ConfigError
    from fusedit.data.shapes import vocabulary
    from fusedit.text.tokenizer import word_tokenizer

    word_tokenizer(vocabulary()).save_pretrained(tmp_path / "tok")
    run = tmp_path / "run"
    train(tiny_config(train={"steps": 1}, text={"tokenizer": str(tmp_path / "tok")}), run, progress=False)
    shutil.copytree(tmp_path / "tok", tmp_path / "other")
    with pytest.raises(ConfigError, match="was trained with text.tokenizer=.*a resumed run keeps its model"):
        train(tiny_config(text={"tokenizer": str(tmp_path / "other")}), run, resume=True, progress=False)
    (tmp_path / "tok").rename(tmp_path / "moved")
    moved = tiny_config(train={"steps": 2}, text={"tokenizer": str(tmp_path / "moved")})
    assert train(moved, run, resume=True, progress=False)["step"] == 2


def test_a_checkpoint_of_other_weights_is_refused_before_loading(tmp_path):
    """The config check aside (a checkpoint's config.yaml replaced by hand), weights that do not fit are a
    one-line error naming the first one, before anything is loaded."""
    import shutil

    from fusedit.config import ConfigError, save_config

    run = tmp_path / "run"
    train(tiny_config(train={"steps": 1}), run, progress=False)
    wider = tiny_config(train={"steps": 2}, model={"dit_hidden_size": 64})
    for path in (run / "config.yaml", find_checkpoint(run) / "config.yaml"):
        save_config(wider, path)
    with pytest.raises(ConfigError, match=r"does not fit the configured model: denoiser weight ") as e:
        train(wider, run, resume=True, progress=False)
    assert re.search(
        r"'patch_embed\.proj\.weight' has shape \[32, 12\] in the checkpoint but \[64, 12\]", str(e.value)
    )
    shutil.rmtree(run)


def test_weights_mismatch_reads_the_shapes_of_both_checkpoint_formats(tmp_path):
    import warnings

    import torch.distributed.checkpoint as dcp
    from safetensors.torch import save_file

    from fusedit.checkpoints import weights_mismatch

    plain, dist = tmp_path / "plain", tmp_path / "dist"
    plain.mkdir()
    save_file({"w": torch.zeros(2, 3)}, plain / "denoiser.safetensors")
    # An optimizer section holds other shapes under the same parameter name: it is not compared.
    state = {"model": {"w": torch.zeros(2, 3)}, "optim": {"state": {"w": {"exp_avg": torch.zeros(4)}}}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save(state, checkpoint_id=dist / "dcp", no_dist=True)
    w, other = torch.zeros(2, 3), torch.zeros(3, 3)
    for ckpt in (plain, dist):
        assert weights_mismatch(ckpt, {"denoiser": {"w": w}, "llm": {"x": w}}) is None  # no llm saved
        assert weights_mismatch(ckpt, {"denoiser": {"w": other}}) == (
            "denoiser weight 'w' has shape [2, 3] in the checkpoint but [3, 3] in the configured model"
        )
        missing = weights_mismatch(ckpt, {"denoiser": {"w": w, "v": w}})
        assert missing == "denoiser weight 'v' of the configured model is not in the checkpoint"
        left = weights_mismatch(ckpt, {"denoiser": {}})
        assert left == "denoiser weight 'w' of the checkpoint has no place in the configured model"
        adapters = weights_mismatch(ckpt, {"denoiser": {"w": w}, "denoiser_lora": {"a.lora_A": w}})
        assert adapters == "adapter 'a.lora_A' of the configured model is not in the checkpoint"


def _training_warnings(caplog, cfg, run_dir, about: str) -> list[str]:
    """The warnings that training ``cfg`` into ``run_dir`` logs about ``about``."""
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="fusedit"):
        train(cfg, run_dir, progress=False)
    return [r.getMessage() for r in caplog.records if about in r.getMessage()]


def test_a_warmup_longer_than_its_run_or_stage_is_warned_about_once(tmp_path, caplog):
    def warmup_warnings(cfg, run_dir) -> list[str]:
        return _training_warnings(caplog, cfg, run_dir, "warmup_steps")

    cfg = tiny_config(train={"steps": 2, "warmup_steps": 5, "checkpoint_every": 2})
    assert warmup_warnings(cfg, tmp_path / "a") == [
        "train.warmup_steps=5 exceeds the 2 steps of the run: the learning rate peaks at 0.0004 instead of "
        "train.lr=0.001 (allowed: warmup_steps <= 2 to reach it)"
    ]
    assert warmup_warnings(tiny_config(train={"steps": 2, "warmup_steps": 2}), tmp_path / "b") == []
    # Each stage's schedule counts from its own first step: its warmup is checked against its own steps.
    stages = [
        {"name": "short", "steps": 1, "train": {"warmup_steps": 2}},
        {"name": "long", "steps": 2, "train": {"warmup_steps": 2}},
    ]
    messages = warmup_warnings(tiny_config(stages=stages, train={"checkpoint_every": 3}), tmp_path / "c")
    assert len(messages) == 1 and "exceeds the 1 steps of stage 0 (short)" in messages[0]


def test_a_hidden_layer_that_deep_fusion_never_reads_is_warned_about(tmp_path, caplog):
    def hidden_layer_warnings(cfg, run_dir) -> list[str]:
        return _training_warnings(caplog, cfg, run_dir, "hidden_layer")

    cfg = tiny_config(text={"hidden_layer": -2}, train={"steps": 1})
    assert hidden_layer_warnings(cfg, tmp_path / "deep") == [
        "text.hidden_layer=-2 does nothing for model.design='fusedit', which fuses the LLM layer by layer "
        "(model.num_layers, model.initial_layers); the shallow designs read it"
    ]
    shallow = tiny_config(model={"design": "dit-cross"}, text={"hidden_layer": -2}, train={"steps": 1})
    assert hidden_layer_warnings(shallow, tmp_path / "shallow") == []


def test_truncated_prompts_are_counted_in_metrics_checkpoints_and_the_summary(tmp_path, caplog):
    from fusedit.data.loader import step_loader

    # text.max_length=4 leaves 3 prompt tokens after BOS: the longer shapes captions are cut.
    cfg = tiny_config(
        text={"max_length": 4}, data={"caption_dropout": 0.0}, train={"steps": 4, "checkpoint_every": 2}
    )
    with caplog.at_level(logging.INFO, logger="fusedit"):
        full = train(cfg, tmp_path / "a", progress=False)
    encoder = full["model"].text
    captions = [c for batch in step_loader(cfg.data, 0, 4, 0, 4) for c in batch["caption"]]
    lengths = [len(ids) for ids in encoder.tokenizer(captions, add_special_tokens=False)["input_ids"]]
    expected = sum(n > encoder.budget for n in lengths)
    assert 0 < expected < len(captions) and full["truncated_prompts"] == expected
    summary = [r.getMessage() for r in caplog.records if r.getMessage().startswith("text: ")]
    assert summary == [
        f"text: {expected} prompts longer than text.max_length=4 tokens were truncated in this run (to step 4)"
    ]

    def counts(run_dir) -> list:
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
        return [json.loads(line).get("truncated") for line in lines]

    logged = counts(tmp_path / "a")
    assert logged[-1] == expected and logged == sorted(logged, key=lambda n: n or 0)

    def first_warnings() -> list[str]:
        return [r.getMessage() for r in caplog.records if "later truncations are only" in r.getMessage()]

    # The run says its first truncation, at its step, and only counts the later ones.
    step = next(i for i, n in enumerate(logged) if n) + 1
    rows = range(4 * (step - 1), 4 * step)  # that step's captions (batch 4, no dropout)
    example = next(captions[i] for i in rows if lengths[i] > encoder.budget)
    first = first_warnings()
    some = "a prompt" if logged[step - 1] == 1 else f"{logged[step - 1]} prompts"
    assert first == [
        f"step {step}: {some} longer than text.max_length=4 tokens {'was' if logged[step - 1] == 1 else 'were'} truncated, e.g. "
        f'{example!r}; later truncations are only counted (metrics.jsonl\'s "truncated", and a total at the end)'
    ]
    # The count is the run's: it goes on across a resume, exactly as in the uninterrupted run, which says
    # its first truncation once.
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="fusedit"):
        train(cfg, tmp_path / "b", stop_at=2, progress=False)
        state = json.loads((find_checkpoint(tmp_path / "b") / "state.json").read_text())
        assert state["truncated_prompts"] == (logged[1] or 0)
        assert train(cfg, tmp_path / "b", resume=True, progress=False)["truncated_prompts"] == expected
    assert counts(tmp_path / "b") == logged
    assert first_warnings() == first


def test_a_resume_that_changes_the_prompt_limit_counts_its_truncations_afresh(tmp_path, caplog):
    """text.max_length=4 to step 2, then 6: the count at 4 is said at the resume and not carried (prompts
    cut at 4 need not be cut at 6), the first cut at 6 is said with its example, and the total counts the
    cuts at 6 since the resume."""
    from fusedit.data.loader import step_loader

    def config(limit: int):
        return tiny_config(
            text={"max_length": limit},
            data={"caption_dropout": 0.0},
            train={"steps": 4, "checkpoint_every": 2},
        )

    run = tmp_path / "run"
    train(config(4), run, stop_at=2, progress=False)
    before = json.loads((find_checkpoint(run) / "state.json").read_text())
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="fusedit"):
        result = train(config(6), run, resume=True, progress=False)
    encoder = result["model"].text
    captions = [c for batch in step_loader(config(6).data, 0, 4, 2, 4) for c in batch["caption"]]
    lengths = [len(ids) for ids in encoder.tokenizer(captions, add_special_tokens=False)["input_ids"]]
    expected = sum(n > encoder.budget for n in lengths)
    assert before["truncated_prompts"] > 0 and result["truncated_prompts"] == expected > 0
    messages = [r.getMessage() for r in caplog.records]
    some = (
        "a prompt was" if before["truncated_prompts"] == 1 else f"{before['truncated_prompts']} prompts were"
    )
    assert (
        f"text: {some} truncated at text.max_length=4 to step 2; counted again from here at text.max_length=6"
        in messages
    )
    first = [m for m in messages if "later truncations are only counted" in m]
    assert len(first) == 1 and "longer than text.max_length=6 tokens" in first[0]
    assert [m for m in messages if m.startswith("text: ") and "(to step" in m] == [
        f"text: {expected} prompt{'s' if expected > 1 else ''} longer than text.max_length=6 tokens "
        f"{'were' if expected > 1 else 'was'} truncated since the resume at step 2 that set this limit (to step 4)"
    ]
    assert (before["truncated_prompts_at"], before["truncated_prompts_since"]) == ("text.max_length=4", 0)
    after = json.loads((find_checkpoint(run) / "state.json").read_text())
    assert [after[k] for k in ("truncated_prompts", "truncated_prompts_at", "truncated_prompts_since")] == [
        expected,
        "text.max_length=6",
        2,
    ]


def test_the_first_truncation_shows_a_long_caption_clipped_and_marked_so(tmp_path, caplog):
    from test_data_sources import _noise

    root = tmp_path / "images"
    root.mkdir()
    caption = "a red circle left of a blue square " * 4  # 140 characters, far past text.max_length=4
    for i in range(4):
        _noise(16, 16, i).save(root / f"{i}.png")
        (root / f"{i}.txt").write_text(caption)
    data = {"source": "folder", "root": str(root), "caption_dropout": 0.0}
    cfg = tiny_config(data=data, text={"max_length": 4}, train={"steps": 1})
    with caplog.at_level(logging.WARNING, logger="fusedit"):
        train(cfg, tmp_path / "run", progress=False)
    (first,) = [
        r.getMessage() for r in caplog.records if "later truncations are only counted" in r.getMessage()
    ]
    assert f"e.g. {caption[:79] + '…'!r};" in first


def test_resuming_on_a_folder_that_changed_size_warns_once_and_trains_on(tmp_path, caplog):
    from test_data_sources import _noise

    root = tmp_path / "images"
    root.mkdir()

    def add(names):
        for i, name in enumerate(names):
            _noise(16, 16, i).save(root / f"{name}.png")
            (root / f"{name}.txt").write_text(f"a red {'circle' if i % 2 else 'square'}")

    add([f"a{i}" for i in range(6)])
    cfg = tiny_config(data={"source": "folder", "root": str(root)}, train={"steps": 4, "checkpoint_every": 2})
    train(cfg, tmp_path / "run", stop_at=2, progress=False)
    state = json.loads((find_checkpoint(tmp_path / "run") / "data_state.json").read_text())
    assert state["samples"] == 6
    add([f"b{i}" for i in range(3)])
    with caplog.at_level(logging.WARNING, logger="fusedit"):
        result = train(cfg, tmp_path / "run", resume=True, progress=False)
    warnings = [r.getMessage() for r in caplog.records if r.getMessage().startswith("data: the dataset has")]
    assert warnings == [
        "data: the dataset has 9 samples, not the 6 it had when the data position was saved; the run goes on "
        "at the same step in a new order of the 9, so the current epoch may repeat or miss samples read "
        "before the resume"
    ]
    assert result["step"] == 4 and len(result["losses"]) == 2


@pytest.mark.parametrize("progress", [True, False])
def test_training_shows_the_data_scan_bar_only_with_progress(tmp_path, capsys, progress):
    from test_data_sources import _noise

    root = tmp_path / "images"
    root.mkdir()
    for i in range(4):
        _noise(16, 16, i).save(root / f"a{i}.png")
        (root / f"a{i}.txt").write_text("a red circle")
    cfg = tiny_config(data={"source": "folder", "root": str(root)}, train={"steps": 1})
    train(cfg, tmp_path / "run", progress=progress)
    bars = capsys.readouterr().err
    assert ("scan images" in bars, "train " in bars) == (progress, progress)


def test_the_ema_update_lerps_every_float_tensor_and_copies_the_rest():
    """One multi-tensor lerp for all float weights (bf16 ones averaged in float32), integer buffers copied
    (the average holds every tensor in float32)."""
    from fusedit.train.ema import EMA

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    net[0].to(torch.bfloat16)
    ema, held = EMA(net, 0.9), EMA(net, 0.9, offload=True)
    before = {k: v.clone() for k, v in ema.state_dict().items()}
    with torch.no_grad():
        for p in net.parameters():
            p.add_(1.0)
    net[1].num_batches_tracked.fill_(7)
    ema.update(net)
    held.update(net)
    for k, v in net.state_dict().items():
        expected = before[k].lerp(v.float(), 0.1) if v.is_floating_point() else v.float()
        assert ema.state_dict()[k].dtype == torch.float32 and torch.equal(ema.state_dict()[k], expected), k
        assert held.state_dict()[k].device.type == "cpu" and torch.equal(held.state_dict()[k], expected), k


def test_an_offloaded_ema_update_runs_beside_training_on_a_snapshot_of_the_weights(monkeypatch):
    """train.ema_offload: update() returns once the copies are queued and a host thread lerps; the weights
    may change meanwhile (the next optimizer step), the average takes them as they were; reading it waits,
    and a failed update is raised there, naming the setting."""
    import threading

    from fusedit.train import ema as ema_module

    torch.manual_seed(0)
    net = torch.nn.Linear(3, 4)
    held = ema_module.EMA(net, 0.9, offload=True)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    gate, real_lerp = threading.Event(), ema_module._lerp
    monkeypatch.setattr(ema_module, "_lerp", lambda *a: gate.wait(10) and real_lerp(*a))
    with torch.no_grad():
        net.weight.add_(1.0)
    taken = {k: v.clone() for k, v in net.state_dict().items()}
    held.update(net)
    assert held.busy  # still waiting at the gate
    with torch.no_grad():
        net.weight.mul_(100.0)  # the next step's update, while the host thread works
    gate.set()
    for k, v in held.state_dict().items():
        assert not held.busy and torch.equal(v, before[k].lerp(taken[k], 0.1)), k

    def fail(*a):
        raise MemoryError("host out of memory")

    monkeypatch.setattr(ema_module, "_lerp", fail)
    held.update(net)
    with pytest.raises(
        RuntimeError, match=r"^the host-held EMA's update failed \(train.ema_offload\): host out"
    ):
        held.state_dict()
    assert held.state_dict().keys() == before.keys()  # raised once


def test_an_offloaded_ema_trains_and_resumes_like_one_beside_the_weights(tmp_path):
    """train.ema_offload moves where the average is held, not what it holds; FSDP refuses it (its shards
    are already spread over the GPUs)."""
    from fusedit.config import resolved_stages
    from fusedit.train.stages import _check_stages_fit

    emas = []
    for offload in (False, True):
        cfg = tiny_config(train={"steps": 4, "checkpoint_every": 2, "ema_every": 1, "ema_offload": offload})
        run = tmp_path / f"run{offload}"
        train(cfg, run, stop_at=2, progress=False)
        emas.append(train(cfg, run, resume=True, progress=False)["ema"].state_dict())
    assert emas[0].keys() == emas[1].keys()
    assert all(torch.equal(emas[0][k], emas[1][k]) for k in emas[0])
    with pytest.raises(
        ConfigError, match=r"^train.ema_offload=true keeps a whole EMA on the host, while train"
    ):
        _check_stages_fit(resolved_stages(cfg), "fsdp", False)


def test_the_ema_updates_after_every_ema_every_th_step(tmp_path, monkeypatch):
    """design-space.md s.3: EMA 0.99 every 100 steps; here every 3rd of 7 steps: after steps 3 and 6."""
    from fusedit.train.ema import EMA
    from fusedit.train.stages import Optimizers

    stepped, updated = [], []
    real_step, real_update = Optimizers.step, EMA.update
    monkeypatch.setattr(Optimizers, "step", lambda self: stepped.append(1) or real_step(self))
    monkeypatch.setattr(EMA, "update", lambda self, m: updated.append(len(stepped)) or real_update(self, m))
    train(
        tiny_config(train={"steps": 7, "checkpoint_every": 7, "ema_every": 3}),
        tmp_path / "run",
        progress=False,
    )
    assert (len(stepped), updated) == (7, [3, 6])


def test_the_weights_change_only_after_the_ema_settles(tmp_path, monkeypatch):
    """train.ema_offload copies the weights on a stream of its own beside the next step: every optimizer
    step, and a later stage's change of the trainable parts (merging adapters), comes after EMA.settle,
    which makes the training stream wait for those copies."""
    from fusedit.train import loop
    from fusedit.train.ema import EMA
    from fusedit.train.stages import Optimizers

    events = []
    real_settle, real_step, real_parts = EMA.settle, Optimizers.step, loop.apply_parts
    monkeypatch.setattr(EMA, "settle", lambda self: events.append("settle") or real_settle(self))
    monkeypatch.setattr(Optimizers, "step", lambda self: events.append("step") or real_step(self))
    monkeypatch.setattr(loop, "apply_parts", lambda *a, **k: events.append("parts") or real_parts(*a, **k))
    stages = [{"name": "a", "steps": 2}, {"name": "b", "steps": 2, "train": {"dit_lora": {"rank": 2}}}]
    train(
        tiny_config(stages=stages, train={"ema_every": 1, "ema_offload": True}),
        tmp_path / "run",
        progress=False,
    )
    steps = ["settle", "step"] * 2
    assert events == ["parts", *steps, "settle", "parts", *steps]


def test_a_full_disk_at_a_checkpoint_stops_training_saying_what_is_kept(tmp_path, monkeypatch):
    """train() called from Python: a save the disk refuses stops the run with RunStopped (not a bug's
    traceback): what failed, then the checkpoint to resume from; the half-written folder is gone."""
    from pathlib import Path

    from safetensors import SafetensorError

    import fusedit.train.checkpoint as checkpoint
    from fusedit.config import RunStopped

    real = checkpoint.save_file

    def full_disk(tensors, path, *args, **kwargs):
        if Path(path).parent.name == ".step_00000004.partial":
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        return real(tensors, path, *args, **kwargs)

    monkeypatch.setattr(checkpoint, "save_file", full_disk)
    with pytest.raises(RunStopped) as e:
        train(tiny_config(train={"steps": 4, "checkpoint_every": 2}), tmp_path / "run", progress=False)
    root = tmp_path / "run" / "checkpoints"
    assert e.value.reason.startswith(
        f"checkpoint step 4 was not saved: writing denoiser.safetensors in {str(root)!r} failed (I/O error: No "
        "space left on device (os error 28)); its partial folder is deleted (a checkpoint takes about "
    )
    assert e.value.kept == (
        f"the last checkpoint is {root / 'step_00000002'} (steps 3-4 are redone): resume from it "
        "(train(..., resume=True); `fusedit train --resume`)"
    )
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_00000002"]


@pytest.mark.parametrize(("calls", "redone"), [(5, "step 4 is redone"), (6, "steps 4-5 are redone")])
def test_ctrl_c_says_which_steps_a_resume_trains_again(tmp_path, monkeypatch, calls, redone):
    """Stopped in step ``calls`` with the checkpoint of step 3: the steps logged past it are lost."""
    from test_library_train import _interrupted_at

    run = tmp_path / "run"
    _interrupted_at(monkeypatch, "flow_loss", calls=calls)
    with pytest.raises(KeyboardInterrupt) as stopped:
        train(tiny_config(train={"steps": 6, "checkpoint_every": 3}), run, progress=False)
    assert stopped.value.__notes__ == [
        f"the last checkpoint is {run / 'checkpoints' / 'step_00000003'} ({redone}): resume from it "
        "(train(..., resume=True); `fusedit train --resume`)"
    ]


def test_a_resume_that_moves_the_cosine_schedule_says_how_the_learning_rate_jumps(tmp_path, caplog):
    """A finished cosine run (LR about 0 at its end) extended from 4 to 8 steps: its next step trains at
    the stretched schedule's LR; not said for a constant schedule, nor for an unchanged train.steps."""
    import math

    def config(steps: int, schedule: str = "cosine"):
        return tiny_config(train={"steps": steps, "schedule": schedule, "lr": 1e-3, "checkpoint_every": 4})

    def warnings() -> list[str]:
        return [r.getMessage() for r in caplog.records if r.getMessage().startswith("train.steps ")]

    train(config(4), tmp_path / "cos", progress=False)
    with caplog.at_level(logging.WARNING, logger="fusedit"):
        train(config(8), tmp_path / "cos", resume=True, stop_at=5, progress=False)
    new = 1e-3 * 0.5 * (1 + math.cos(math.pi * 4 / 8))
    assert warnings() == [
        f"train.steps 4 -> 8 stretches the cosine schedule: the learning rate of step 5 is {new:.3g}, where "
        "train.steps=4 gave 0"
    ]
    metrics = [json.loads(line) for line in (tmp_path / "cos" / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["step"] == 5 and metrics[-1]["lr"] == pytest.approx(new)
    caplog.clear()
    train(config(4, "constant"), tmp_path / "flat", progress=False)
    with caplog.at_level(logging.WARNING, logger="fusedit"):
        train(config(8, "constant"), tmp_path / "flat", resume=True, stop_at=5, progress=False)
        train(config(8, "cosine"), tmp_path / "cos", resume=True, stop_at=6, progress=False)
    assert warnings() == []
    # The rate before is the checkpoint's, of its own schedule (h-review M2: the cosine one gave 0 here).
    train(config(4, "constant"), tmp_path / "was-flat", progress=False)
    with caplog.at_level(logging.WARNING, logger="fusedit"):
        train(config(8), tmp_path / "was-flat", resume=True, stop_at=5, progress=False)
    assert warnings() == [
        f"train.steps 4 -> 8 with train.schedule constant -> cosine: the learning rate of step 5 is {new:.3g}, "
        "where train.steps=4, train.schedule=constant gave 0.001"
    ]


def test_grad_clip_0_trains_unclipped_and_still_logs_the_norm(tmp_path, monkeypatch):
    """train.grad_clip=0 turns clipping off (as a clip no norm reaches does) and the logged grad_norm is
    still the measured one; a clip below the norms changes the training. At 0 the gradients are only
    measured (torch >= 2.6): clip_grad_norm_ with an infinite limit also multiplied each by 1."""
    clip_calls = []
    clip_grad_norm = torch.nn.utils.clip_grad_norm_
    monkeypatch.setattr(
        torch.nn.utils,
        "clip_grad_norm_",
        lambda p, limit: clip_calls.append(limit) or clip_grad_norm(p, limit),
    )

    def run(clip: float, name: str) -> tuple[list[float], list[float]]:
        out = train(tiny_config(train={"steps": 3, "grad_clip": clip}), tmp_path / name, progress=False)
        records = [json.loads(line) for line in (out["run_dir"] / "metrics.jsonl").read_text().splitlines()]
        return out["losses"], [r["grad_norm"] for r in records]

    off, never = run(0, "off"), run(1e9, "never")
    assert off == never
    if hasattr(torch.nn.utils, "get_total_norm"):
        assert clip_calls == [1e9] * 3  # the run at 0 measured alone
    clipped = run(min(never[1]) / 4, "clipped")
    assert clipped[0][0] == off[0][0] and clipped[0][1:] != off[0][1:]
