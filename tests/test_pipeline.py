"""Hugging Face formats: the diffusers components (fusedit.hub) and FuseDiTPipeline with its folder writers
and readers (fusedit.pipeline).

Every check that matters here is exact: a saved and reloaded model, the pipeline and fusedit's own
``generate`` must give the same velocities and the same images, not close ones."""

import importlib
import json
import logging
import re

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from conftest import TINY_ARCH, TINY_CLIP_ARCH, randomize, tiny_config, tiny_vae
from fusedit import hub
from fusedit.checkpoints import load_model
from fusedit.flow import sampling_times
from fusedit.imaging import to_uint8
from fusedit.pipeline import FuseDiTPipeline, export_run, from_pretrained, save_pretrained
from fusedit.sampling.generation import generate, seeded_noise
from fusedit.system import build_model
from fusedit.train.checkpoint import save_checkpoint
from fusedit.vae import DiffusersAutoencoder, load_autoencoder

PROMPTS = ["a red circle", "two blue squares to the left of a green triangle"]
NEGATIVE = "a yellow square"
SAMPLE = {"steps": 3, "guidance": 3.0, "shift": 3.0}  # shift != 1 so the schedule's rounding is exercised

QWEN = {
    "family": "qwen2",
    "arch": {**TINY_ARCH, "hidden_size": 48, "head_dim": 12, "num_hidden_layers": 4},
    "template": "lidit",
    "hidden_layer": -3,  # the saved Qwen is cut to 2 of its 4 layers
    "max_length": 40,
}


def saved_tiny_vae(folder):
    tiny_vae(scaling_factor=1.5, shift_factor=0.25).save_pretrained(folder)
    return str(folder)


def variant(name, tmp_path):
    """A tiny config per kind of component a pipeline folder can hold."""
    if name == "fusedit":  # deep fusion, pixel space, Gemma-2 (per-layer config lists), LLM cut to 2 layers
        return tiny_config(sample=SAMPLE, text={"family": "gemma2"}, model={"num_layers": 2})
    if name == "lidit":  # two LLMs of two families, refiners, refined pooled text
        return tiny_config(
            sample=SAMPLE,
            model={
                "design": "dit-cross",
                "pos_embed": "none",
                "conv_pos": True,
                "refiner_depth": 1,
                "refiner_heads": 4,
                "pooled_text": "refined",
            },
            text={"template": "lidit", "hidden_layer": -2, "max_length": 40},
            extra_text=[QWEN],
        )
    if name == "clip-mod":  # a pooled CLIP encoder, which reads the instruction as the LLM does
        return tiny_config(
            sample=SAMPLE,
            text={"instruction": "draw: "},
            model={"pooled_text": "clip"},
            pooled_text={"arch": TINY_CLIP_ARCH, "max_length": 16},
        )
    # a real latent space: a diffusers AutoencoderKL with its own scale and shift
    return tiny_config(
        sample=SAMPLE,
        model={"pos_embed": "2d-rope"},
        vae={
            "kind": "diffusers",
            "model_id": saved_tiny_vae(tmp_path / "vae"),
            "latent_channels": 4,
            "downsample": 2,
        },
    )


def built(cfg):
    model = build_model(cfg)
    randomize(model.denoiser)  # adaLN-Zero and the output projection start at 0: make the outputs non-trivial
    return model


def images(model, prompts=PROMPTS, seed=7, **kw):
    return generate(model, prompts, image_size=16, seed=seed, **{**SAMPLE, "negative_prompt": NEGATIVE, **kw})


def run_pipe(pipe, prompts=PROMPTS, seed=7, **kw):
    pipe.set_progress_bar_config(disable=True)
    args = dict(
        num_inference_steps=SAMPLE["steps"],
        guidance_scale=SAMPLE["guidance"],
        negative_prompt=NEGATIVE,
        generator=torch.Generator().manual_seed(seed),
    )
    return pipe(prompts, **{**args, **kw}).images


def same_pil(pil_images, tensor):
    return all(np.array_equal(np.asarray(a), b) for a, b in zip(pil_images, to_uint8(tensor), strict=True))


def llm_calls(pipe):
    """A forward-hook counter on every LLM of the pipeline."""
    calls = []
    for name in ("text_encoder", "text_encoder_2", "text_encoder_3", "text_encoder_4"):
        if getattr(pipe, name) is not None:
            getattr(pipe, name).register_forward_hook(lambda *_, name=name: calls.append(name))
    return calls


def test_pipeline_matches_generate_and_runs_the_llm_once_per_call():
    cfg = tiny_config(sample=SAMPLE)
    model = built(cfg)
    pipe = FuseDiTPipeline.from_model(model, cfg)
    assert pipe.transformer.denoiser is model.denoiser and pipe.text_encoder is model.text.llm  # shared
    calls = llm_calls(pipe)
    out = run_pipe(pipe)
    assert calls == ["text_encoder"]  # one forward for [negative ; prompts], every step reads it
    reference = images(model)
    assert len(out) == 2 and out[0].size == (16, 16) and same_pil(out, reference)
    # bit for bit before the uint8 rounding too
    latents = run_pipe(pipe, output_type="latent")
    assert torch.equal(latents.clamp(-1, 1), reference)
    assert torch.equal(pipe.scheduler.sigmas, sampling_times(SAMPLE["steps"], SAMPLE["shift"]))
    assert pipe.scheduler.shift == SAMPLE["shift"] == pipe.scheduler.config.shift  # restored after the call
    # without guidance: no negative rows, still one LLM forward
    calls.clear()
    unguided = run_pipe(pipe, guidance_scale=1.0)
    assert calls == ["text_encoder"] and same_pil(unguided, images(model, guidance=1.0))
    # several images per prompt are the prompts repeated in order; defaults come from the model's config
    many = pipe(PROMPTS, num_images_per_prompt=2, generator=torch.Generator().manual_seed(3))
    assert same_pil(
        many.images, images(model, [p for p in PROMPTS for _ in range(2)], seed=3, negative_prompt="")
    )
    floats = pipe("a red circle", output_type="np", return_dict=False)[0]
    assert floats.shape == (1, 16, 16, 3) and floats.min() >= 0 and floats.max() <= 1


def test_diffusers_schedule_is_the_schedulers_own_and_matches_generate():
    """sample.schedule=diffusers (converted public checkpoints): the pipeline lets the scheduler space its
    own sigmas, as the public pipeline does, and generate() samples the same sigmas bit for bit."""
    cfg = tiny_config(sample={**SAMPLE, "schedule": "diffusers"})
    model = built(cfg)
    pipe = FuseDiTPipeline.from_model(model, cfg)
    latents = run_pipe(pipe, output_type="latent")
    own = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=SAMPLE["shift"])
    own.set_timesteps(SAMPLE["steps"])
    assert torch.equal(pipe.scheduler.sigmas, own.sigmas)
    assert torch.equal(latents.clamp(-1, 1), images(model, schedule="diffusers"))
    assert not torch.equal(latents.clamp(-1, 1), images(model))  # the uniform spacing is another schedule
    # A resolution-dependent shift needs a mu no fusedit model defines: said in one line, for either schedule.
    pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(
        pipe.scheduler.config, use_dynamic_shifting=True
    )
    with pytest.raises(ValueError, match=r"use_dynamic_shifting=True needs a resolution-dependent mu"):
        run_pipe(pipe)


@pytest.mark.parametrize("schedule", ["uniform", "diffusers"])
def test_a_heun_model_samples_with_heun_as_generate_does(schedule):
    """sample.sampler=heun: diffusers' Euler scheduler cannot take Heun's step, so the pipeline integrates
    the scheduler's times with fusedit's Heun, equal to generate bit for bit (not Euler's images)."""
    cfg = tiny_config(sample={**SAMPLE, "sampler": "heun", "schedule": schedule})
    model = built(cfg)
    pipe = FuseDiTPipeline.from_model(model, cfg)
    calls = llm_calls(pipe)
    latents = run_pipe(pipe, output_type="latent")
    assert calls == ["text_encoder"]
    assert torch.equal(latents.clamp(-1, 1), images(model, sampler="heun", schedule=schedule))
    assert not torch.equal(latents.clamp(-1, 1), images(model, sampler="euler", schedule=schedule))


@pytest.mark.parametrize("name", ["fusedit", "lidit", "clip-mod", "diffusers-vae"])
def test_saved_then_loaded_model_gives_identical_velocities_and_images(name, tmp_path):
    cfg = variant(name, tmp_path)
    model = built(cfg)
    save_pretrained(model, cfg, tmp_path / "export")
    loaded, cfg2 = from_pretrained(tmp_path / "export")
    assert hub.export_config(cfg2) == hub.export_config(cfg)
    assert loaded.denoiser is not model.denoiser and not loaded.denoiser.training
    x = torch.randn(3, cfg.vae.latent_channels, 8, 8)
    t = torch.tensor([0.9, 0.5, 0.1])
    prompts = [NEGATIVE, *PROMPTS]
    with torch.no_grad():
        v = model(x, t, model.encode_prompts(prompts))
        v2 = loaded(x, t, loaded.encode_prompts(prompts))
    assert torch.equal(v, v2) and v.abs().sum() > 0
    reference = images(model)
    assert torch.equal(images(loaded), reference)
    # and the pipeline read by diffusers' loader samples the same images, each LLM running once
    pipe = FuseDiTPipeline.from_pretrained(tmp_path / "export")
    calls = llm_calls(pipe)
    assert same_pil(run_pipe(pipe), reference)
    assert sorted(calls) == ["text_encoder", "text_encoder_2"][: len(cfg.extra_text) + 1]


def test_the_folder_records_the_architecture(tmp_path):
    from transformers import AutoModel

    from fusedit.data.shapes import vocabulary
    from fusedit.hub import FuseDiTTransformer2DModel
    from fusedit.text.tokenizer import word_tokenizer

    # an LLM with a "hub id" (a local folder here), read by a shallow design two blocks from the end
    llm_dir = tmp_path / "llm"
    AutoModel.from_config(hub.hf_config({"config": {"model_type": "gemma", **TINY_ARCH}})).save_pretrained(
        llm_dir
    )
    word_tokenizer(vocabulary()).save_pretrained(llm_dir)
    cfg = tiny_config(
        sample=SAMPLE, model={"design": "dit-self"}, text={"model_id": str(llm_dir), "hidden_layer": -3}
    )
    model = built(cfg)
    out = save_pretrained(model, cfg, tmp_path / "export")
    assert sorted(p.name for p in out.iterdir()) == [
        "model_index.json", "scheduler", "text_encoder", "tokenizer", "transformer", "vae"
    ]  # fmt: skip
    index = json.loads((out / "model_index.json").read_text())
    assert index["_class_name"] == "FuseDiTPipeline" and index["text_encoder_2"] == [None, None]
    # diffusers resolves custom components by library and class name: both must import to our classes
    for component, cls in [("transformer", FuseDiTTransformer2DModel), ("vae", hub.IdentityVAE)]:
        library, name = index[component]
        assert library == "fusedit.hub" and getattr(importlib.import_module(library), name) is cls
    assert (out / "transformer" / "diffusion_pytorch_model.safetensors").is_file()
    assert (out / "text_encoder" / "model.safetensors").is_file()
    record = json.loads((out / "transformer" / "config.json").read_text())
    assert record["fusedit"]["model"]["design"] == "dit-self" and record["fusedit"]["data"] == {
        "image_size": 16,
        "max_objects": 2,
    }
    assert "train" not in record["fusedit"] and record["pooled_dim"] is None
    (llm,) = record["llms"]
    # the full LLM's config (3 layers) and its id; the text encoder itself is saved cut after layer 2
    assert llm["model_id"] == str(llm_dir) and llm["config"]["num_hidden_layers"] == 3
    assert json.loads((out / "text_encoder" / "config.json").read_text())["num_hidden_layers"] == 2
    assert json.loads((out / "scheduler" / "scheduler_config.json").read_text())["shift"] == SAMPLE["shift"]
    # the record alone rebuilds the denoiser: same parameters, no fusedit YAML involved
    rebuilt = FuseDiTTransformer2DModel.from_config(
        FuseDiTTransformer2DModel.load_config(out / "transformer")
    )
    shapes = {k: v.shape for k, v in model.denoiser.state_dict().items()}
    assert {k: v.shape for k, v in rebuilt.denoiser.state_dict().items()} == shapes


def test_pipeline_save_pretrained_round_trips_through_diffusers(tmp_path):
    cfg = tiny_config(sample=SAMPLE)
    pipe = FuseDiTPipeline.from_model(built(cfg), cfg)
    reference = run_pipe(pipe)
    pipe.save_pretrained(tmp_path / "a")
    again = FuseDiTPipeline.from_pretrained(tmp_path / "a")
    assert isinstance(again.vae, hub.IdentityVAE) and not any(
        p.requires_grad for p in again.text_encoder.parameters()
    )
    again.save_pretrained(tmp_path / "b")  # a loaded pipeline saves again
    third = FuseDiTPipeline.from_pretrained(tmp_path / "b")
    for p in (again, third):
        assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(run_pipe(p), reference))


def test_from_fusedit_reads_a_run_folder_with_its_ema_weights(tmp_path):
    cfg = tiny_config(sample=SAMPLE)
    model = built(cfg)
    ema = {k: v + 0.05 * torch.randn_like(v) for k, v in model.denoiser.state_dict().items()}
    save_checkpoint(tmp_path / "run", 4, cfg, model.denoiser, ema, None, model.text.llm)
    pipe = FuseDiTPipeline.from_fusedit(tmp_path / "run")
    assert all(torch.equal(v, ema[k]) for k, v in pipe.transformer.denoiser.state_dict().items())
    trained, _, _ = load_model(tmp_path / "run")
    reference = images(trained)
    assert same_pil(run_pipe(pipe), reference)
    raw = FuseDiTPipeline.from_fusedit(tmp_path / "run", use_ema=False).transformer.denoiser
    assert all(torch.equal(v, model.denoiser.state_dict()[k]) for k, v in raw.state_dict().items())
    # the export the CLI would write, read back as a fusedit model
    export_run(tmp_path / "run", tmp_path / "export")
    exported, _ = from_pretrained(tmp_path / "export")
    assert torch.equal(images(exported), reference)


def test_what_is_not_a_fusedit_pipeline_fails_in_one_line(tmp_path):
    cfg = tiny_config(sample=SAMPLE)
    model = built(cfg)
    save_checkpoint(tmp_path / "run", 1, cfg, model.denoiser, None, None, model.text.llm)
    (tmp_path / "empty").mkdir()
    (tmp_path / "sd3").mkdir()
    (tmp_path / "sd3" / "model_index.json").write_text(
        json.dumps({"_class_name": "StableDiffusion3Pipeline"})
    )
    # what the public FuseDiT code's save_pipeline.py writes: a FuseDiTPipeline too, with its own transformer
    (tmp_path / "public").mkdir()
    (tmp_path / "public" / "model_index.json").write_text(
        json.dumps({"_class_name": "FuseDiTPipeline", "transformer": ["models.fusedit", "FuseDiT"]})
    )
    cases = [
        (tmp_path / "public", ValueError, "holds a transformer ['models.fusedit', 'FuseDiT'], not fusedit's"),
        (tmp_path / "empty", ValueError, "is not a fusedit pipeline folder"),
        (tmp_path / "run", ValueError, "is a fusedit run or checkpoint folder"),
        (tmp_path / "sd3", ValueError, "holds a StableDiffusion3Pipeline pipeline"),
        (tmp_path / "missing" / "export", FileNotFoundError, "no such folder"),
    ]
    for path, error, message in cases:
        with pytest.raises(error, match=re.escape(message)) as info:
            from_pretrained(path)
        assert "\n" not in str(info.value)
    with pytest.raises(OSError, match="cannot read model_index.json of 'nobody/nothing'") as info:
        FuseDiTPipeline.from_pretrained("nobody/nothing", local_files_only=True)
    assert "\n" not in str(info.value)
    pipe = FuseDiTPipeline.from_model(model, cfg)
    multiple = "(allowed: a positive multiple of 2, the VAE's downsampling x the patch size)"
    for kw, message in [
        ({"height": 15}, f"height=15 is not allowed {multiple}"),
        # 0 and negative sizes and counts used to fall back to the default or crash deep inside
        ({"height": 0}, f"height=0 is not allowed {multiple}"),
        ({"width": -4}, f"width=-4 is not allowed {multiple}"),
        ({"width": "16"}, f"width='16' is not allowed {multiple}"),
        (
            {"num_inference_steps": 0},
            "num_inference_steps=0 is not allowed (allowed: an integer >= 1)",
        ),
        ({"num_inference_steps": 2.5}, "num_inference_steps=2.5 is not allowed"),
        ({"num_images_per_prompt": 0}, "num_images_per_prompt=0 is not allowed (allowed: an integer >= 1)"),
        (
            {"guidance_scale": float("nan")},
            "guidance_scale=nan is not allowed (allowed: a finite number >= 0)",
        ),
        ({"guidance_scale": -2.0}, "guidance_scale=-2.0 is not allowed (allowed: a finite number >= 0)"),
        ({"generator": [torch.Generator()]}, "got 1 generators for 2 images (allowed: one torch.Generator"),
        ({"generator": [torch.Generator()] * 3}, "got 3 generators for 2 images"),
        ({"prompt": None}, "prompt=None is not allowed (allowed: a string or a list of strings)"),
        ({"prompt": ["a", 3]}, "prompt=['a', 3] is not allowed"),
        ({"negative_prompt": 3}, "negative_prompt=3 is not allowed (allowed: a string or a list of strings)"),
        ({"output_type": "jpeg"}, "output_type='jpeg' is not allowed"),
        ({"negative_prompt": ["a", "b", "c"]}, "got 3 negative prompts for 2 prompts"),
    ]:
        with pytest.raises(ValueError, match=re.escape(message)) as info:
            pipe(**{"prompt": PROMPTS, **kw})
        assert "\n" not in str(info.value)
    # A fixed APE table of 8 patches of 2 px: no side past 16 px, refused before any sampling.
    ape_cfg = tiny_config(model={"ape_max_size": 8})
    ape_pipe = FuseDiTPipeline.from_model(built(ape_cfg), ape_cfg)
    with pytest.raises(
        ValueError, match=re.escape("width=18 is not allowed (allowed: a positive multiple of 2, ")
    ):
        ape_pipe(prompt=PROMPTS, width=18)
    with pytest.raises(ValueError, match=re.escape("up to 16 (the APE table's model.ape_max_size)")):
        ape_pipe(prompt=PROMPTS, height=32)


def test_one_generator_per_image_remakes_fusedit_sample():
    """`fusedit sample --seed s` (and `fusedit serve`) start image i from the noise of seed s + i alone; a list
    of generators seeded that way gives the pipeline the same noise, so the same images."""
    cfg = tiny_config(sample=SAMPLE)
    model = built(cfg)
    pipe = FuseDiTPipeline.from_model(model, cfg)
    prompts = [p for p in PROMPTS for _ in range(2)]
    noise = seeded_noise([7 + i for i in range(4)], (cfg.vae.latent_channels, 16, 16))
    reference = images(model, prompts, noise=noise)
    generators = [torch.Generator().manual_seed(7 + i) for i in range(4)]
    assert same_pil(run_pipe(pipe, generator=generators, num_images_per_prompt=2), reference)
    # one generator draws the whole batch at once: after the first image, other noise than fusedit sample's
    assert not same_pil(run_pipe(pipe, num_images_per_prompt=2), reference)


def test_a_bf16_pipeline_samples_as_generate_does_in_bf16():
    """A pipeline moved to bf16 (or loaded with dtype=torch.bfloat16) runs its denoiser under bf16 autocast
    and integrates in float32, exactly as generate's bf16 sampling of the same weights."""
    cfg = tiny_config(sample=SAMPLE)
    model = built(cfg)
    pipe = FuseDiTPipeline.from_model(model, cfg).to(torch.bfloat16)  # shares, so model is bf16 too
    assert pipe.transformer.dtype == pipe.text_encoder.dtype == torch.bfloat16
    reference = images(model, precision="bf16")
    assert same_pil(run_pipe(pipe), reference)
    assert torch.equal(run_pipe(pipe, output_type="latent").clamp(-1, 1), reference)
    # latents given in bf16 are integrated in float32 like any others
    noise = torch.randn(2, 3, 16, 16).bfloat16()
    assert torch.equal(
        run_pipe(pipe, latents=noise, output_type="latent"),
        run_pipe(pipe, latents=noise.float(), output_type="latent"),
    )


@pytest.mark.parametrize("key", ["dtype", "torch_dtype"])
def test_a_loading_dtype_applies_to_every_component(key, tmp_path):
    """diffusers' `dtype` (and the older `torch_dtype`) cast the whole pipeline; only without either does
    each LLM get its recorded text.dtype."""
    cfg = tiny_config(sample=SAMPLE)
    save_pretrained(built(cfg), cfg, tmp_path / "export")
    pipe = FuseDiTPipeline.from_pretrained(tmp_path / "export", **{key: torch.bfloat16})
    assert pipe.transformer.dtype == pipe.text_encoder.dtype == torch.bfloat16
    assert len(run_pipe(pipe)) == 2


def test_a_swapped_schedulers_shift_is_the_one_fusedit_samples_with(tmp_path):
    """docs/diffusers.md changes the shift by swapping the scheduler: the pipeline, its saved and reloaded
    copy and fusedit's own sampling of it (from_pretrained -> generate) must then agree."""
    cfg = tiny_config(sample=SAMPLE)
    pipe = FuseDiTPipeline.from_model(built(cfg), cfg)
    pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config, shift=4.0)
    out = run_pipe(pipe, output_type="latent")
    pipe.save_pretrained(str(tmp_path / "pipe"))
    model, loaded = from_pretrained(tmp_path / "pipe")
    assert loaded.sample.shift == 4.0
    assert torch.equal(out.clamp(-1, 1), images(model, shift=loaded.sample.shift))
    assert torch.equal(
        run_pipe(FuseDiTPipeline.from_pretrained(str(tmp_path / "pipe")), output_type="latent"), out
    )
    # What the CLI reads of the folder without loading it (`fusedit eval` generates from it before any
    # load, `train.init_from` builds on it) says the same.
    from fusedit.cli.common import _saved_model

    assert _saved_model(tmp_path / "pipe")[0].sample == loaded.sample


def test_a_size_far_past_the_trained_one_is_warned_about(caplog):
    """As `fusedit sample --size`: allowed, but said (each step then costs that many times the tokens)."""
    cfg = tiny_config(sample=SAMPLE)
    pipe = FuseDiTPipeline.from_model(built(cfg), cfg)
    with caplog.at_level(logging.WARNING, logger="fusedit"):
        run_pipe(pipe, prompts=["a red circle"], num_inference_steps=1, height=16, width=64)
        run_pipe(pipe, prompts=["a red circle"], num_inference_steps=1, height=80, width=80)
    assert [r.getMessage() for r in caplog.records] == [
        "height=80, width=80 has 25x the pixels of the 16 px the model trained at: each step processes that many "
        "times the image tokens (attention grows with their square), and the model never saw such sizes"
    ]


def test_nan_images_of_the_pipeline_are_warned_about_as_generates_are(caplog):
    """The pipeline returned NaN images (black PIL images) without a word, where `fusedit sample` warned
    (h-sample M1); the warning blames guidance only above 1."""
    cfg = tiny_config(sample=SAMPLE)
    model = built(cfg)
    with torch.no_grad():
        list(model.denoiser.parameters())[-1].fill_(float("inf"))
    pipe = FuseDiTPipeline.from_model(model, cfg)
    with caplog.at_level(logging.WARNING, logger="fusedit"):
        run_pipe(pipe, prompts=["a red circle"], guidance_scale=1.0)
        run_pipe(pipe, output_type="latent")
    assert [r.getMessage() for r in caplog.records if "NaN" in r.getMessage()] == [
        "1 of the 1 images are NaN or inf (black or saturated pixels): do the model's weights or inputs hold "
        "non-finite or huge values? (guidance=1 cannot cause it)",
        "2 of the 2 images are NaN or inf (black or saturated pixels): is guidance=3 too large, or do the "
        "model's weights or inputs hold non-finite or huge values?",
    ]


@pytest.mark.parametrize("name", ["fusedit", "clip-mod"])
def test_a_folder_exported_before_the_word_normalizer_reads_prompts_as_its_run(name, tmp_path):
    """An export's tokenizer.json keeps the normalizer it was saved with: a folder saved before the built-in
    tokenizer had one gets today's at load, so "A Red Circle." reads "a red circle" there too (helper-115
    B2), for the LLM's tokenizer and the clip-mod CLIP's."""
    cfg = variant(name, tmp_path)
    folder = save_pretrained(built(cfg), cfg, tmp_path / "pipe")
    slots = ["tokenizer", "pooled_tokenizer"] if name == "clip-mod" else ["tokenizer"]
    for slot in slots:  # as an older fusedit wrote it
        saved = json.loads((folder / slot / "tokenizer.json").read_text())
        assert saved["normalizer"] is not None
        saved["normalizer"] = None
        (folder / slot / "tokenizer.json").write_text(json.dumps(saved))
    pipe = FuseDiTPipeline.from_pretrained(folder)
    for slot in slots:
        tok = getattr(pipe, slot)
        assert tok("A Red Circle.")["input_ids"] == tok("a red circle")["input_ids"]
        assert tok.unk_token_id not in tok("A Red Circle.")["input_ids"]
    images = run_pipe(pipe, prompts=["A Red Circle."], num_inference_steps=1)
    plain = run_pipe(pipe, prompts=["a red circle"], num_inference_steps=1)
    assert np.array_equal(np.asarray(images[0]), np.asarray(plain[0]))


def test_an_unused_negative_prompt_or_prompt_is_warned_about(caplog):
    """The CLI refuses a negative prompt at guidance 1 (it changes nothing); the pipeline accepted it without
    a word (helper-115 R5). It still accepts it, but says so, as for guidance 0, which leaves the prompt
    unused; the saved negative prompt (negative_prompt=None) is no reason to warn."""
    from fusedit.sampling.generation import warn_once

    warn_once.cache_clear()
    cfg = tiny_config(sample={**SAMPLE, "negative_prompt": "a blue square"})
    pipe = FuseDiTPipeline.from_model(built(cfg), cfg)
    with caplog.at_level(logging.WARNING, logger="fusedit"):
        run_pipe(
            pipe, prompts=["a red circle"], num_inference_steps=1, guidance_scale=1, negative_prompt=None
        )
        assert caplog.records == []
        run_pipe(
            pipe, prompts=["a red circle"], num_inference_steps=1, guidance_scale=1, negative_prompt="blue"
        )
        run_pipe(pipe, prompts=["a red circle"], num_inference_steps=1, guidance_scale=0)
    assert [r.getMessage() for r in caplog.records] == [
        "guidance 1 samples the prompt alone: the negative prompt is not used",
        "guidance 0 samples the negative prompt alone: the prompt is not used",
    ]


def test_prompts_cut_to_the_limit_are_warned_about_at_every_call(caplog):
    """As generate says it: the encoders keep no count, so the pipeline names each call's cut prompts
    (and a cut negative prompt) itself."""
    cfg = tiny_config(sample=SAMPLE, text={"max_length": 5})
    pipe = FuseDiTPipeline.from_model(built(cfg), cfg)
    long = "a blue square to the left of a green triangle"
    with caplog.at_level(logging.WARNING, logger="fusedit"):
        for _ in range(2):
            run_pipe(pipe, prompts=[long, "a red circle"], num_inference_steps=1)
        run_pipe(pipe, prompts=["a red circle"], num_inference_steps=1, negative_prompt=long)
        run_pipe(pipe, prompts=["a red circle"], num_inference_steps=1)
    cut = "1 of the 2 prompts was longer than text.max_length=5 tokens: its end was cut"
    negative = "the negative prompt is longer than text.max_length=5 tokens: its end was cut"
    assert [r.getMessage() for r in caplog.records] == [cut, cut, negative]


def without_accelerate(monkeypatch, caplog) -> None:
    """diffusers as it loads where accelerate is not installed, its warnings in ``caplog`` (its own logger
    does not pass them on to the root one)."""
    import diffusers.models.modeling_utils
    import diffusers.pipelines.pipeline_utils
    import diffusers.utils

    import fusedit.pipeline

    for module in (
        diffusers.models.modeling_utils,
        diffusers.pipelines.pipeline_utils,
        diffusers.utils,
        fusedit.pipeline,
    ):
        monkeypatch.setattr(module, "is_accelerate_available", lambda: False, raising=False)
    monkeypatch.setattr(logging.getLogger("diffusers"), "handlers", [caplog.handler])


def test_a_pipeline_folder_loads_without_accelerate_without_diffusers_warning_of_it(
    tmp_path, monkeypatch, caplog
):
    """A five-line "Cannot initialize model with low cpu memory usage because `accelerate` was not found"
    block came before every sample of a pipeline folder or a diffusers VAE, reading as a failed install
    (h-docs R4): fusedit asks for the loading diffusers falls back to."""
    cfg = variant("diffusers-vae", tmp_path)
    save_pretrained(built(cfg), cfg, tmp_path / "pipe")
    without_accelerate(monkeypatch, caplog)
    with caplog.at_level(logging.WARNING):
        model, _ = from_pretrained(tmp_path / "pipe")
        FuseDiTPipeline.from_pretrained(tmp_path / "pipe")
        load_autoencoder(cfg.vae)
    assert isinstance(model.autoencoder, DiffusersAutoencoder)
    assert "accelerate" not in caplog.text
