"""Audit pins for model paths the other tests reach only with their defaults: every timestep conditioning
(design-space.md s.1) in the FLOP formula and in batch invariance, the sampling (fused) forms in the FLOP
formula, and the scaled APE table against diffusers' own."""

import pytest
import torch

from conftest import randomize, tiny_config
from fusedit.system import build_model

DESIGNS = ("fusedit", "fusedit-cross", "dit-self", "dit-cross")
TIMESTEPS = ("adaln-single", "addition", "none")


@pytest.mark.parametrize("design", DESIGNS)
@pytest.mark.parametrize("time", [*TIMESTEPS, "fused"])
def test_flop_formula_counts_every_timestep_conditioning_and_the_fused_forms(design, time):
    """denoiser_flops equals torch's count of a real forward for adaLN-single's global t_block and tables,
    addition, no timestep, and the inference form's fused q/k/v and gate/up projections."""
    from torch.utils.flop_counter import FlopCounterMode

    from fusedit.models.flops import denoiser_flops
    from fusedit.models.inference import prepare_for_sampling

    model_cfg = {"design": design, "attention_backend": "math"}
    if time != "fused":
        model_cfg["timestep_conditioning"] = time
    model = build_model(tiny_config(model=model_cfg, text={"trim_padding": False}))
    if time == "fused":
        prepare_for_sampling(model.denoiser)
    text = model.encode_prompts(["a red circle"])
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.randn(1, 3, 16, 16), torch.rand(1), text)
    assert denoiser_flops(model.denoiser, 64, 16) == counter.get_total_flops()


@pytest.mark.parametrize("design", ["fusedit", "dit-self"])
@pytest.mark.parametrize("time", TIMESTEPS)
def test_a_prompts_velocity_ignores_its_batch_for_every_timestep_conditioning(design, time):
    """adaLN-single's table, addition's token-wise temb and no timestep: a prompt's output alone equals its
    row next to a longer (so padding-forcing) prompt, 2D RoPE offsets included."""
    cfg = tiny_config(model={"design": design, "timestep_conditioning": time, "pos_embed": "2d-rope"})
    model = build_model(cfg)
    randomize(model.denoiser)
    x, t = torch.randn(1, 3, 8, 8), torch.rand(1)
    with torch.no_grad():
        alone = model(x, t, model.encode_prompts(["a red circle"]))
        batch = model.encode_prompts(["a red circle", "a blue square to the left of a green triangle"])
        assert batch.padded
        together = model(torch.cat([x, x]), torch.cat([t, t]), batch)[:1]
    torch.testing.assert_close(alone, together, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("h", "w", "base", "max_size"), [(4, 4, 4, None), (3, 5, 4, None), (3, 5, 4, 8)])
def test_scaled_ape_equals_diffusers_patch_embed(h, w, base, max_size):
    """model.ape_base_size / ape_max_size give diffusers' PatchEmbed table (the public code's APE), also
    on a non-square grid: each axis scaled to the base grid, centre-cropped from the max grid."""
    from diffusers.models.embeddings import PatchEmbed

    from fusedit.layers.embed import scaled_sincos_2d

    patch = PatchEmbed(
        height=2 * base,
        width=2 * base,
        patch_size=2,
        in_channels=4,
        embed_dim=32,
        pos_embed_max_size=max_size,
    )
    x = torch.zeros(1, 4, 2 * h, 2 * w)
    with torch.no_grad():
        table = patch(x) - patch.proj(x).flatten(2).transpose(1, 2)  # (1, h * w, 32)
    torch.testing.assert_close(scaled_sincos_2d(32, h, w, base, max_size), table[0], atol=1e-6, rtol=0)
