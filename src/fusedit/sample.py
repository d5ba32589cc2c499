"""Prompt -> image. Used by `fusedit sample`, the demo, evaluation and training previews.

With ``cache_text`` (the default) the LLM runs once per prompt batch, negative prompts included (they are
just more rows of the batch), and its per-layer K/V serve every step and both guidance branches. Without
it the LLM runs again at every step, which gives the same images at several times the cost: the test suite
checks that equality for every position scheme.
"""

from __future__ import annotations

import torch

from fusedit.config import Config
from fusedit.flow import guided, sample
from fusedit.models.inference import prepare_for_sampling
from fusedit.system import TextToImage, uses_bf16


def sampling_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of sampling (sample.precision): bf16, or None for plain fp32."""
    return torch.bfloat16 if uses_bf16(precision, device) else None


def to_sampling_form(model: TextToImage, cfg: Config) -> TextToImage:
    """Turn a loaded model that will only sample into its faster sampling form (sample.fuse_projections,
    sample.bf16_weights; fusedit.models.inference): the same images within bf16 rounding."""
    device = next(model.denoiser.parameters()).device
    bf16 = cfg.sample.bf16_weights and sampling_dtype(cfg.sample.precision, device) == torch.bfloat16
    prepare_for_sampling(model.denoiser, torch.bfloat16 if bf16 else None, fuse=cfg.sample.fuse_projections)
    return model


def sample_settings(cfg: Config, **overrides) -> dict:
    """``generate`` keyword arguments from a config's ``sample`` section and image size; an override of
    None keeps the config's value (so CLI flags can be passed straight through)."""
    s = cfg.sample
    settings = {
        "image_size": cfg.data.image_size,
        "steps": s.steps,
        "guidance": s.guidance,
        "sampler": s.sampler,
        "shift": s.shift,
        "negative_prompt": s.negative_prompt,
        "cache_text": s.cache_text,
        "precision": s.precision,
    }
    unknown = set(overrides) - set(settings)
    if unknown:
        raise TypeError(f"unknown sample setting(s) {sorted(unknown)} (allowed: {', '.join(settings)})")
    return {**settings, **{k: v for k, v in overrides.items() if v is not None}}


@torch.no_grad()
def generate(
    model: TextToImage,
    prompts: list[str],
    *,
    image_size: int,
    steps: int = 25,
    guidance: float = 6.0,
    sampler: str = "euler",
    shift: float = 1.0,
    negative_prompt: str = "",
    seed: int = 42,
    cache_text: bool = True,
    precision: str = "auto",
    noise: torch.Tensor | None = None,
    progress=None,
) -> torch.Tensor:
    """Images (B, 3, H, W) in [-1, 1] for ``prompts``. CFG is used when guidance != 1."""
    denoiser, ae = model.denoiser, model.autoencoder
    device = next(denoiser.parameters()).device
    dtype = sampling_dtype(precision, device)
    use_cfg = guidance != 1.0
    rows = [negative_prompt] * len(prompts) + list(prompts) if use_cfg else list(prompts)

    def run(x, t, context):  # the denoiser in bf16 on a GPU; the sampler's own arithmetic stays fp32
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            return denoiser(x, t, context).float()

    if cache_text:
        context = model.encode_prompts(rows)

        def velocity(x, t):
            return run(x, t, context)
    else:

        def velocity(x, t):
            return run(x, t, model.encode_prompts(rows))

    if use_cfg:
        velocity = guided(velocity, guidance)
    if noise is None:
        side = image_size // ae.downsample
        gen = torch.Generator().manual_seed(seed)
        noise = torch.randn(len(prompts), ae.channels, side, side, generator=gen)
    latents = sample(velocity, noise.to(device), steps, sampler=sampler, shift=shift, progress=progress)
    return ae.decode(latents)
