"""Patch, position and timestep embeddings."""

from __future__ import annotations

import math

import torch
from torch import nn


def patchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, (H/p)(W/p), p*p*C), row-major over patches, channels last inside a patch."""
    b, c, h, w = x.shape
    if h % p or w % p:
        raise ValueError(f"latent size {h}x{w} is not divisible by patch size {p}")
    x = x.reshape(b, c, h // p, p, w // p, p)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify(x: torch.Tensor, p: int, h: int, w: int, c: int) -> torch.Tensor:
    """Inverse of ``patchify``: (B, (h/p)(w/p), p*p*c) -> (B, c, h, w), h and w in latent pixels."""
    b = x.shape[0]
    x = x.reshape(b, h // p, w // p, p, p, c)
    return x.permute(0, 5, 1, 3, 2, 4).reshape(b, c, h, w)


class PatchEmbed(nn.Module):
    """Non-overlapping p x p patches -> tokens, as a Linear over flattened patches (same as a strided conv)."""

    def __init__(self, in_channels: int, dim: int, patch_size: int):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Linear(in_channels * patch_size * patch_size, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(patchify(x, self.patch_size))


def sincos_2d(dim: int, h: int, w: int, device=None) -> torch.Tensor:
    """(h * w, dim) fixed 2D sin-cos position embedding (MAE/DiT): half the channels per axis."""
    rows = torch.arange(h, device=device, dtype=torch.float64)
    cols = torch.arange(w, device=device, dtype=torch.float64)
    return _sincos_grid(dim, rows, cols)


def scaled_sincos_2d(
    dim: int, h: int, w: int, base_size: int | None, max_size: int | None, device=None
) -> torch.Tensor:
    """(h * w, dim) sin-cos table as diffusers' ``PatchEmbed`` builds it (the public FuseDiT code's APE).

    Along each axis the table covers a grid of G positions, G = ``max_size`` or the axis length itself,
    scaled by ``base_size / G`` (so every grid spans what the training grid of ``base_size`` patches spanned;
    None = unscaled), and is centre-cropped to the h x w latent grid. The positions are divided in float32
    as diffusers does, so the table equals its stored ``pos_embed`` buffer bit for bit.
    """

    def axis(n: int) -> torch.Tensor:
        grid = max_size or n
        if n > grid:
            raise ValueError(
                f"a latent grid of {n} patches exceeds the APE table's {grid} (model.ape_max_size)"
            )
        start = (grid - n) // 2
        pos = torch.arange(start, start + n, device=device, dtype=torch.float32)
        return (pos / (grid / (base_size or grid))).double()

    return _sincos_grid(dim, axis(h), axis(w))


def _sincos_grid(dim: int, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """Row positions (h,) and column positions (w,), float64 -> (h * w, dim): columns first, then rows."""
    if dim % 4:
        raise ValueError(f"2D sin-cos embedding needs a width divisible by 4, got {dim}")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, device=rows.device, dtype=torch.float64) / (dim / 4))

    def axis(pos: torch.Tensor) -> torch.Tensor:
        a = pos[:, None] * omega
        return torch.cat([a.sin(), a.cos()], dim=1)

    h, w = rows.shape[0], cols.shape[0]
    return torch.cat([axis(cols.repeat(h)), axis(rows.repeat_interleave(w))], dim=1).float()


def timestep_features(t: torch.Tensor, dim: int = 256, max_period: float = 10000.0) -> torch.Tensor:
    """(B,) timesteps -> (B, dim) sinusoidal features [cos ; sin] (DiT / diffusers flip_sin_to_cos)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([args.cos(), args.sin()], dim=-1)


class TimestepEmbedder(nn.Module):
    """t in [0, 1] -> (B, dim). The model sees 1000 * t, the scale the sinusoid frequencies are made for."""

    def __init__(self, dim: int, freq_dim: int = 256, scale: float = 1000.0):
        super().__init__()
        self.freq_dim, self.scale = freq_dim, scale
        self.mlp = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        feats = timestep_features(t * self.scale, self.freq_dim)
        return self.mlp(feats.to(self.mlp[0].weight.dtype))
