"""Regression tests of the pipeline, its hub components and the public-checkpoint converter."""

import copy
import json
from pathlib import Path

import pytest
import torch

from conftest import randomize, tiny_config
from fusedit.config import ConfigError
from fusedit.convert.fusedit_official import official_config
from fusedit.pipeline import FuseDiTPipeline, from_pretrained, save_pretrained
from fusedit.sample import generate
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
