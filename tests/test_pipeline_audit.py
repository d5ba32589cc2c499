"""Regression tests of the pipeline, its hub components and the public-checkpoint converter."""

import copy
import json
from pathlib import Path

import pytest
import torch
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback, SDCFGCutoffCallback

from conftest import randomize, tiny_config, tiny_vae
from fusedit.config import ConfigError
from fusedit.convert.fusedit_official import official_config
from fusedit.pipeline import FuseDiTPipeline, from_pretrained, save_pretrained
from fusedit.sampling.generation import generate
from fusedit.system import build_model

PUBLIC_CONFIG = json.loads(
    (Path(__file__).parent / "fixtures" / "fusedit-official-tiny" / "transformer" / "config.json").read_text()
)
SAMPLE = {"steps": 3, "guidance": 3.0, "shift": 3.0}


@pytest.mark.parametrize("sampler", ["euler", "heun"])
def test_sampling_runs_the_transformer_through_its_forward(sampler):
    """diffusers acts on a component through hooks on its forward (enable_model_cpu_offload moves the
    transformer to the GPU there): sampling must call the transformer, not its denoiser behind its back,
    and still give generate's images."""
    cfg = tiny_config(sample={**SAMPLE, "sampler": sampler})
    model = build_model(cfg)
    randomize(model.denoiser)
    pipe = FuseDiTPipeline.from_model(model, cfg)
    pipe.set_progress_bar_config(disable=True)
    calls = []
    pipe.transformer.register_forward_pre_hook(lambda module, args: calls.append(args[0].shape[0]))
    latents = pipe(
        "a red circle",
        negative_prompt="a blue square",
        generator=torch.Generator().manual_seed(5),
        output_type="latent",
    ).images
    # one guided forward (negative and prompt rows together) per velocity: 3 Euler steps, Heun's 2 per step
    assert calls == [2] * (3 if sampler == "euler" else 6)
    reference = generate(
        model,
        ["a red circle"],
        image_size=16,
        seed=5,
        negative_prompt="a blue square",
        sampler=sampler,
        **SAMPLE,
    )
    assert torch.equal(latents.clamp(-1, 1), reference)


def test_a_loaded_pixel_space_model_encodes_as_fusedit_autoencoders_do(tmp_path):
    """from_pretrained's model is "the same model the training loop takes": its pixel-space autoencoder
    (the pipeline's IdentityVAE) takes the per-image generators fusedit passes to every autoencoder."""
    cfg = tiny_config(sample=SAMPLE)
    save_pretrained(build_model(cfg), cfg, tmp_path / "export")
    model, _ = from_pretrained(tmp_path / "export")
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    generators = [torch.Generator().manual_seed(i) for i in range(2)]
    assert torch.equal(model.autoencoder.encode(images, generators), images)
    assert torch.equal(model.autoencoder.encode(images), images)


def test_scaled_rope_in_transformers_5_format_is_refused():
    """transformers 5 writes RoPE scaling as rope_parameters (rope_scaling null): a public config re-saved
    that way must be refused like rope_scaling, not imported with the scaling silently dropped."""
    public = copy.deepcopy(PUBLIC_CONFIG)
    public["base_config"].pop("rope_theta")
    public["base_config"]["rope_parameters"] = {"rope_type": "linear", "factor": 2.0, "rope_theta": 500.0}
    with pytest.raises(ConfigError, match=r"base_config\.rope_parameters=.*'linear'.* is not supported") as e:
        official_config(public, tokenizer="t")
    assert "\n" not in str(e.value)
    # the unscaled transformers 5 form still imports, with its theta
    public["base_config"]["rope_parameters"] = {"rope_type": "default", "rope_theta": 500.0}
    assert official_config(public, tokenizer="t").text.arch["rope_theta"] == 500.0


def callback_pipe(sampler, **sections):
    """A tiny pipeline sampling with ``sampler`` (SAMPLE's 3 steps, guidance and shift) and its model."""
    cfg = tiny_config(sample={**SAMPLE, "sampler": sampler}, **sections)
    model = build_model(cfg)
    randomize(model.denoiser)
    pipe = FuseDiTPipeline.from_model(model, cfg)
    pipe.set_progress_bar_config(disable=True)
    return pipe, model


def sample(pipe, seed=5, output_type="latent", **kw):
    return pipe(
        "a red circle",
        negative_prompt="a blue square",
        generator=torch.Generator().manual_seed(seed),
        output_type=output_type,
        **kw,
    ).images


@pytest.mark.parametrize("sampler", ["euler", "heun"])
def test_a_step_end_callback_sees_every_step_with_the_schedulers_timesteps(sampler):
    """diffusers' callback_on_step_end: called after each step (Heun's too) with the step index, the
    scheduler's timestep (0..1000, not the index or the sigma) and the latents; returning callback_kwargs
    unchanged changes nothing."""
    pipe, _ = callback_pipe(sampler)
    plain = sample(pipe)
    seen = []

    def record(p, step_index, timestep, callback_kwargs):
        assert p is pipe and list(callback_kwargs) == ["latents"] and p.num_timesteps == SAMPLE["steps"]
        seen.append((step_index, timestep, callback_kwargs["latents"].clone()))
        return callback_kwargs

    latents = sample(pipe, callback_on_step_end=record)
    assert [i for i, _, _ in seen] == [0, 1, 2]
    timesteps = torch.stack([t for _, t, _ in seen])
    assert torch.equal(timesteps, pipe.scheduler.timesteps)
    assert torch.equal(timesteps, pipe.scheduler.sigmas[:-1] * 1000)
    # each step moved the latents, the last step's are the result, and it is the run without a callback
    assert all(not torch.equal(a, b) for (_, _, a), (_, _, b) in zip(seen, seen[1:]))
    assert torch.equal(seen[-1][2], latents) and torch.equal(latents, plain)


@pytest.mark.parametrize("sampler", ["euler", "heun"])
def test_latents_a_step_end_callback_returns_replace_the_pipelines(sampler):
    """The returned dict's "latents" are what the next step integrates: handing seed 5's run the latents
    seed 6 had after step 0 finishes exactly as seed 6's run does."""
    pipe, _ = callback_pipe(sampler)
    after_first = {}

    def keep(p, step_index, timestep, callback_kwargs):
        if step_index == 0:
            after_first["latents"] = callback_kwargs["latents"].clone()
        return callback_kwargs

    expected = sample(pipe, seed=6, callback_on_step_end=keep)

    def swap(p, step_index, timestep, callback_kwargs):
        return {"latents": after_first["latents"]} if step_index == 0 else callback_kwargs

    assert torch.equal(sample(pipe, seed=5, callback_on_step_end=swap), expected)
    assert not torch.equal(sample(pipe, seed=5), expected)
    # a callback that forgets to return its dict is said in one line, not an AttributeError deep inside
    with pytest.raises(
        TypeError, match=r"^callback_on_step_end returned NoneType at step 0 \(allowed: a dict"
    ):
        sample(pipe, callback_on_step_end=lambda *args: None)


@pytest.mark.parametrize("sampler", ["euler", "heun"])
def test_zero_latents_returned_at_the_last_step_are_what_is_decoded(sampler, tmp_path):
    """In a real latent space (a diffusers VAE with its own scale and shift): zeros returned after the last
    step are the output latents, and the images are the VAE's decode of zero latents."""
    tiny_vae(scaling_factor=1.5, shift_factor=0.25).save_pretrained(tmp_path / "vae")
    vae = {"kind": "diffusers", "model_id": str(tmp_path / "vae"), "latent_channels": 4, "downsample": 2}
    pipe, model = callback_pipe(sampler, model={"pos_embed": "2d-rope"}, vae=vae)

    def zero_at_end(p, step_index, timestep, callback_kwargs):
        if step_index == p.num_timesteps - 1:
            return {"latents": torch.zeros_like(callback_kwargs["latents"])}
        return callback_kwargs

    zeros = torch.zeros(1, 4, 8, 8)
    assert torch.equal(sample(pipe, callback_on_step_end=zero_at_end), zeros)
    images = sample(pipe, output_type="pt", callback_on_step_end=zero_at_end)
    assert torch.equal(images, ((model.autoencoder.decode(zeros) + 1) / 2).clamp(0, 1))
    assert not torch.equal(images, sample(pipe, output_type="pt"))


def test_a_tensor_input_the_pipeline_does_not_offer_is_refused_before_anything_runs():
    pipe, _ = callback_pipe("euler")
    forwards, called = [], []
    pipe.text_encoder.register_forward_pre_hook(lambda module, args: forwards.append("text_encoder"))
    pipe.transformer.register_forward_pre_hook(lambda module, args: forwards.append("transformer"))

    def callback(p, step_index, timestep, callback_kwargs):
        called.append(step_index)
        return callback_kwargs

    with pytest.raises(ValueError) as e:
        sample(
            pipe,
            callback_on_step_end=callback,
            callback_on_step_end_tensor_inputs=["latents", "prompt_embeds"],
        )
    assert str(e.value) == (
        "callback_on_step_end_tensor_inputs names 'prompt_embeds', which FuseDiTPipeline does not offer "
        "(allowed: latents)"
    )
    # diffusers' own CFG cut-off callback reads prompt_embeds: its tensor inputs are checked the same way
    with pytest.raises(ValueError, match=r"names 'prompt_embeds', which FuseDiTPipeline does not offer"):
        sample(pipe, callback_on_step_end=SDCFGCutoffCallback(cutoff_step_ratio=0.5))
    # one name instead of a list would otherwise be read letter by letter
    with pytest.raises(ValueError, match=r"^callback_on_step_end_tensor_inputs='latents' is not allowed"):
        sample(pipe, callback_on_step_end=callback, callback_on_step_end_tensor_inputs="latents")
    with pytest.raises(ValueError, match=r"^callback_on_step_end=3 is not allowed \(allowed: a function"):
        sample(pipe, callback_on_step_end=3)
    assert forwards == [] and called == []


@pytest.mark.parametrize("sampler", ["euler", "heun"])
def test_diffusers_callback_objects_run_and_interrupt_skips_the_remaining_steps(sampler):
    """A MultiPipelineCallbacks of PipelineCallbacks reads the tensors its callbacks name (the argument is
    ignored, as in diffusers); one setting pipe._interrupt after step 0 leaves the latents of step 0, and
    the next call starts uninterrupted."""
    seen = []

    class Record(PipelineCallback):
        tensor_inputs = ["latents"]

        def callback_fn(self, pipeline, step_index, timestep, callback_kwargs):
            seen.append((step_index, callback_kwargs["latents"].clone()))
            return callback_kwargs

    class StopAfter(PipelineCallback):
        tensor_inputs = []

        def callback_fn(self, pipeline, step_index, timestep, callback_kwargs):
            if step_index == self.config.cutoff_step_index:
                pipeline._interrupt = True
            return callback_kwargs

    pipe, _ = callback_pipe(sampler)
    plain = sample(pipe)
    forwards = []
    pipe.transformer.register_forward_pre_hook(lambda module, args: forwards.append(args[0].shape[0]))
    callbacks = MultiPipelineCallbacks([Record(), StopAfter(cutoff_step_ratio=None, cutoff_step_index=0)])
    latents = sample(
        pipe, callback_on_step_end=callbacks, callback_on_step_end_tensor_inputs=["prompt_embeds"]
    )
    assert [i for i, _ in seen] == [0] and pipe.interrupt
    assert torch.equal(latents, seen[0][1]) and not torch.equal(latents, plain)
    assert len(forwards) == (1 if sampler == "euler" else 2)  # one step's velocities (Heun: two)
    assert torch.equal(sample(pipe), plain) and not pipe.interrupt
