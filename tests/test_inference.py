"""The sampling form of a denoiser (fusedit.models.inference) computes the same function as the
training form: bit-identical with bf16 matmul weights under bf16 autocast, equal to rounding when fused."""

import copy

import pytest
import torch

from conftest import randomize, tiny_config
from fusedit.layers.mlp import FusedGatedMLP, GatedMLP
from fusedit.models.blocks import FusedImageAttention, ImageAttention
from fusedit.models.inference import cast_matmul_weights, fuse_projections, prepare_for_sampling
from fusedit.sampling.generation import generate
from fusedit.system import build_model

DESIGNS = ("fusedit", "fusedit-cross", "dit-self", "dit-cross")


def _model_and_inputs(design, **model):
    cfg = tiny_config(model={"design": design, **model})
    m = build_model(cfg)
    randomize(m.denoiser)
    text = m.encode_prompts(["a red circle", "two blue squares above a green triangle", ""])
    return m, (torch.randn(3, 3, 16, 16), torch.rand(3), text)


@pytest.mark.parametrize("design", DESIGNS)
def test_bf16_matmul_weights_are_bit_identical_under_autocast(design):
    m, inputs = _model_and_inputs(design, pos_embed="2d-rope")
    slow = m.denoiser.eval()
    fast = cast_matmul_weights(copy.deepcopy(slow), torch.bfloat16)
    assert fast.blocks[0].img_mlp.up_proj.weight.dtype == torch.bfloat16
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(fast(*inputs), slow(*inputs))


@pytest.mark.parametrize("design", DESIGNS)
def test_fused_projections_compute_the_same_function(design):
    m, inputs = _model_and_inputs(design)
    slow = m.denoiser.eval()
    fast = fuse_projections(copy.deepcopy(slow))
    kinds = [type(x) for x in fast.modules()]
    assert FusedGatedMLP in kinds and FusedImageAttention in kinds
    assert GatedMLP not in kinds and ImageAttention not in kinds
    with torch.no_grad():
        torch.testing.assert_close(fast(*inputs), slow(*inputs), rtol=1e-5, atol=1e-5)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            torch.testing.assert_close(fast(*inputs), slow(*inputs), rtol=2e-2, atol=2e-2)


def test_prepared_model_samples_like_the_training_form():
    m, _ = _model_and_inputs("fusedit")
    kw = dict(image_size=16, steps=3, guidance=3.0, seed=1)
    prompts = ["a red circle", "two green triangles"]
    ref = generate(m, prompts, **kw)
    prepare_for_sampling(m.denoiser, weights_dtype=None, fuse=True)
    assert not any(p.requires_grad for p in m.denoiser.parameters())
    torch.testing.assert_close(generate(m, prompts, **kw), ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("design", DESIGNS)
def test_uncached_text_is_computed_outside_autocast_like_the_cache(design):
    """Without the text cache the LLM runs at every step, but not under the denoiser's bf16 autocast: the
    images equal the cached ones bit for bit."""
    m, _ = _model_and_inputs(design)
    kw = dict(image_size=16, steps=2, guidance=3.0, seed=1, precision="bf16")
    prompts = ["a red circle", "two green triangles"]
    assert torch.equal(
        generate(m, prompts, cache_text=True, **kw), generate(m, prompts, cache_text=False, **kw)
    )


@pytest.mark.parametrize("design", DESIGNS)
def test_a_bf16_llm_feeds_an_fp32_denoiser(design):
    """text.dtype=bfloat16 with fp32 sampling (no autocast): the LLM's bf16 features enter fp32 layers."""
    cfg = tiny_config(model={"design": design}, text={"dtype": "bfloat16"})
    m = build_model(cfg)
    assert next(m.text.llm.parameters()).dtype == torch.bfloat16
    randomize(m.denoiser)
    images = generate(m, ["a red circle"], image_size=16, steps=2, guidance=3.0, precision="fp32")
    assert images.dtype == torch.float32 and torch.isfinite(images).all()


def test_generate_names_bf16_weights_sampled_in_fp32():
    """A model in its bf16-weight sampling form cannot run plain fp32 matmuls: generate says so in one line
    instead of torch's dtype mismatch deep in a Linear."""
    m, _ = _model_and_inputs("fusedit")
    prepare_for_sampling(m.denoiser, weights_dtype=torch.bfloat16, fuse=True)
    with pytest.raises(
        ValueError, match=r"precision 'fp32' samples in fp32, but the model holds bf16 weights"
    ):
        generate(m, ["a red circle"], image_size=16, steps=2, precision="fp32")
    assert generate(m, ["a red circle"], image_size=16, steps=2, precision="bf16").shape == (1, 3, 16, 16)


def test_generate_defaults_to_the_sample_sections_defaults():
    """A library caller who passes no settings samples as a config with a default ``sample`` section does
    (shift 3.0 included), not by a second set of defaults."""
    from dataclasses import replace

    from fusedit.config import SampleConfig
    from fusedit.sampling.generation import sample_settings

    cfg = tiny_config()
    cfg = replace(cfg, sample=SampleConfig())
    m = build_model(cfg)
    randomize(m.denoiser)
    settings = {**sample_settings(cfg), "image_size": 16, "steps": 2}
    assert torch.equal(
        generate(m, ["a red circle"], image_size=16, steps=2), generate(m, ["a red circle"], **settings)
    )


def test_generate_names_noise_of_the_wrong_shape():
    m = build_model(tiny_config())
    with pytest.raises(
        ValueError, match=r"noise of shape \(1, 3, 16, 16\) for 2 prompt\(s\) at image_size=16; "
    ):
        generate(
            m, ["a red circle", "a blue square"], image_size=16, steps=1, noise=torch.randn(1, 3, 16, 16)
        )
