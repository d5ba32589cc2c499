"""The latent space: one interface for pixels (identity) and diffusers VAEs.

``encode`` maps images in [-1, 1] to the latents the denoiser is trained on, ``decode`` maps back. Each
VAE's own shift and scale (SD3/FLUX: shift_factor and scaling_factor; SDXL: scaling only) are applied here
and nowhere else.
"""

from __future__ import annotations

import torch
from torch import nn

from fusedit.config import ConfigError, VAEConfig, refuse_path_to_nothing


class IdentityAutoencoder(nn.Module):
    """Pixel-space training behind the latent interface: latents are the images themselves."""

    channels, downsample = 3, 1

    def encode(self, images: torch.Tensor, generator=None) -> torch.Tensor:
        return images  # nothing to draw: ``generator`` is for the VAEs that sample

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return latents.clamp(-1, 1)


class DiffusersAutoencoder(nn.Module):
    """A diffusers ``AutoencoderKL`` (SD3, FLUX, SDXL VAEs), frozen, with its shift and scale."""

    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = vae.eval().requires_grad_(False)
        config = vae.config
        self.channels = config.latent_channels
        self.downsample = 2 ** (len(config.block_out_channels) - 1)
        self.scale = float(getattr(config, "scaling_factor", 1.0) or 1.0)
        self.shift = float(getattr(config, "shift_factor", None) or 0.0)

    @torch.no_grad()
    def encode(self, images: torch.Tensor, generator=None) -> torch.Tensor:
        """images (B, 3, H, W) -> latents (B, C, H / downsample, W / downsample): a draw from the posterior
        with ``generator`` (one, or one per image, as diffusers' ``randn_tensor`` takes; None: the global
        RNG). Training passes one per image seeded by (seed, step, position), which keeps a resumed or
        differently split run drawing what an uninterrupted one would."""
        dtype = next(self.vae.parameters()).dtype
        latents = self.vae.encode(images.to(dtype)).latent_dist.sample(generator=generator)
        return ((latents - self.shift) * self.scale).float()

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        dtype = next(self.vae.parameters()).dtype
        images = self.vae.decode((latents / self.scale + self.shift).to(dtype)).sample
        return images.float().clamp(-1, 1)


def load_autoencoder(cfg: VAEConfig, device: torch.device | str = "cpu") -> nn.Module:
    if cfg.kind == "identity":
        return IdentityAutoencoder()
    from diffusers import AutoencoderKL
    from diffusers.utils import is_accelerate_available

    # Refused here: diffusers would take the path for a hub id and report the hub unreachable.
    refuse_path_to_nothing(f"vae.model_id={cfg.model_id!r}", cfg.model_id)
    # Without accelerate diffusers loads this way anyway, but says so first in a five-line warning that reads
    # as a failed install.
    low_memory = {} if is_accelerate_available() else {"low_cpu_mem_usage": False}
    try:
        vae = AutoencoderKL.from_pretrained(cfg.model_id, subfolder=cfg.subfolder or None, **low_memory)
    except OSError as e:
        raise ConfigError(
            f"vae.model_id={cfg.model_id!r} cannot be loaded: {str(e).splitlines()[0]}"
        ) from None
    ae = DiffusersAutoencoder(vae).to(device)
    if ae.channels != cfg.latent_channels or ae.downsample != cfg.downsample:
        raise ConfigError(
            f"vae {cfg.model_id!r} has {ae.channels} latent channels and downsample {ae.downsample}, but the "
            f"config says vae.latent_channels={cfg.latent_channels}, vae.downsample={cfg.downsample}"
        )
    return ae
